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
    """Per column: best accuracy `[F]`, its threshold `[F]` and sign `[F]` (+1: above predicts positive).
    With labels `[L, N]` (several labels, one sort): `[L, F]` each."""
    many = y_N.ndim == 2
    y_LN = y_N if many else y_N[None]
    if X_NF.ndim != 2 or X_NF.shape[0] != y_LN.shape[1] or X_NF.shape[0] < 1:
        raise ShapeMismatchError(f"best_thresholds: expected X [N, F] and y [N] (or [L, N]) with N >= 1, found "
                                 f"{tuple(X_NF.shape)} and {tuple(y_N.shape)}")
    v_NF, order = X_NF.double().sort(0)
    valid = torch.ones(X_NF.shape[0] + 1, X_NF.shape[1], dtype=torch.bool)
    valid[1:-1] = v_NF[1:] > v_NF[:-1]  # a cut between equal values is no threshold
    lo_edge = torch.cat([v_NF[:1] - 1, v_NF])
    hi_edge = torch.cat([v_NF, v_NF[-1:] + 1])
    outs = [_best_cut(y.double()[order], valid, lo_edge, hi_edge) for y in y_LN]
    acc, thr, sign = (torch.stack(t) for t in zip(*outs))
    return (acc, thr, sign) if many else (acc[0], thr[0], sign[0])


def _best_cut(y_NF: Tensor, valid: Tensor, lo_edge: Tensor, hi_edge: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One label's best cut of the sorted columns (`y_NF`: the label in each column's sorted order)."""
    N = y_NF.shape[0]
    cum_pos = torch.cat([torch.zeros(1, y_NF.shape[1], dtype=torch.float64), y_NF.cumsum(0)])  # positives below
    i = torch.arange(N + 1, dtype=torch.float64)[:, None]
    acc_up = ((i - cum_pos) + (y_NF.sum(0) - cum_pos)) / N  # the i smallest predicted negative
    acc_down = torch.where(valid, 1 - acc_up, -1.0)
    acc_up = torch.where(valid, acc_up, -1.0)
    best_up, at_up = acc_up.max(0)
    best_down, at_down = acc_down.max(0)
    sign = torch.where(best_up >= best_down, 1, -1)
    at = torch.where(sign > 0, at_up, at_down)[None]
    return torch.maximum(best_up, best_down), (lo_edge.gather(0, at)[0] + hi_edge.gather(0, at)[0]) / 2, sign


def best_column(columns: Iterator[tuple[int, Tensor]], y_N: Tensor) -> ColumnRule | list[ColumnRule]:
    """The best column over chunks `(first_column_index, X_chunk [N, f])` of a wide matrix; with labels
    `[L, N]`, one rule per label (the chunks are read and sorted once)."""
    y_LN = y_N if y_N.ndim == 2 else y_N[None]
    best = [ColumnRule(-1, 0.0, 1, -1.0) for _ in range(y_LN.shape[0])]
    for start, X_Nf in columns:
        acc_L, thr_L, sign_L = best_thresholds(X_Nf, y_LN)
        for lab, (acc, thr, sign) in enumerate(zip(acc_L, thr_L, sign_L)):
            j = int(acc.argmax())
            if float(acc[j]) > best[lab].train_accuracy:
                best[lab] = ColumnRule(start + j, float(thr[j]), int(sign[j]), float(acc[j]))
    return best if y_N.ndim == 2 else best[0]


def dense_chunks(X_NF: Tensor, width: int = 256) -> Iterator[tuple[int, Tensor]]:
    for s in range(0, X_NF.shape[1], width):
        yield s, X_NF[:, s: s + width]


def choose_and_score(train_cols: Callable[[], Iterator[tuple[int, Tensor]]], y_train_N: Tensor,
                     test_column: Callable[[int], Tensor], y_test_N: Tensor):
    """Choose column and threshold on training rows; return the rule and per-test-row correctness `[N_test]`
    (bootstrap it for an interval). With labels `[L, N]`: a list of (rule, correctness), one per label."""
    rules = best_column(train_cols(), y_train_N)
    if y_train_N.ndim == 1:
        return rules, rules.predict(test_column(rules.column)) == y_test_N.bool()
    return [(r, r.predict(test_column(r.column)) == y.bool()) for r, y in zip(rules, y_test_N)]
