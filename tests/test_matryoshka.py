"""Matryoshka SAE (issue 23): nested prefix losses, the same trainer, SAELens layout, planted hierarchy."""

from __future__ import annotations

import json

import pytest
import torch

from saekit.errors import ConfigError
from saekit.sae.matryoshka import (MatryoshkaConfig, MatryoshkaSAE, default_widths, matryoshka_losses, prefix_levels,
                                   prefix_reconstructions)
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


@pytest.mark.parametrize("batch_topk", [False, True])
def test_trains_through_the_same_trainer_and_saves_in_both_layouts(batch_topk, tmp_path):
    from saekit.store.batches import TensorBatches
    from saekit.train import TrainConfig, train

    x = torch.randn(512, D_IN, generator=torch.Generator().manual_seed(4))
    cfg = TrainConfig(total_steps=8, batch_size=64, lr=1e-3, checkpoint_every=0, progress_bar=False, log_every=4)
    run = train(_sae(batch_topk=batch_topk), TensorBatches(x, 64), cfg, tmp_path / "run")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("mse_w4" in m for m in metrics)
    sae = load_sae(run.final_sae).eval()
    assert sae.architecture == "matryoshka" and sae.cfg.widths == [4, 12, 32]
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
