"""Row-norm statistics and massive-activation outliers of an activation store.

Why: an LLM's residual stream has a few "massive activations" (Sun et al. 2024): in the main job's
SmolLM2 store, 55 of 95,006 rows (position 1, the first real token) have norms of 1,077–22,092
while the median norm is ~176 and the 99th percentile ~216; those 55 rows hold 77 % of the store's
variance. Left in, they decide the training loss, the input normalisation and the headline FVU.
The store keeps every row (nothing is lost) and marks them in an `outlier` column of each shard,
so training can leave them out, evaluation can report them apart and the browser can mark them.

The rule (`OutlierRule`): a row is an outlier when its L2 norm exceeds `multiple` × the median row
norm of its shard. The median is the shard's because a shard is the unit the writer writes (and
resumes) on its own; a shard holds `docs_per_shard` whole documents (thousands of rows in the main
job, where the median is ~176 at every position), so its median is the store's to well under 1 %.
The default multiple, 4, sits far above ordinary rows (p99 / median ≈ 1.23) and far below the
measured outliers (≥ 6 × the median). Contexts without a shard (splice-in evaluation, the browser's
live page) use `multiple` × the store's median norm recorded in the manifest.

Norms are computed once, in float64 from the stored values (after the store's dtype cast), so a
store cached before this column existed derives exactly the same mask on the fly (`reader`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

DEFAULT_MULTIPLE = 4.0
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999)
# position buckets of LLM stores, [lo, hi) (hi None = no upper bound); embedding stores have one
POSITION_BUCKETS = ((0, 1), (1, 2), (2, 3), (3, 8), (8, 32), (32, None))
EMBEDDING_BUCKET = "all"


@dataclass(frozen=True)
class OutlierRule:
    """Which rows are massive-activation outliers: `norm > multiple × median norm` (of the shard)."""

    multiple: float = DEFAULT_MULTIPLE
    reference: str = "shard median row norm"

    def describe(self) -> str:
        return f"row L2 norm > {self.multiple:g} x the {self.reference}"

    def to_json(self) -> dict:
        return {**asdict(self), "description": self.describe()}

    @classmethod
    def from_json(cls, data: dict | None) -> "OutlierRule":
        data = data or {}
        return cls(multiple=float(data.get("multiple", DEFAULT_MULTIPLE)),
                   reference=str(data.get("reference", cls.reference)))

    def flag(self, norm_N: Tensor) -> Tensor:
        """Outlier mask `[N]` (bool) of one shard's row norms."""
        if norm_N.numel() == 0:
            return torch.zeros(0, dtype=torch.bool)
        median = float(norm_N.double().median())
        return norm_N.double() > self.multiple * median


def row_norms(acts_ND: Tensor) -> Tensor:
    """L2 norm of every row, float32 `[N]`, computed in float64 (the same values however rows are batched)."""
    return acts_ND.double().pow(2).sum(-1).sqrt().float()


def bucket_name(lo: int, hi: int | None) -> str:
    if hi is None:
        return f"pos {lo}+"
    return f"pos {lo}" if hi == lo + 1 else f"pos {lo}-{hi - 1}"


def _bucket_masks(pos_N: np.ndarray) -> dict[str, np.ndarray]:
    if len(pos_N) and (pos_N < 0).all():
        return {EMBEDDING_BUCKET: np.ones(len(pos_N), dtype=bool)}
    return {bucket_name(lo, hi): (pos_N >= lo) & ((pos_N < hi) if hi is not None else True)
            for lo, hi in POSITION_BUCKETS}


def _summary(norm_N: np.ndarray, outlier_N: np.ndarray, total_sq: float) -> dict:
    n = int(len(norm_N))
    sq = float((norm_N.astype(np.float64) ** 2).sum())
    out = {"rows": n, "outliers": int(outlier_N.sum()), "sq_norm_share": sq / total_sq if total_sq > 0 else 0.0}
    if n:
        qs = np.quantile(norm_N.astype(np.float64), QUANTILES)
        out["quantiles"] = {f"p{q * 100:g}": round(float(v), 6) for q, v in zip(QUANTILES, qs)}
        out["max"] = round(float(norm_N.max()), 6)
    return out


def norm_statistics(norm_N: np.ndarray, pos_N: np.ndarray, outlier_N: np.ndarray, rule: OutlierRule) -> dict:
    """The manifest's `norm_stats`: the whole store's and each position bucket's norm quantiles, row and
    outlier counts, and share of the store's sum of squared norms; plus the rule and the outliers' share."""
    norm_N, outlier_N = np.asarray(norm_N, dtype=np.float32), np.asarray(outlier_N, dtype=bool)
    total_sq = float((norm_N.astype(np.float64) ** 2).sum())
    store = _summary(norm_N, outlier_N, total_sq)
    median = float(np.median(norm_N.astype(np.float64))) if len(norm_N) else 0.0
    buckets = {name: _summary(norm_N[m], outlier_N[m], total_sq) for name, m in _bucket_masks(np.asarray(pos_N)).items()}
    out_sq = float((norm_N[outlier_N].astype(np.float64) ** 2).sum())
    return {"rule": rule.to_json(), "median_norm": round(median, 6),
            "outlier_threshold_norm": round(rule.multiple * median, 6),
            "outliers": int(outlier_N.sum()), "outlier_fraction": float(outlier_N.mean()) if len(norm_N) else 0.0,
            "outlier_sq_norm_share": out_sq / total_sq if total_sq > 0 else 0.0,
            "store": store, "buckets": {k: v for k, v in buckets.items() if v["rows"]}}


def describe_statistics(stats: dict | None) -> str:
    """One line for logs and the CLI: how many rows are outliers and how much of the norm they hold."""
    if not stats:
        return "no norm statistics recorded (store cached before they existed)"
    return (f"{stats['outliers']} of {stats['store']['rows']} rows are massive-activation outliers "
            f"({stats['rule']['description']}; median norm {stats['median_norm']:.4g}); they hold "
            f"{stats['outlier_sq_norm_share']:.1%} of the sum of squared norms")
