"""Promise 5's decoder-norm half: `fold_W_dec_norm` (SAELens's name) moves each decoder row's norm into the
encoder. Over the registry, on a decoder with rows of norm 0.3-3: the reconstruction on raw inputs is
unchanged within 1e-5 (b_dec included), each latent's code is multiplied by its row's norm, the rows
come out unit norm; architectures whose selection the fold would change raise NotImplementedError."""

from __future__ import annotations

import copy

import pytest
import torch

from saekit.sae.registry import architectures, create

D_IN, D_SAE, N = 16, 48, 64
FOLDS = {"relu", "jumprelu", "gated"}  # the architectures for which folding is valid
VARIANTS = [(a, {}) for a in architectures() if not a.startswith("test_")] + [
    ("relu", {"apply_b_dec_to_input": False}), ("jumprelu", {"apply_b_dec_to_input": True})]


def _sae(arch: str, seed: int = 0, **cfg):
    """Every per-latent tensor moved off its init, decoder rows of norm 0.3-3 (permuted), eval mode."""
    extra = {"k": 4} if arch in ("topk", "matryoshka", "mp") else {}
    sae = create({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "seed": seed, **extra, **cfg}).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        if arch == "jumprelu":  # thresholds that let some latents through and stop others
            sae.threshold.copy_(0.05 + 0.5 * torch.rand(D_SAE, generator=g))
        sae.W_dec.mul_(torch.linspace(0.3, 3.0, D_SAE)[torch.randperm(D_SAE, generator=g)][:, None])
    return sae


def _x(seed: int = 3):
    return 2.0 * torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,cfg", VARIANTS, ids=[f"{a}{'-' + str(c) if c else ''}" for a, c in VARIANTS])
def test_folding_decoder_norms_keeps_reconstructions_and_scales_codes(arch, cfg):
    sae = _sae(arch, **cfg)
    x = _x()
    before = {n: t.detach().clone() for n, t in sae.state_dict().items()}
    if arch not in FOLDS:
        with pytest.raises(NotImplementedError, match=arch):
            sae.fold_W_dec_norm()
        assert all(torch.equal(before[n], t) for n, t in sae.state_dict().items())  # nothing half-folded
        return
    norms_F = sae.W_dec.detach().norm(dim=1)
    with torch.no_grad():
        out = sae(x)
        folded = copy.deepcopy(sae).fold_W_dec_norm()
        got = folded(x)
    codes = out.code.dense()
    assert 0 < int((codes != 0).sum()) < codes.numel()  # some latents fire, some do not
    torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(D_SAE), rtol=0, atol=1e-6)
    torch.testing.assert_close(got.recon, out.recon, rtol=1e-5, atol=1e-5 * float(out.recon.abs().max()))
    torch.testing.assert_close(got.code.dense(), codes * norms_F, rtol=1e-5, atol=1e-6)


def test_relu_l1_after_folding_is_the_decoder_weighted_l1_before():
    """With unit rows the plain L1 of the folded codes is the decoder-norm-weighted L1 of the original:
    the loss (and every part of it) is the same before and after folding."""
    sae = _sae("relu")
    x = _x()
    with torch.no_grad():
        want = sae.loss(x, sae(x)).parts
        folded = copy.deepcopy(sae).fold_W_dec_norm()
        got = folded.loss(x, folded(x)).parts
    assert want["l1"] > 0
    for name in ("mse", "l1", "l0"):
        assert got[name] == pytest.approx(want[name], rel=1e-5), name


def test_a_zero_decoder_row_stays_zero_and_nothing_becomes_nan():
    sae = _sae("relu")
    with torch.no_grad():
        sae.W_dec[5].zero_()
    x = _x()
    with torch.no_grad():
        want = sae(x).recon
        folded = copy.deepcopy(sae).fold_W_dec_norm()
        got = folded(x)
    assert all(bool(torch.isfinite(p).all()) for p in folded.parameters())
    assert bool((folded.W_dec[5] == 0).all())
    torch.testing.assert_close(got.recon, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
