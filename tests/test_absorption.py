"""Absorption (issue 23), the best single feature, and adaptive-length retrieval: known answers."""

from __future__ import annotations

import torch

from saekit.analysis.absorption import absorption
from saekit.analysis.single_feature import best_thresholds, choose_and_score, dense_chunks


def _code(rows: list[list[int]], k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.zeros(len(rows), k, dtype=torch.long)
    vals = torch.zeros(len(rows), k)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        vals[i, :len(r)] = 1.0
    return idx, vals


def test_absorption_counts_positives_the_best_latent_misses_while_a_specific_one_fires():
    # concept rows 0-7: latent 0 (general) fires on 0-4; rows 5, 6 only have latent 1 (specific, always positive);
    # row 7 has latent 3, which also fires on negatives (not specific). Negatives 8-11: latent 2 or 3.
    rows = [[0], [0], [0], [0, 1], [0], [1], [1], [3], [2], [2], [3], [3]]
    idx, vals = _code(rows)
    y = torch.tensor([1] * 8 + [0] * 4)
    a = absorption(idx, vals, y, d_sae=4, min_support=2)
    assert a.best_latent == 0 and a.specific_latents == [1]
    assert a.best_recall == 5 / 8 and a.best_miss_rate == 3 / 8 and a.absorption_rate == 2 / 8
    assert a.absorbed_N.nonzero().flatten().tolist() == [5, 6]
    assert a.to_dict()["n_specific_latents"] == 1


def test_no_absorption_when_the_general_latent_always_fires():
    rows = [[0, 1], [0], [0, 1], [0], [2], [2]]
    idx, vals = _code(rows)
    a = absorption(idx, vals, torch.tensor([1, 1, 1, 1, 0, 0]), d_sae=3, min_support=1)
    assert a.best_latent == 0 and a.absorption_rate == 0 and a.best_miss_rate == 0


def test_candidates_restrict_the_best_latent():
    rows = [[0], [0], [0], [1], [2], [2]]
    idx, vals = _code(rows)
    a = absorption(idx, vals, torch.tensor([1, 1, 1, 1, 0, 0]), d_sae=3, min_support=1,
                   candidates_F=torch.tensor([False, True, False]))
    assert a.best_latent == 1 and a.absorption_rate == 3 / 4  # latent 0 is specific and takes rows 0-2


def test_best_threshold_respects_ties_and_both_directions():
    X = torch.tensor([[0.0, 5.0], [0.0, 4.0], [0.0, 1.0], [2.0, 0.0]])
    y = torch.tensor([1, 0, 1, 0])
    acc, thr, sign = best_thresholds(X, y)
    # column 0: zeros cannot be split: best is "<= 1 -> positive" (rows 0-2 positive): 3/4
    assert acc[0] == 0.75 and sign[0] == -1 and 0 < thr[0] < 2
    assert acc[1] == 0.75  # 5, 4, 1, 0 with labels 1, 0, 1, 0: no cut gets more than three right
    y2 = torch.tensor([0, 0, 1, 1])
    acc2, thr2, sign2 = best_thresholds(X[:, 1:], y2)
    assert acc2[0] == 1.0 and sign2[0] == -1 and 1 < thr2[0] < 4


def test_choose_on_train_score_on_test():
    g = torch.Generator().manual_seed(0)
    y_tr, y_te = torch.randint(0, 2, (200,), generator=g), torch.randint(0, 2, (100,), generator=g)
    noise = lambda n: torch.randn(n, 6, generator=g)  # noqa: E731
    X_tr, X_te = noise(200), noise(100)
    X_tr[:, 4] += 3 * y_tr
    X_te[:, 4] += 3 * y_te
    rule, correct = choose_and_score(lambda: dense_chunks(X_tr, 4), y_tr, lambda j: X_te[:, j], y_te)
    assert rule.column == 4 and rule.sign == 1 and correct.double().mean() > 0.85
    both = choose_and_score(lambda: dense_chunks(X_tr, 4), torch.stack([y_tr, 1 - y_tr]), lambda j: X_te[:, j],
                            torch.stack([y_te, 1 - y_te]))
    assert [(r.column, r.sign) for r, _ in both] == [(4, 1), (4, -1)]
    torch.testing.assert_close(both[0][1], correct)


def test_adaptive_retrieval_known_answers():
    """An identity SAE on non-negative rows: its full code is the embedding (recall 1); rows in a 2-D affine
    plane are exact under PCA-2; raw/PCA views exist only below d_in."""
    from saekit.eval.adaptive_retrieval import adaptive_retrieval, format_table, pca_basis
    from saekit.sae.registry import create

    D = 6
    g = torch.Generator().manual_seed(0)
    plane = torch.randn(2, D, generator=g)
    x = (torch.rand(80, 2, generator=g) @ plane).abs() + 0.5 * torch.rand(80, D, generator=g)
    sae = create({"architecture": "topk", "d_in": D, "d_sae": D, "k": D})
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(D))
        sae.W_dec.copy_(torch.eye(D))
    rows = adaptive_retrieval(sae, x, [2, D], k=5, pca=pca_basis(x, D), resamples=50)
    by = {(r["m"], r["view"]): r for r in rows}
    assert set(by) == {(2, "code"), (2, "recon"), (2, "raw"), (2, "pca"), (D, "code"), (D, "recon")}
    assert by[(D, "code")]["recall@5"]["mean"] == 1.0 and by[(D, "recon")]["ndcg@5"]["mean"] == 1.0
    assert by[(2, "raw")]["recall@5"]["mean"] < 1.0
    lo, hi = by[(2, "raw")]["recall@5"]["ci95"]
    assert lo <= by[(2, "raw")]["recall@5"]["mean"] <= hi
    planar = torch.rand(40, 2, generator=g) @ plane + 3.0
    rows = adaptive_retrieval(sae, planar.abs(), [2], k=5, pca=pca_basis(planar.abs(), 2), resamples=0)
    assert next(r for r in rows if r["view"] == "pca")["recall@5"]["mean"] > 0.99
    assert "| 2 |" in format_table(rows, k=5)
