"""Promise 39 for `init_from_data`: what each architecture sets from the first batch, against an independent
computation of what its docstring states. b_dec is the geometric median (top-k, matryoshka, ReLU, JumpReLU,
MDL): checked against scipy's minimiser of Σ_i ‖x_i − y‖ started elsewhere; MP's b_dec is the mean; MDL's
`init_l0` thresholds leave exactly N − k rows above each latent's threshold (k = round((1 − l0/d_sae)·N)),
or, with `init_rates: common`, N·F − k pre-activations of the whole batch above the one threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from saekit.sae.registry import create

D_IN, D_SAE, N = 16, 64, 400


def _x(seed: int = 0):
    """Skewed rows (a heavy-tailed coordinate and an offset), so the median and the mean differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g) + 3.0
    x[:, 0] = torch.distributions.Exponential(0.2).sample((N,))
    return x


def _sum_dist(y, x):
    return float(np.linalg.norm(x - y, axis=1).sum())


def _geometric_median(x_ND: np.ndarray) -> np.ndarray:
    """argmin_y Σ_i ‖x_i − y‖ by BFGS with the analytic gradient, from the coordinate-wise median."""
    def f(y):
        d = x_ND - y
        r = np.maximum(np.linalg.norm(d, axis=1), 1e-12)
        return r.sum(), -(d / r[:, None]).sum(0)
    return minimize(f, np.median(x_ND, 0), jac=True, method="BFGS", options={"gtol": 1e-10}).x


@pytest.mark.parametrize("arch", ["topk", "matryoshka", "relu", "jumprelu", "mdl"])
def test_b_dec_is_the_geometric_median(arch):
    sae = create({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "seed": 0})
    x = _x()
    sae.init_from_data(x)
    x64, got = x.double().numpy(), sae.b_dec.detach().double().numpy()
    want = _geometric_median(x64)
    mean = x64.mean(0)
    assert np.linalg.norm(want - mean) > 0.5  # the data tell the median from the mean
    assert _sum_dist(got, x64) <= _sum_dist(want, x64) * (1 + 1e-6)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_mp_b_dec_is_the_mean():
    sae = create({"architecture": "mp", "d_in": D_IN, "d_sae": D_SAE, "k": 4, "seed": 0})
    x = _x()
    sae.init_from_data(x)
    np.testing.assert_allclose(sae.b_dec.detach().double().numpy(), x.double().numpy().mean(0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rates", ["per_latent", "common"])
@pytest.mark.parametrize("l0", [4.0, 11.0])
def test_mdl_init_l0_thresholds_leave_the_stated_number_of_rows_above(rates, l0):
    sae = create({"architecture": "mdl", "d_in": D_IN, "d_sae": D_SAE, "seed": 0, "init_l0": l0, "init_rates": rates})
    x = _x(1)
    sae.init_from_data(x)
    with torch.no_grad():
        pre_NF = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).double().numpy()
    theta_F = sae.log_threshold.detach().double().exp().numpy()
    assert (theta_F > 1e-6 * 1.01).all()  # none at the floor: the quantile itself is checked
    q = 1 - l0 / D_SAE
    if rates == "per_latent":
        k = round(q * N)
        above_F = (pre_NF > theta_F[None] * (1 + 1e-6)).sum(0)
        assert (above_F == N - k).all(), sorted(set(above_F.tolist()))
    else:
        k = round(q * pre_NF.size)
        assert np.allclose(theta_F, theta_F[0]) and int((pre_NF > theta_F[0] * (1 + 1e-6)).sum()) == pre_NF.size - k
        assert pre_NF.size - k == pytest.approx(l0 * N, abs=1)  # the batch's mean L0 is init_l0
