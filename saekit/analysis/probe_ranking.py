"""Which features a sparse probe takes: per-feature scores on the training rows, best first.

`mean_diff` ranks by the class-mean difference, `density_norm` by that difference over the feature's
standard deviation (features firing on fewer than `MIN_FIRING_ROWS` rows are noise and never picked),
`l1` by the order in which features enter an L1 logistic path. Dense arrays and scipy sparse
matrices alike; pure functions, split from `probing.py` so the sweep reads apart from the scoring.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from saekit.errors import ConfigError

METHODS = ("mean_diff", "l1", "density_norm")
MIN_FIRING_ROWS = 3


def _col_mean(X, mask: np.ndarray | None = None) -> np.ndarray:
    X = X if mask is None else X[mask]
    return np.asarray(X.mean(axis=0)).ravel()


def _col_std(X) -> np.ndarray:
    sq = X.multiply(X) if sp.issparse(X) else X * X
    return np.sqrt(np.maximum(_col_mean(sq) - _col_mean(X) ** 2, 0))


def _firing_rows(X) -> np.ndarray:
    return np.asarray((X != 0).sum(axis=0)).ravel()


def class_mean_diff(X, y: np.ndarray) -> np.ndarray:
    """mean(X | positive) − mean(X | rest), per feature."""
    return _col_mean(X, y) - _col_mean(X, ~y)


def selection_scores(X, y: np.ndarray, method: str) -> np.ndarray:
    """Per-feature scores (higher = better) for the mean-difference methods."""
    diff = np.abs(class_mean_diff(X, y))
    if method == "mean_diff":
        return diff
    if method == "density_norm":
        score = diff / (_col_std(X) + 1e-8)
        score[_firing_rows(X) < MIN_FIRING_ROWS] = 0.0
        return score
    raise ConfigError(f"probe: unknown selection method '{method}'; expected one of {METHODS}")


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    order = np.lexsort((np.arange(len(scores)), -scores))  # ties by index: deterministic
    return order[:k]


def _scale_columns(X) -> tuple[object, np.ndarray]:
    std = _col_std(X)
    inv = 1.0 / np.where(std > 0, std, 1.0)
    return (X.multiply(inv[None]).tocsr() if sp.issparse(X) else X * inv[None]), inv


def _l1_logreg(C: float):
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):
        return LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", max_iter=200)
    return LogisticRegression(C=C, penalty="l1", solver="liblinear", max_iter=200)


def l1_path_order(X, y: np.ndarray, max_k: int, n_steps: int = 24) -> np.ndarray:
    """Features in the order they enter an L1 logistic path (C growing from the smallest useful value).

    Features entering at the same C are ordered by |coefficient|; if the path ends with fewer than
    `max_k` features, the rest are filled by class-mean difference.
    """
    from sklearn.svm import l1_min_c

    Xs, _ = _scale_columns(X)
    c0 = l1_min_c(Xs, y, loss="log")
    order: list[int] = []
    for C in c0 * np.logspace(0.05, 3, n_steps):
        coef = np.abs(_l1_logreg(C).fit(Xs, y).coef_.ravel())
        new = [int(j) for j in np.argsort(-coef, kind="stable") if coef[j] > 0 and j not in set(order)]
        order.extend(new)
        if len(order) >= max_k:
            break
    if len(order) < max_k:
        rest = [int(j) for j in _top(selection_scores(X, y, "mean_diff"), X.shape[1]) if j not in set(order)]
        order.extend(rest)
    return np.array(order[:max_k])


def rank_features(X, y: np.ndarray, method: str, max_k: int) -> np.ndarray:
    """The `max_k` best features of the training rows `X` for `method`, best first."""
    if method == "l1":
        return l1_path_order(X, y, max_k)
    return _top(selection_scores(X, y, method), max_k)
