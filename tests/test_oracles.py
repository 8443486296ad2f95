"""Promise 39 for top-k and MDL: saekit's SAE equals a vendored dense oracle (tests/support/oracles.py) in
codes, reconstructions, loss and gradients at a fixed seed, and after several Adam steps."""

from __future__ import annotations

import math

import pytest
import torch
from support.oracles import saekit_step, NaiveGated, NaiveJumpReLU, NaiveMatryoshka, NaiveMDL, NaiveReLU, NaiveTopK

from saekit.sae.registry import create

D_IN, D_SAE, K, N = 16, 64, 4, 96


def _pair(seed: int = 0):
    sae = create({"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": K, "aux_coef": 0.0, "seed": seed}).train()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc.add_(0.1 * torch.randn(D_SAE, generator=g))
        sae.b_dec.add_(0.1 * torch.randn(D_IN, generator=g))
    oracle = NaiveTopK(sae.W_enc.detach(), sae.W_dec.detach(), sae.b_enc.detach(), sae.b_dec.detach(), K)
    return sae, oracle


def _x(seed: int = 5):
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed))


def test_outputs_loss_and_gradients_equal_the_oracle():
    sae, oracle = _pair()
    x = _x()
    out = sae(x)
    torch.testing.assert_close(out.code.dense(), oracle.codes(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.recon, oracle(x), rtol=1e-5, atol=1e-5)
    loss, ref = sae.loss(x, out).total, oracle.loss(x)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(oracle, name).grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_training_steps_equal_the_oracle():
    sae, oracle = _pair(seed=2)
    opt_s = torch.optim.Adam(sae.parameters(), lr=1e-3)
    opt_o = torch.optim.Adam(oracle.parameters(), lr=1e-3)
    for step in range(5):
        x = _x(10 + step)
        saekit_step(sae, opt_s, x)
        oracle.step(opt_o, x)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).detach(), getattr(oracle, name).detach(), rtol=1e-4, atol=1e-5)


# -- MDL ----------------------------------------------------------------------------------------------
MDL_VARIANTS = {"plain": {}, "capped, surrogate to encoder": {"k": 3, "surrogate_to_encoder": True},
                "row error": {"loss_scale": "row"}, "clipped error": {"loss_scale": "clipped"}}


def _mdl_pair(seed: int = 0, **cfg):
    """saekit's MDL SAE in training mode and the oracle on the same weights. The biases and thresholds are
    moved off their init so every term is in play (b_dec enters the encoder, thresholds differ by latent)."""
    sae = create({"architecture": "mdl", "d_in": D_IN, "d_sae": D_SAE, "dl_coef": 0.05, "seed": seed, **cfg}).train()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc.add_(0.1 * torch.randn(D_SAE, generator=g))
        sae.b_dec.add_(0.1 * torch.randn(D_IN, generator=g))
        sae.log_threshold.add_(torch.randn(D_SAE, generator=g))  # θ from ~0.02 to ~0.4: gates fire at varied rates
    oracle = NaiveMDL(*(getattr(sae, n).detach() for n in MDL_PARAMS), dl_coef=0.05, value_bits=sae.cfg.value_bits,
                      tau=sae.cfg.gate_temperature, k=sae.cfg.k, to_encoder=sae.cfg.surrogate_to_encoder,
                      target_l0=sae.cfg.target_l0, rate=sae.cfg.controller_rate, scale=sae.cfg.loss_scale,
                      clip_multiple=sae.cfg.clip_multiple,
                      shared_rms_lr=sae.cfg.threshold_lr if sae.cfg.threshold_step == "shared_rms" else None,
                      steer_coef=sae.cfg.controller == "dl_coef", ema=sae.cfg.controller_ema)
    return sae, oracle


MDL_PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec", "log_threshold")


