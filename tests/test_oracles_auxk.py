"""Promise 39 for AuxK and BatchTopK: saekit's top-k (and matryoshka) SAE with dead latents present and
aux_coef > 0 equals a dense oracle written from the papers' formulas (tests/support/oracles.py:
`NaiveAuxTopK`, `NaiveMatryoshkaAux`) in codes, loss parts, gradients of every parameter, 5 Adam steps
(dead counters included) and BatchTopK's inference threshold."""

from __future__ import annotations

import pytest
import torch
from support.oracles import saekit_step, NaiveAuxTopK, NaiveMatryoshkaAux

from saekit.sae.registry import create

D_IN, D_SAE, K, N = 16, 64, 4, 96
AUX_COEF = 0.5
N_DEAD = 20
PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")
WIDTHS = [8, 24, D_SAE]

VARIANTS = {"topk": {}, "topk, aux_k above the dead count": {"aux_k": 32},
            "batchtopk": {"batch_topk": True}, "batchtopk, threshold momentum 0.5": {"batch_topk": True,
                                                                                   "threshold_momentum": 0.5},
            "matryoshka": {"architecture": "matryoshka", "matryoshka_widths": WIDTHS},
            "matryoshka, batchtopk": {"architecture": "matryoshka", "matryoshka_widths": WIDTHS, "batch_topk": True},
            "matryoshka, first level alive": {"architecture": "matryoshka", "matryoshka_widths": WIDTHS,
                                              "dead_from": WIDTHS[0]}}


def _x(seed: int):
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed))


def _pair(seed: int = 0, dead_from: int = 0, **cfg):
    """saekit's SAE (training mode) and the oracle on the same weights, with `N_DEAD` latents spread over
    every matryoshka level counted dead from the start (`dead_tokens_threshold` = one batch) and their
    encoder columns shrunk, so they mostly lose the top-k yet have positive pre-activations for AuxK.
    `dead_from`: the dead latents are drawn from latents >= it (a matryoshka level with none adds no AuxK term)."""
    arch = cfg.pop("architecture", "topk")
    sae = create({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "k": K, "aux_coef": AUX_COEF,
                  "dead_tokens_threshold": N, "seed": seed, **cfg}).train()
    g = torch.Generator().manual_seed(seed + 1)
    dead = dead_from + torch.randperm(D_SAE - dead_from, generator=g)[:N_DEAD]
    with torch.no_grad():
        sae.b_enc.add_(0.1 * torch.randn(D_SAE, generator=g))
        sae.b_dec.add_(0.1 * torch.randn(D_IN, generator=g))
        sae.W_enc[:, dead] *= 0.3
        sae.tokens_since_fired[dead] = N
    kw = dict(k=K, aux_k=sae.cfg.resolved_aux_k, aux_coef=AUX_COEF, dead_after=N, since=sae.tokens_since_fired,
              batch=sae.cfg.batch_topk, momentum=sae.cfg.threshold_momentum)
    weights = [getattr(sae, n).detach() for n in PARAMS]
    oracle = NaiveMatryoshkaAux(*weights, widths=WIDTHS, **kw) if arch == "matryoshka" else NaiveAuxTopK(*weights, **kw)
    return sae, oracle


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_auxk_codes_loss_parts_and_gradients_equal_the_oracle(variant):
    sae, oracle = _pair(**VARIANTS[variant])
    x = _x(5)
    out = sae(x)
    codes = oracle.codes(x)
    if sae.cfg.batch_topk:
        assert int((codes > 0).sum()) == K * N and int((codes > 0).sum(1).max()) > K  # over the batch, not per row
    torch.testing.assert_close(out.code.dense(), codes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.recon, oracle(x), rtol=1e-5, atol=1e-5)
    got, (parts, _) = sae.loss(x, out), oracle.loss_parts(x)
    assert parts["auxk"] > 0 and set(parts) <= set(got.parts)
    for name, value in parts.items():
        assert got.parts[name] == pytest.approx(float(value.detach()), rel=1e-5, abs=1e-6), name
    ref = oracle.total(parts)
    torch.testing.assert_close(got.total, ref, rtol=1e-5, atol=1e-6)
    got.total.backward()
    ref.backward()
    for name in PARAMS:
        torch.testing.assert_close(getattr(sae, name).grad, getattr(oracle, name).grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_auxk_reaches_the_dead_latents(variant):
    """Without AuxK the dead latents' encoder columns get (almost) no gradient; with it they do, and the
    difference is exactly the oracle's AuxK gradient: the aux term is not a constant."""
    sae, oracle = _pair(**VARIANTS[variant])
    x = _x(5)
    dead = oracle.dead()
    oracle.aux_coef = 0.0
    oracle.loss(x).backward()
    without = oracle.W_enc.grad[:, dead].abs().sum()
    sae.loss(x, sae(x)).total.backward()
    assert sae.W_enc.grad[:, dead].abs().sum() > 2 * without


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_auxk_training_steps_equal_the_oracle(variant):
    sae, oracle = _pair(seed=2, **VARIANTS[variant])
    opt_s = torch.optim.Adam(sae.parameters(), lr=1e-2)
    opt_o = torch.optim.Adam(oracle.parameters(), lr=1e-2)
    n_dead = []
    for step in range(5):
        x = _x(10 + step)
        n_dead.append(int(oracle.dead().sum()))
        saekit_step(sae, opt_s, x)
        oracle.step(opt_o, x)
        assert torch.equal(sae.tokens_since_fired, oracle.since), f"dead counters after step {step}"
    assert min(n_dead) > 0  # AuxK is in play at every step
    for name in PARAMS:
        torch.testing.assert_close(getattr(sae, name).detach(), getattr(oracle, name).detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n} after 5 steps: {m}")
    if sae.cfg.batch_topk:
        assert float(sae.threshold) == pytest.approx(oracle.threshold, rel=1e-5)
        sae.eval()
        oracle.eval()
        x = _x(99)
        codes = oracle.codes(x)
        assert (codes > 0).sum(1).float().std() > 0  # the threshold gives rows different L0s
        torch.testing.assert_close(sae(x).code.dense(), codes, rtol=1e-5, atol=1e-6)


def test_batchtopk_inference_before_any_threshold_is_rowwise_topk():
    """Until a training batch has set the threshold, inference falls back to each row's top-k."""
    sae, oracle = _pair(batch_topk=True)
    sae.eval()
    oracle.eval()
    x = _x(7)
    assert float(sae.threshold) < 0 and oracle.threshold is None
    torch.testing.assert_close(sae(x).code.dense(), oracle.codes(x), rtol=1e-5, atol=1e-6)
