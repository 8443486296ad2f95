"""relu (L1, SAELens "standard"), jumprelu (STE + L0, Rajamanoharan et al. 2024) and inference-only gated.

The shared contract (shapes, save/load, damaged files) is covered for every registered architecture by
test_sae_contract.py; here: the straight-through estimators against their definitions, that both train
through saekit.train (the threshold moves, the sparsity coefficient controls L0), and input-scale folding.
"""

from __future__ import annotations

import pytest
import torch

from saekit.data.synthetic import planted_features
from saekit.sae.gated import GatedConfig, GatedSAE
from saekit.sae.jumprelu import JumpReLUConfig, JumpReLUSAE, JumpReLUSTE, StepSTE
from saekit.sae.registry import architectures, load_sae
from saekit.sae.relu import ReLUConfig, ReLUSAE, code_from_dense
from saekit.store.batches import TensorBatches
from saekit.train import TrainConfig, train

EPS = 0.1


def _z_theta(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    theta = (torch.rand(5, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    return z, theta


def _smoothed_step(z, theta):
    """E_u[H(z + eps*u - theta)], u ~ U(-1/2, 1/2): piecewise linear, with d/dtheta = -(1/eps) K((z-theta)/eps)."""
    return ((z - theta) / EPS + 0.5).clamp(0.0, 1.0)


def test_registered():
    assert {"relu", "jumprelu", "gated"} <= set(architectures())


def test_step_ste_theta_gradient_is_the_smoothed_steps_gradient():
    z, theta = _z_theta()
    z = z.clone()
    z[0, :] = theta.detach() + 0.02  # some entries inside the kernel window
    z[1, :] = theta.detach() - 0.03
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (g_ste,) = torch.autograd.grad((StepSTE.apply(z, theta, EPS) * w).sum(), theta)
    (g_ref,) = torch.autograd.grad((_smoothed_step(z, theta) * w).sum(), theta)
    torch.testing.assert_close(g_ste, g_ref)
    assert g_ste.abs().sum() > 0  # the window is hit: the threshold gets gradient from the L0 term


def test_step_ste_numerical_theta_derivative_of_smoothed_step():
    """Central differences of the smoothed step agree with the STE (a check independent of autograd)."""
    z, theta = _z_theta(1)
    z = z.clone()
    z[0, :] = theta.detach() + 0.01
    w = torch.ones_like(z)
    (g_ste,) = torch.autograd.grad((StepSTE.apply(z, theta, EPS) * w).sum(), theta)
    h = 1e-6
    for j in range(theta.numel()):
        tp, tm = theta.detach().clone(), theta.detach().clone()
        tp[j] += h
        tm[j] -= h
        num = (_smoothed_step(z, tp).sum() - _smoothed_step(z, tm).sum()) / (2 * h)
        assert abs(float(num) - float(g_ste[j])) < 1e-5, (j, float(num), float(g_ste[j]))


def test_step_ste_has_no_gradient_for_z():
    z, theta = _z_theta()
    z.requires_grad_()
    (g_z,) = torch.autograd.grad(StepSTE.apply(z, theta, EPS).sum(), z)
    assert torch.equal(g_z, torch.zeros_like(z))


def test_jumprelu_ste_z_path_passes_gradcheck_away_from_threshold():
    z, theta = _z_theta(2)
    z = torch.where((z - theta.detach()).abs() < 0.05, z + 0.2, z).requires_grad_()
    assert torch.autograd.gradcheck(lambda zz: JumpReLUSTE.apply(zz, theta.detach(), EPS), (z,))


def test_jumprelu_ste_theta_gradient_is_the_papers_pseudo_derivative():
    z, theta = _z_theta(4)
    z = z.clone()
    z[0, :] = theta.detach() + 0.03
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (g,) = torch.autograd.grad((JumpReLUSTE.apply(z, theta, EPS) * w).sum(), theta)
    inside = (((z - theta.detach()) / EPS).abs() < 0.5).double()
    want = (-(theta.detach() / EPS) * inside * w).sum(0)
    torch.testing.assert_close(g, want)
    out = JumpReLUSTE.apply(z, theta, EPS)
    assert torch.equal(out, z * (z > theta).double())


def test_code_from_dense_round_trips_and_pads_with_zeros():
    z = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    code = code_from_dense(z)
    assert code.indices.shape == (3, 2)
    assert torch.equal(code.dense(), z)
    assert code.l0().tolist() == [2, 0, 1]


def _fit(sae, x, tmp_path, steps=300, **kw):
    cfg = TrainConfig.from_dict(dict(total_steps=steps, batch_size=256, lr=3e-3, checkpoint_every=0,
                                     progress_bar=False, log_every=steps) | kw)
    return train(sae, TensorBatches(x, 256, seed=0), cfg, tmp_path)


def _l0_fvu(sae, x):
    with torch.no_grad():
        out = sae.eval()(x)
    fvu = float((out.recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return float(out.code.l0().float().mean()), fvu


@pytest.fixture(scope="module")
def data():
    return planted_features(4096, 16, 32, avg_active=3, seed=0).x_ND


def test_jumprelu_threshold_moves_and_l0_falls_with_the_coefficient(data, tmp_path, one_thread):
    stats = []
    for lam in (1e-3, 3e-2):
        sae = JumpReLUSAE(JumpReLUConfig(d_in=16, d_sae=64, l0_coefficient=lam, bandwidth=0.05, seed=0))
        init = sae.threshold.detach().clone()
        res = _fit(sae, data, tmp_path / f"j{lam}")
        moved = float((res.sae.threshold.detach() - init).abs().max())
        assert moved > 1e-2, f"threshold did not move (max change {moved})"
        stats.append(_l0_fvu(load_sae(res.final_sae), data[:1024]))
    (l0_lo, fvu_lo), (l0_hi, _) = stats
    assert l0_hi < l0_lo, stats
    assert fvu_lo < 0.2, stats


def test_relu_trains_and_l1_lowers_l0(data, tmp_path, one_thread):
    stats = []
    for l1 in (1e-3, 1e-1):
        sae = ReLUSAE(ReLUConfig(d_in=16, d_sae=64, l1_coefficient=l1, seed=0))
        before = _l0_fvu(sae, data[:1024])[1]
        res = _fit(sae, data, tmp_path / f"r{l1}")
        stats.append(_l0_fvu(load_sae(res.final_sae), data[:1024]))
        assert stats[-1][1] < before, (before, stats)
    (l0_lo, fvu_lo), (l0_hi, _) = stats
    assert l0_hi < l0_lo, stats
    assert fvu_lo < 0.1, stats


@pytest.mark.parametrize("make", [
    lambda: ReLUSAE(ReLUConfig(d_in=8, d_sae=16, seed=1)),
    lambda: JumpReLUSAE(JumpReLUConfig(d_in=8, d_sae=16, seed=1, init_threshold=0.3, apply_b_dec_to_input=True)),
    lambda: GatedSAE(GatedConfig(d_in=8, d_sae=16, seed=1)),
], ids=["relu", "jumprelu", "gated"])
def test_folded_copy_on_raw_inputs_equals_scaled_inputs(make):
    sae = make()
    with torch.no_grad():
        for p in sae.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sae.set_input_scale(0.25)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(9)) * 4
    folded = sae.folded_copy().eval()
    with torch.no_grad():
        want = sae.eval()(x * 0.25)
        got = folded(x)
    torch.testing.assert_close(got.code.dense(), want.code.dense() / 0.25, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.recon, want.recon / 0.25, rtol=1e-5, atol=1e-5)
    assert (want.code.l0() > 0).any() and (want.code.l0() < 16).any()


def test_gated_refuses_to_train():
    sae = GatedSAE(GatedConfig(d_in=8, d_sae=16))
    x = torch.randn(4, 8)
    with pytest.raises(NotImplementedError, match="inference only"):
        sae.loss(x, sae(x))
