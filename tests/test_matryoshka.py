"""Matryoshka SAE (issue 23): nested prefix losses, the same trainer, SAELens layout, planted hierarchy."""

from __future__ import annotations

import json

import pytest
import torch

from saekit.errors import ConfigError
from saekit.sae.matryoshka import (MatryoshkaConfig, MatryoshkaSAE, default_widths, matryoshka_losses, prefix_levels,
                                   prefix_reconstructions)
from saekit.sae.kernels.sparse import sparse_decode
from saekit.sae.registry import create, load_sae, save_sae

D_IN, D_SAE = 8, 32


def _sae(**over) -> MatryoshkaSAE:
    cfg = {"architecture": "matryoshka", "d_in": D_IN, "d_sae": D_SAE, "k": 4, "matryoshka_widths": [4, 12, 32]}
    sae = create(cfg | over)
    with torch.no_grad():
        sae.b_enc.add_(0.1)
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(3))
    return sae


def test_widths_are_validated_and_default_to_three_levels():
    assert default_widths(3072) == [192, 768, 3072] and default_widths(8) == [2, 8]
    assert MatryoshkaConfig(d_in=4, d_sae=32).widths == [2, 8, 32]
    for bad, what in (([8, 4, 32], "strictly increasing"), ([0, 32], "strictly increasing"), ([4, 16], "d_sae=32"),
                      ([], "strictly increasing")):
        with pytest.raises(ConfigError, match=what):
            MatryoshkaConfig.from_dict({"d_in": 4, "d_sae": 32, "matryoshka_widths": bad})
    with pytest.raises(ConfigError, match="unknown"):
        MatryoshkaConfig.from_dict({"d_in": 4, "d_sae": 32, "prefix_sizes": [4, 32]})


def test_prefix_levels_number_every_latent():
    assert prefix_levels([2, 5, 6]).tolist() == [0, 0, 1, 1, 1, 2]
    assert _sae().prefix_levels().bincount().tolist() == [4, 8, 20]


def test_prefix_reconstruction_uses_only_that_prefix():
    """Each prefix's reconstruction equals the dense code cut to its first w latents, decoded."""
    sae = _sae().eval()
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0))
    code = sae.encode(x)
    z_NF = code.dense()
    for w, r in zip([4, 12, 32], prefix_reconstructions(code.indices, code.values, sae.W_dec, sae.b_dec, [4, 12, 32])):
        torch.testing.assert_close(r, z_NF[:, :w] @ sae.W_dec[:w] + sae.b_dec)
    torch.testing.assert_close(r, sae(x).recon)


def test_each_prefix_loss_has_gradient_only_from_its_own_latents():
    """d loss_p / d W_dec[j] = 0 and d loss_p / d z_j = 0 for every latent j >= w_p, non-zero for some j < w_p."""
    torch.manual_seed(0)
    sae = _sae()
    x = torch.randn(128, D_IN)
    code = sae.encode(x)
    widths = [4, 12, 32]
    losses = matryoshka_losses(x, code.indices, code.values, sae.W_dec, sae.b_dec, widths)
    for p, w in enumerate(widths):
        g_W, g_v = torch.autograd.grad(losses[p], [sae.W_dec, code.values], retain_graph=True)
        assert g_W[w:].abs().sum() == 0 and g_W[:w].abs().max() > 0
        assert g_v[code.indices >= w].abs().sum() == 0 and g_v[code.indices < w].abs().max() > 0
        ref = (x - (code.dense()[:, :w] @ sae.W_dec[:w] + sae.b_dec)).pow(2).sum(-1).mean()
        torch.testing.assert_close(losses[p], ref)


def test_loss_is_the_sum_of_prefix_losses():
    sae = _sae(aux_coef=0.0).train()
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(1))
    out = sae(x)
    loss = sae.loss(x, out)
    z = out.code.dense()
    want = sum((x - (z[:, :w] @ sae.W_dec[:w] + sae.b_dec)).pow(2).sum(-1).mean() for w in (4, 12, 32))
    torch.testing.assert_close(loss.total, want)
    assert set(loss.parts) == {"mse", "mse_w4", "mse_w12"}


def test_level_auxk_trains_dead_latents_on_their_level_residual():
    """A dead latent of the first level gets gradient from the first prefix's residual (per-level AuxK)."""
    sae = _sae(dead_tokens_threshold=1).train()
    sae.tokens_since_fired.fill_(10)  # every latent counts as dead: all take part in AuxK
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(2))
    out = sae(x)
    loss = sae.loss(x, out)
    assert "auxk" in loss.parts and loss.parts["auxk"] > 0
    loss.total.backward()
    assert torch.isfinite(sae.W_enc.grad).all() and sae.W_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("batch_topk,selection", [(False, "global"), (True, "global"), (True, "nested")])
