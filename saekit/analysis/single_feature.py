"""The best single feature for a binary label: one column and one threshold (a 1-sparse probe, exactly).

Why: "is there one latent for this concept?" is the question absorption and feature splitting are
about. A column predicts the label by `value > t` (or `value <= t`); its best accuracy over all
thresholds comes from one sort (ties respected: a threshold never splits equal values, so a latent
that is 0 on most rows cannot separate inside its zeros). The column and threshold are chosen on
training rows and scored on held-out rows (`choose_and_score`), so the figure is not in-sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.errors import ShapeMismatchError


@dataclass
class ColumnRule:
    """Column `column` predicts positive where `sign * (value - threshold) > 0`; `train_accuracy` in sample."""

    column: int
    threshold: float
    sign: int
    train_accuracy: float

    def predict(self, values_N: Tensor) -> Tensor:
        return (self.sign * (values_N.double() - self.threshold)) > 0


def best_thresholds(X_NF: Tensor, y_N: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per column: best accuracy `[F]`, its threshold `[F]` and sign `[F]` (+1: above predicts positive)."""
    if X_NF.ndim != 2 or X_NF.shape[0] != y_N.shape[0] or X_NF.shape[0] < 1:
        raise ShapeMismatchError(f"best_thresholds: expected X [N, F] and y [N] with N >= 1, found "
                                 f"{tuple(X_NF.shape)} and {tuple(y_N.shape)}")
    N = X_NF.shape[0]
    v_NF, order = X_NF.double().sort(0)
    y_NF = y_N.double()[order]
    zero = torch.zeros(1, X_NF.shape[1], dtype=torch.float64)
    cum_pos = torch.cat([zero, y_NF.cumsum(0)])  # [N+1, F]: positives among the i smallest
    i = torch.arange(N + 1, dtype=torch.float64)[:, None]
    acc_up = ((i - cum_pos) + (y_NF.sum(0) - cum_pos)) / N  # the i smallest predicted negative
    valid = torch.ones(N + 1, X_NF.shape[1], dtype=torch.bool)
    valid[1:N] = v_NF[1:] > v_NF[:-1]  # a cut between equal values is no threshold
    acc_up = torch.where(valid, acc_up, torch.full_like(acc_up, -1.0))
    acc_down = torch.where(valid, 1 - acc_up, torch.full_like(acc_up, -1.0))
    best_up, at_up = acc_up.max(0)
    best_down, at_down = acc_down.max(0)
    sign = torch.where(best_up >= best_down, 1, -1)
    at = torch.where(sign > 0, at_up, at_down)
    lo = torch.cat([v_NF[:1] - 1, v_NF]).gather(0, at[None])[0]
    hi = torch.cat([v_NF, v_NF[-1:] + 1]).gather(0, at[None])[0]
    return torch.maximum(best_up, best_down), (lo + hi) / 2, sign


def best_column(columns: Iterator[tuple[int, Tensor]], y_N: Tensor) -> ColumnRule:
    """The best column over chunks `(first_column_index, X_chunk [N, f])` of a wide matrix."""
    best = ColumnRule(-1, 0.0, 1, -1.0)
    for start, X_Nf in columns:
        acc, thr, sign = best_thresholds(X_Nf, y_N)
        j = int(acc.argmax())
        if float(acc[j]) > best.train_accuracy:
            best = ColumnRule(start + j, float(thr[j]), int(sign[j]), float(acc[j]))
    return best


def dense_chunks(X_NF: Tensor, width: int = 256) -> Iterator[tuple[int, Tensor]]:
    for s in range(0, X_NF.shape[1], width):
        yield s, X_NF[:, s: s + width]


def choose_and_score(train_cols: Callable[[], Iterator[tuple[int, Tensor]]], y_train_N: Tensor,
                     test_column: Callable[[int], Tensor], y_test_N: Tensor) -> tuple[ColumnRule, Tensor]:
    """Choose column and threshold on training rows; return the rule and per-test-row correctness `[N_test]`
    (bootstrap it for an interval)."""
    rule = best_column(train_cols(), y_train_N)
    correct_N = rule.predict(test_column(rule.column)) == y_test_N.bool()
    return rule, correct_N