@pytest.mark.parametrize("variant", list(MDL_VARIANTS))
def test_mdl_outputs_loss_and_gradients_equal_the_oracle(variant):
    sae, oracle = _mdl_pair(**MDL_VARIANTS[variant])
    x = _x_massive()
    out = sae(x)
    codes = oracle.codes(x)
    assert 0 < int((codes != 0).sum()) < codes.numel()  # some gates open, some shut: the test has teeth
    torch.testing.assert_close(out.code.dense(), codes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.recon, oracle(x), rtol=1e-5, atol=1e-5)
    got, (ref, parts) = sae.loss(x, out), oracle.loss(x)
    torch.testing.assert_close(got.total, ref, rtol=1e-5, atol=1e-6)
    for name in ("fvu", "activity_bits", "value_bits", "l0"):
        assert got.parts[name] == pytest.approx(float(parts[name].detach()), rel=1e-5, abs=1e-6), name
    if "loss_scale" in MDL_VARIANTS[variant]:  # the massive rows make the scaled error differ from the FVU
        assert abs(got.parts["scaled_error"] - got.parts["fvu"]) > 0.01 * got.parts["fvu"]
    got.total.backward()
    ref.backward()
    for name in MDL_PARAMS:
        assert getattr(oracle, name).grad.abs().sum() > 0, name  # every parameter learns (θ included)
        torch.testing.assert_close(getattr(sae, name).grad, getattr(oracle, name).grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


def _x_massive(seed: int = 5):
    """Rows with a few 'massive' ones (x20), so that the clipped error's weights are not all 1."""
    x = _x(seed)
    x[::16] *= 20.0
    return x


STEP_VARIANTS = {**MDL_VARIANTS, "threshold controller": {"target_l0": 6.0},
                 "controller on dl_coef": {"target_l0": 6.0, "controller": "dl_coef", "controller_rate": 0.5},
                 "shared-RMS thresholds": {"threshold_step": "shared_rms", "threshold_lr": 0.05},
                 "threshold controller on an EMA": {"target_l0": 24.0, "controller_ema": 0.7}}  # error unclipped


@pytest.mark.parametrize("variant", list(STEP_VARIANTS))
def test_mdl_training_steps_equal_the_oracle(variant):
    cfg = STEP_VARIANTS[variant]
    sae, oracle = _mdl_pair(seed=2, **cfg)
    opt_s = torch.optim.Adam(sae.parameters(), lr=1e-3)
    opt_o = torch.optim.Adam(oracle.parameters(), lr=1e-3)
    start = oracle.log_threshold.detach().clone()
    for step in range(5):
        x = _x_massive(10 + step)
        saekit_step(sae, opt_s, x)
        oracle.step(opt_o, x)
    for name in MDL_PARAMS:
        torch.testing.assert_close(getattr(sae, name).detach(), getattr(oracle, name).detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n} after 5 steps: {m}")
    moved = (oracle.log_threshold.detach() - start).abs().max()
    assert moved > (0.05 if variant.startswith("threshold controller") else 1e-4)  # the controller's steps are in play
    if "controller" in cfg:
        assert sae.dl_coef == pytest.approx(oracle.dl_coef, rel=1e-5) and abs(math.log(oracle.dl_coef / 0.05)) > 0.1


# -- ReLU, JumpReLU, gated, matryoshka --------------------------------------------------------------
def _perturbed(arch: str, seed: int, **cfg):
    """saekit's SAE in training mode with every bias (and threshold-like parameter) moved off its init, so
    every term of the formulas is in play."""
    sae = create({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "seed": seed, **cfg}).train()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return sae


def _relu_pair(seed: int = 0, b_dec_to_input: bool = True):
    sae = _perturbed("relu", seed, l1_coefficient=0.3, apply_b_dec_to_input=b_dec_to_input)
    with torch.no_grad():  # unconstrained decoder: rows of varied norm, so the L1's row-norm weights matter
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])
    oracle = NaiveReLU(*(getattr(sae, n).detach() for n in ("W_enc", "W_dec", "b_enc", "b_dec")), l1_coef=0.3,
                       b_dec_to_input=b_dec_to_input)
    return sae, oracle