def test_trains_through_the_same_trainer_and_saves_in_both_layouts(batch_topk, selection, tmp_path):
    from saekit.store.batches import TensorBatches
    from saekit.train import TrainConfig, train

    x = torch.randn(512, D_IN, generator=torch.Generator().manual_seed(4))
    cfg = TrainConfig(total_steps=8, batch_size=64, lr=1e-3, checkpoint_every=0, progress_bar=False, log_every=4)
    run = train(_sae(batch_topk=batch_topk, prefix_selection=selection), TensorBatches(x, 64), cfg, tmp_path / "run")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("mse_w4" in m for m in metrics)
    sae = load_sae(run.final_sae).eval()
    assert sae.architecture == "matryoshka" and sae.cfg.widths == [4, 12, 32] and sae.cfg.prefix_selection == selection
    save_sae(sae, tmp_path / "lens", format="saelens")
    cfg_json = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    details = cfg_json["metadata"]["training_architecture_details"]
    assert details["matryoshka_widths"] == [4, 12, 32]
    assert cfg_json["architecture"] == ("jumprelu" if batch_topk else "topk")
    assert cfg_json["metadata"]["training_architecture"] == ("matryoshka_batchtopk" if batch_topk else
                                                             "matryoshka_topk")
    back = load_sae(tmp_path / "lens").eval()
    assert back.architecture == ("jumprelu" if batch_topk else "matryoshka")
    if not batch_topk:
        assert back.cfg.widths == [4, 12, 32]
    xs = torch.randn(100, D_IN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(back.encode(xs).dense(), sae.encode(xs).dense(), rtol=0, atol=0)
        torch.testing.assert_close(back(xs).recon, sae(xs).recon, rtol=1e-6, atol=1e-6)


def _dense_prefix_recon(sae: MatryoshkaSAE, x: torch.Tensor, w: int, batch: bool) -> torch.Tensor:
    """Reference for `prefix_selection: nested`: the prefix's own top-k (BatchTopK) among its first w
    pre-activations, ReLU, decoded with the prefix's decoder rows."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    pre_w = pre[:, :w]
    if batch:
        keep = pre_w.flatten().topk(sae.cfg.k * x.shape[0]).indices
        z = torch.zeros_like(pre_w).flatten().scatter(0, keep, pre_w.flatten()[keep]).reshape(pre_w.shape)
    else:
        vals, idx = pre_w.topk(sae.cfg.k, dim=1)
        z = torch.zeros_like(pre_w).scatter(1, idx, vals)
    return z.clamp_min(0) @ sae.W_dec[:w] + sae.b_dec


@pytest.mark.parametrize("batch_topk", [False, True])
def test_nested_prefixes_reconstruct_from_their_own_top_k(batch_topk):
    """prefix_selection: nested - each inner prefix's loss is that of its own k-sparse code among its first
    w_p latents; the code itself (and so inference) is the same selection as with 'global'."""
    sae = _sae(prefix_selection="nested", batch_topk=batch_topk, aux_coef=0.0).train()
    ref = _sae(batch_topk=batch_topk, aux_coef=0.0).train()
    x = torch.randn(48, D_IN, generator=torch.Generator().manual_seed(6))
    out, out_ref = sae(x), ref(x)
    torch.testing.assert_close(out.code.dense(), out_ref.code.dense())
    torch.testing.assert_close(out.recon, out_ref.recon)
    parts = sae.loss(x, out).parts
    with torch.no_grad():
        for w in (4, 12):
            want = (x - _dense_prefix_recon(sae, x, w, batch_topk)).pow(2).sum(-1).mean()
            assert parts[f"mse_w{w}"] == pytest.approx(float(want), rel=1e-5)
    assert parts["mse"] == pytest.approx(sae.loss(x, out_ref).parts["mse"], rel=1e-6)
    # the nested selection is not the code cut to the prefix (else the option would change nothing)
    assert abs(parts["mse_w4"] - ref.loss(x, out_ref).parts["mse_w4"]) > 1e-3


def test_nested_prefix_loss_reaches_only_its_own_latents():
    """The first prefix's nested loss sends gradient to encoder columns and decoder rows < w_1 only, and to
    some first-prefix latents that the code did not select (the point of the option)."""
    sae = _sae(prefix_selection="nested", aux_coef=0.0).train()
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(7))
    out = sae(x)
    recon_1 = sparse_decode(out.aux["prefix_vals_0"], out.aux["prefix_idx_0"], sae.W_dec, sae.b_dec)
    g_enc, g_dec = torch.autograd.grad((x - recon_1).pow(2).sum(-1).mean(), [sae.W_enc, sae.W_dec])
    assert g_enc[:, 4:].abs().sum() == 0 and g_dec[4:].abs().sum() == 0
    code_first = out.code.dense()[:, :4] != 0
    got_grad = (out.aux["prefix_vals_0"] != 0)
    assert bool(got_grad.any()) and got_grad.sum() > code_first.sum()
    assert g_enc[:, :4].abs().sum(0).min() > 0


def test_prefix_selection_is_validated_and_eval_is_unchanged():
    with pytest.raises(ConfigError, match="prefix_selection"):
        MatryoshkaConfig.from_dict({"d_in": 4, "d_sae": 32, "prefix_selection": "random"})
    sae, ref = _sae(prefix_selection="nested").eval(), _sae().eval()
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = sae(x)
        assert not any(name.startswith("prefix_") for name in out.aux)
        torch.testing.assert_close(out.code.dense(), ref(x).code.dense())
