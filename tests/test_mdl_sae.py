"""MDL-SAE (issue 5 item 2): the DL estimate, its gradients, L0 monotone in the coefficient, folding."""

from __future__ import annotations

import math

import pytest
import torch

from saekit.data.synthetic import planted_features
from saekit.errors import ConfigError
from saekit.sae.mdl import MDLConfig, MDLSAE, entropy_bits, soft_description_length
from saekit.sae.registry import load_sae
from saekit.store.batches import TensorBatches
from saekit.train import TrainConfig, train
from saekit.train.checkpoint import load_checkpoint_sae


def test_entropy_and_soft_dl_known_answers():
    assert torch.allclose(entropy_bits(torch.tensor([0.5, 0.25])), torch.tensor([1.0, 0.811278]), atol=1e-5)
    n = 1000
    # a latent that never fires and one that always fires cost (almost) no activity bits
    act, val = soft_description_length(torch.tensor([0.0, 1.0]), value_bits=4.0, n_rows=n)
    assert act.item() < 2 * entropy_bits(torch.tensor(0.5 / n)).item() + 1e-6 and act.item() < 0.02
    assert val.item() == pytest.approx(4.0)  # b bits for the one value sent per row
    act, val = soft_description_length(torch.tensor([0.5, 0.5, 0.0]), value_bits=3.0, n_rows=n)
    assert act.item() == pytest.approx(2.0, abs=0.01) and val.item() == pytest.approx(3.0)


def test_p_fire_is_the_hard_frequency_and_every_parameter_gets_gradient():
    sae = MDLSAE(MDLConfig(d_in=8, d_sae=32, dl_coef=1e-2, seed=0)).train()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    out = sae(x)
    hard = (out.code.dense() != 0).float().mean(0)
    torch.testing.assert_close(out.aux["p_fire_F"].detach(), hard)
    loss = sae.loss(x, out)
    assert loss.parts["l0"] == pytest.approx(float(out.code.l0().float().mean()), rel=1e-5)
    loss.total.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # log_threshold is not frozen


def test_k_cap_and_config_checks():
    sae = MDLSAE(MDLConfig(d_in=8, d_sae=32, k=3, init_threshold=1e-4)).eval()
    code = sae.encode(torch.randn(50, 8))
    assert (code.l0() <= 3).all() and (code.l0() > 0).any()
    with pytest.raises(ConfigError, match="k <= d_sae"):
        MDLConfig.from_dict({"d_in": 8, "d_sae": 4, "k": 5})
    with pytest.raises(ConfigError, match="dl_coeff"):
        MDLConfig.from_dict({"d_in": 8, "d_sae": 4, "dl_coeff": 1.0})


def _fit(dl_coef: float, x, tmp_path, steps=600, **train_kw):
    sae = MDLSAE(MDLConfig(d_in=x.shape[1], d_sae=64, dl_coef=dl_coef, seed=0))
    cfg = TrainConfig.from_dict(dict(total_steps=steps, batch_size=256, lr=3e-3, checkpoint_every=0,
                                     progress_bar=False, log_every=steps, **train_kw))
    res = train(sae, TensorBatches(x, 256, seed=0), cfg, tmp_path / f"run_{dl_coef}")
    return res


def test_l0_falls_monotonically_as_dl_coef_rises(tmp_path, one_thread):
    """docs/RELIABILITY.md 6: dl_coef is the sparsity coefficient."""
    x = planted_features(8192, 16, 32, avg_active=3, seed=0).x_ND
    stats = []
    for lam in (1e-3, 3e-3, 1e-2, 3e-2):
        sae = load_sae(_fit(lam, x, tmp_path).final_sae).eval()
        with torch.no_grad():
            xe = x[:2048]
            out = sae(xe)
            fvu = float((out.recon - xe).pow(2).sum() / (xe - xe.mean(0)).pow(2).sum())
        stats.append((lam, float(out.code.l0().float().mean()), fvu))
    l0s, fvus = [s[1] for s in stats], [s[2] for s in stats]
    assert all(a > b for a, b in zip(l0s, l0s[1:])), stats
    assert all(a < b for a, b in zip(fvus, fvus[1:])), stats  # fewer bits are paid for with error
    assert fvus[0] < 0.1, stats


def test_exported_sae_folds_the_input_scale(tmp_path, one_thread):
    x = planted_features(2048, 16, 32, avg_active=3, seed=1).x_ND * 7.0
    res = _fit(3e-3, x, tmp_path, steps=60, normalize_activations="expected_average_only_in", norm_batches=2)
    scale = res.state.input_scale
    assert scale is not None and not math.isclose(scale, 1.0)
    loaded = load_sae(res.final_sae).eval()
    model = load_checkpoint_sae(res.run_dir, fold=False).eval()  # the training form, on normalised rows
    with torch.no_grad():
        want = model(x[:256] * scale).recon / scale
        got = loaded(x[:256]).recon
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # docs/RELIABILITY.md 5
    with torch.no_grad():  # the object train() returns is the exported one (issue 24)
        torch.testing.assert_close(res.sae(x[:256]).recon, got, rtol=0, atol=0)
