"""Matryoshka vs flat top-k on planted hierarchical data (issue 23), same trainer, width and L0.

Regime (close to the Matryoshka-SAE papers' toy trees, in superposition): 16 parents with 16 children each,
children orthogonal offsets that fire only with their parent (`p_child = 1`: every parent comes with one of
its children), two parents per row, d_in 64 for 272 true directions, and an L0 budget (BatchTopK k = 3) below
the 4 true features per row. A flat SAE then saves budget with parent+child combinations: its parent
directions are absorbed into the children. The matryoshka SAE's first prefix must reconstruct without the
children, so it learns the parents -- up to feature hedging: a parent latent that must stand in for its 16
children leans towards their mean, to cosine ~0.973 at best (`hedged_parent_cosines`).

Why the first prefix is 2 x the number of parents and `prefix_selection: nested` (measured, README): with
exactly one first-prefix latent per parent, 1-3 of the 16 settle early on a parent+child combination (cosine
~0.88 with one child) and leave their parents uncovered, so the mean max-cosine was 0.74-0.89 (global
selection, seeds 0-5); a first prefix of 32 covered every parent in 6 of 8 seeds (0.93-0.97), and with each
prefix choosing its own top-k in all 8 (0.970-0.973).
"""

from __future__ import annotations

import math

import pytest
import torch

from saekit.analysis.absorption import absorption
from saekit.data.hierarchical import hedged_parent_cosines, hierarchical_features
from saekit.eval.ground_truth import max_cosine_per_atom
from saekit.sae.registry import create, load_sae
from saekit.store.batches import TensorBatches
from saekit.train import TrainConfig, train

P, K_CHILD, K = 16, 16, 3
D_SAE = P + P * K_CHILD
W1 = 2 * P
N_TRAIN, N_TEST = 8192, 4096


def planted(seed: int = 0):
    return hierarchical_features(N_TRAIN + N_TEST, 64, n_parents=P, children_per_parent=K_CHILD, parents_per_row=2,
                                 child_parent_cos=0.0, p_child=1.0, seed=seed)


def hierarchy_metrics(arch: str, run_dir, seed: int = 0, steps: int = 1500) -> dict:
    """Train one SAE on the planted hierarchy; per parent the best decoder cosine over all latents and over
    the first prefix, and the mean absorption of the parent concepts on fresh rows."""
    data = planted(seed)
    x_tr, x_te = data.x_ND[:N_TRAIN], data.x_ND[N_TRAIN:]
    extra = {"matryoshka_widths": [W1, D_SAE], "prefix_selection": "nested"} if arch == "matryoshka" else {}
    sae = create({"architecture": arch, "d_in": 64, "d_sae": D_SAE, "k": K, "batch_topk": True,
                  "dead_tokens_threshold": 128, "seed": seed, **extra})
    cfg = TrainConfig(total_steps=steps, batch_size=256, lr=3e-3, checkpoint_every=0, progress_bar=False,
                      log_every=steps, eval_every=0, deterministic=False, max_epochs_warning=1e9, seed=seed)
    sae = load_sae(train(sae, TensorBatches(x_tr, 256, seed=seed), cfg, run_dir).final_sae).eval()
    W = sae.W_dec.detach()
    with torch.no_grad():
        code = sae.encode(x_te)
    fires = data.parent_fires_NP[N_TRAIN:]
    rates = [absorption(code.indices, code.values, fires[:, i], D_SAE).absorption_rate for i in range(P)]
    return {"parents_all": max_cosine_per_atom(W, data.parents_PD),
            "parents_first": max_cosine_per_atom(W[:W1], data.parents_PD), "absorption": sum(rates) / P}


def _hedging_optimum(n_children: int, p_child: float) -> float:
    """Closed form for magnitudes uniform in [0.5, 1.5]: the top eigenvector of E[x x^T] over a family's rows in
    the plane (parent, children's mean), E[a^2] = 13/12, E[ab] = 1, |mean offset| = 1/sqrt(K)."""
    m_pp, m_pm, m_mm = 13 / 12, p_child / math.sqrt(n_children), 13 / 12 * p_child / n_children
    return math.cos(0.5 * math.atan2(2 * m_pm, m_pp - m_mm))


@pytest.mark.parametrize("n_children,p_child", [(16, 1.0), (4, 1.0), (4, 0.5), (4, 0.0)])
def test_hedged_parent_cosines_match_the_closed_form(n_children, p_child):
    data = hierarchical_features(20000, 48, n_parents=3, children_per_parent=n_children, parents_per_row=1,
                                 child_parent_cos=0.0, p_child=p_child, seed=1)
    got = hedged_parent_cosines(data)
    assert got.shape == (3,)
    torch.testing.assert_close(got, torch.full((3,), _hedging_optimum(n_children, p_child), dtype=torch.float64),
                               atol=0.01, rtol=0)


@pytest.mark.slow
def test_first_prefix_learns_the_parents_that_a_flat_sae_absorbs(tmp_path):
    """The issue's bar: the first prefix recovers the parent directions with mean max-cosine >= 0.95, while
    a flat top-k at the same total width and L0 stays lower, measured here on the same data (seed 0:
    matryoshka 0.972, every parent 0.966-0.981; flat 0.84)."""
    torch.set_num_threads(1)
    flat = hierarchy_metrics("topk", tmp_path / "topk")
    mat = hierarchy_metrics("matryoshka", tmp_path / "matryoshka")
    bound = hedged_parent_cosines(planted(0))
    summary = {n: {k: round(float(v.mean() if torch.is_tensor(v) else v), 3) for k, v in m.items()}
               for n, m in (("topk", flat), ("matryoshka", mat))} | {"hedging_optimum": round(float(bound.mean()), 3)}
    first, flat_all = mat["parents_first"], flat["parents_all"]
    assert float(first.mean()) >= 0.95, summary
    assert float(first.min()) >= 0.9, summary  # every parent has its own first-prefix latent
    # the first prefix reaches the hedging optimum, not beyond it (the gap to 1 is hedging, not a failure)
    assert float((first - bound).abs().max()) < 0.03, summary
    assert float(flat_all.mean()) < float(first.mean()) - 0.05, summary
    assert flat["absorption"] > 0.2 and mat["absorption"] < 0.75 * flat["absorption"], summary
