"""Promise 39 for top-k: saekit's sparse top-k SAE equals a vendored dense oracle (tests/support/oracles.py)
in codes, reconstructions, loss and gradients at a fixed seed, and after several Adam steps."""

from __future__ import annotations

import torch
from support.oracles import NaiveTopK

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
        loss = sae.loss(x, sae(x))
        opt_s.zero_grad(set_to_none=True)
        loss.total.backward()
        sae.before_optimizer_step()
        opt_s.step()
        sae.after_optimizer_step()
        oracle.step(opt_o, x)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).detach(), getattr(oracle, name).detach(), rtol=1e-4, atol=1e-5)
