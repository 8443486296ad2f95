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
import torch

from saekit.data.synthetic import planted_features
from saekit.eval.ground_truth import max_cosine_per_atom
from saekit.sae.mdl import MDLConfig, MDLSAE
from saekit.store.batches import TensorBatches
from saekit.train import TrainConfig, train

CASES = {  # name: (extra config, least mean max-cosine, least fraction of atoms above 0.9)
    "target_l0": ({"target_l0": 3.0}, 0.95, 0.85),
    "fixed dl_coef": ({}, 0.90, 0.60),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_mdl_recovers_a_planted_dictionary(case, tmp_path, one_thread):
    extra, least_mean, least_frac = CASES[case]
    data = planted_features(32768, 16, 32, avg_active=3, seed=0)
    sae = MDLSAE(MDLConfig(d_in=16, d_sae=64, dl_coef=1e-2, seed=0, **extra))
    chance = max_cosine_per_atom(sae.W_dec.detach(), data.D_FD)
    cfg = TrainConfig.from_dict(dict(total_steps=2000, batch_size=256, lr=3e-3, checkpoint_every=0,
                                     progress_bar=False, log_every=2000))
    res = train(sae, TensorBatches(data.x_ND, 256, seed=0), cfg, tmp_path / "run")
    best_G = max_cosine_per_atom(res.sae.W_dec.detach(), data.D_FD)
    summary = f"mean {best_G.mean():.3f}, above 0.9: {(best_G > 0.9).float().mean():.3f}, chance {chance.mean():.3f}"
    assert chance.mean() < 0.7, summary  # the untrained rows are far from the atoms: recovery is learnt
    assert best_G.mean() >= least_mean, summary
    assert (best_G > 0.9).float().mean() >= least_frac, summary
    with torch.no_grad():
        l0 = float(res.sae.eval().encode(data.x_ND[:4096]).l0().float().mean())
    assert 1.5 < l0 < 4.5, f"L0 {l0}: the planted rows have ~3 active atoms"
