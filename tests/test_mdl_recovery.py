"""Promise 7 for MDL: trained on rows generated from a known sparse dictionary, the MDL SAE's decoder rows
recover the planted atoms.

Setup: 32 unit atoms in 16 dimensions (2x overcomplete, so atoms interfere), ~3 active per row with
magnitudes in [0.5, 1.5], 32,768 rows; MDL SAE with 64 latents, λ = 1e-2, 2,000 steps of 256 rows.

Thresholds from measured runs of exactly this setup over data and init seeds 0-5:
  target_l0 = 3 (the threshold controller): mean max-cosine 0.963-0.991, fraction of atoms above 0.9
      0.906-1.000  -> asserted: mean >= 0.95 and >= 85 % of atoms above 0.9;
  fixed λ only:  mean 0.929-0.956, fraction above 0.9 0.72-0.84 (L0 settles at ~2.4, below the
      planted 3, so rarer atoms share latents) -> asserted: mean >= 0.9 (the promise) and >= 60 % above 0.9.
The untrained SAE (random unit decoder rows) scores a mean of 0.55-0.57 on the same atoms (seeds 0-5):
the thresholds sit far above what chance alignment of 64 random rows in 16 dimensions gives. (At 600
steps recovery was still 0.67-0.75: the test needs the 2,000 steps, ~10 s each case, hence `slow`.)"""

from __future__ import annotations

import pytest
from support.recovery import recover

from saekit.sae.mdl import MDLConfig, MDLSAE

CASES = {  # name: (extra config, least mean max-cosine, least fraction of atoms above 0.9)
    "target_l0": ({"target_l0": 3.0}, 0.95, 0.85),
    "fixed dl_coef": ({}, 0.90, 0.60),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_mdl_recovers_a_planted_dictionary(case, tmp_path, one_thread):
    extra, least_mean, least_frac = CASES[case]
    r = recover(MDLSAE(MDLConfig(d_in=16, d_sae=64, dl_coef=1e-2, seed=0, **extra)), tmp_path / "run")
    assert r.chance_G.mean() < 0.7, r.summary()  # the untrained rows are far from the atoms: recovery is learnt
    assert r.best_G.mean() >= least_mean, r.summary()
    assert (r.best_G > 0.9).float().mean() >= least_frac, r.summary()
    assert 1.5 < r.l0 < 4.5, f"{r.summary()}: the planted rows have ~3 active atoms"