def _jumprelu_pair(seed: int = 0, b_dec_to_input: bool = False):
    """θ spread over 0.05-0.65 and a wide window (ε = 0.2), so many pre-activations fall within ε/2 of θ on
    both sides: the threshold's pseudo-derivatives are exercised, not only the exact gradients."""
    sae = _perturbed("jumprelu", seed, l0_coefficient=0.05, bandwidth=0.2, apply_b_dec_to_input=b_dec_to_input)
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(0.05, 0.65, D_SAE)[torch.randperm(D_SAE, generator=torch.Generator()
                                                                             .manual_seed(seed))])
    oracle = NaiveJumpReLU(*(getattr(sae, n).detach() for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")),
                           l0_coef=0.05, eps=0.2, min_theta=sae.cfg.min_threshold, b_dec_to_input=b_dec_to_input)
    return sae, oracle


WIDTHS = [8, 24, D_SAE]


def _matryoshka_pair(seed: int = 0, nested: bool = False):
    sae = _perturbed("matryoshka", seed, k=K, aux_coef=0.0, matryoshka_widths=WIDTHS,
                     prefix_selection="nested" if nested else "global")
    oracle = NaiveMatryoshka(*(getattr(sae, n).detach() for n in ("W_enc", "W_dec", "b_enc", "b_dec")), K, WIDTHS,
                             nested=nested)
    return sae, oracle


PAIRS = {"relu": _relu_pair, "relu, raw input": lambda **kw: _relu_pair(b_dec_to_input=False, **kw),
         "jumprelu": _jumprelu_pair, "jumprelu, b_dec subtracted": lambda **kw: _jumprelu_pair(b_dec_to_input=True, **kw),
         "matryoshka": _matryoshka_pair, "matryoshka, nested": lambda **kw: _matryoshka_pair(nested=True, **kw)}


def _oracle_loss(oracle, x):
    """(total, parts) for every oracle; matryoshka's parts are its per-prefix MSEs under saekit's names."""
    if isinstance(oracle, NaiveMatryoshka):
        mses = oracle.prefix_losses(x)
        parts = {f"mse_w{w}": m.detach() for w, m in zip(WIDTHS, mses[:-1])} | {"mse": mses[-1].detach()}
        return sum(mses), parts
    return oracle.loss(x)


@pytest.mark.parametrize("variant", list(PAIRS))
def test_arch_outputs_loss_and_gradients_equal_the_oracle(variant):
    sae, oracle = PAIRS[variant]()
    x = _x()
    out = sae(x)
    codes = oracle.codes(x)
    assert 0 < int((codes != 0).sum()) < codes.numel() // 2  # some latents fire, most do not: the test has teeth
    torch.testing.assert_close(out.code.dense(), codes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.recon, oracle(x), rtol=1e-5, atol=1e-5)
    got, (ref, parts) = sae.loss(x, out), _oracle_loss(oracle, x)
    torch.testing.assert_close(got.total, ref, rtol=1e-5, atol=1e-6)
    assert set(parts) <= set(got.parts)
    for name, value in parts.items():
        assert got.parts[name] == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    got.total.backward()
    ref.backward()
    for name, p in oracle.named_parameters():
        assert p.grad.abs().sum() > 0, name  # every parameter learns (the threshold included)
        torch.testing.assert_close(getattr(sae, name if name != "theta" else "threshold").grad, p.grad, rtol=1e-4,
                                   atol=1e-6, msg=lambda m, n=name: f"gradient of {n}: {m}")


@pytest.mark.parametrize("variant", list(PAIRS))
def test_arch_training_steps_equal_the_oracle(variant):
    sae, oracle = PAIRS[variant](seed=2)
    opt_s = torch.optim.Adam(sae.parameters(), lr=1e-2)
    opt_o = torch.optim.Adam(oracle.parameters(), lr=1e-2)
    start = {n: p.detach().clone() for n, p in oracle.named_parameters()}
    for step in range(5):
        x = _x(10 + step)
        saekit_step(sae, opt_s, x)
        oracle.step(opt_o, x)
    for name, p in oracle.named_parameters():
        assert (p.detach() - start[name]).abs().max() > 1e-3, name  # every parameter moved
        torch.testing.assert_close(getattr(sae, name if name != "theta" else "threshold").detach(), p.detach(),
                                   rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n} after 5 steps: {m}")


def test_jumprelu_threshold_gradient_comes_from_both_sides_of_the_window():
    """The θ pseudo-derivatives cover |pre − θ| < ε/2 on both sides of θ: a pre-activation just below θ
    (code 0) still moves θ through the reconstruction when its latent would have helped. (A ReLU applied
    after the jump once zeroed this half of the window: 62 of 64 θ gradients differed from the oracle.)"""
    sae, _ = _jumprelu_pair()
    with torch.no_grad():
        sae.threshold.fill_(0.5)
        sae.b_enc.zero_()
    w_D = sae.W_enc[:, 0].detach()
    x = (0.45 * w_D / w_D.pow(2).sum())[None]  # pre-activation of latent 0: exactly 0.45, inside the window
    out = sae(x)
    assert out.code.dense()[0, 0] == 0
    target = out.recon.detach() + sae.W_dec[0].detach()  # what latent 0 firing at 1 would add (unit row)
    (out.recon - target).pow(2).sum().backward()  # ∂/∂z_0 = −2, ∂z_0/∂θ := −θ/ε
    assert sae.threshold.grad[0] == pytest.approx(2 * 0.5 / 0.2, rel=1e-4)  # > 0: descent lowers θ


def test_gated_codes_and_reconstruction_equal_the_oracle():
    sae = _perturbed("gated", 0)
    with torch.no_grad():
        sae.r_mag.mul_(3.0)  # magnitudes from 0.4x to 2.5x the gate's directions
    x = _x()
    oracle = NaiveGated(*(getattr(sae, n).detach() for n in ("W_enc", "W_dec", "b_gate", "b_mag", "r_mag", "b_dec")))
    codes = oracle.codes(x)
    assert 0 < int((codes != 0).sum()) < codes.numel()
    gate_only = (codes != 0) != (sae.eval()(x).code.dense() != 0)
    assert not bool(gate_only.any())
    out = sae(x)
    torch.testing.assert_close(out.code.dense(), codes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.recon, oracle(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="inference only"):
        sae.loss(x, out)
