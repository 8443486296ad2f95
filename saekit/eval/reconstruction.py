"""Reconstruction and sparsity metrics: pure functions plus an exact streaming accumulator.

Why streaming: an evaluation set can be far larger than memory. `ReconstructionAccumulator`
takes batches of `(x, recon, code)` and keeps only per-dimension and per-latent sums, so memory is
`O(d_in + d_sae + max L0)` whatever the row count.

Conventions (docs/RELIABILITY.md 33):

- FVU (fraction of variance unexplained) = Σ‖x − x̂‖² / Σ‖x − x̄‖², with x̄ the *per-dimension
  mean* over all rows (not zero). Explained variance EV = 1 − FVU, so predicting the mean gives
  EV 0 and a perfect reconstruction gives EV 1.
- The streaming total variance merges per-batch means and centred sums of squares in float64
  (Chan et al.'s pairwise update), so it equals the one-shot value up to float64 rounding even
  when the mean is large compared with the spread.
- A latent's density is (rows on which it fires) / rows; a latent that never fires has density
  0 (not NaN). "Dead" latents have density ≤ `dead_threshold` (default 0: never fired),
  "dense" latents fire on more than `dense_threshold` of rows.
- Shrinkage is the mean over rows of ‖x̂‖/‖x‖ (rows with ‖x‖ = 0 are skipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.errors import ShapeMismatchError
from saekit.sae.base import SparseCode

DEFAULT_DENSE_THRESHOLD = 0.1
DENSITY_BIN_WIDTH = 0.25  # width of the log10-density histogram bins


# ---------------------------------------------------------------------------------------------
# pure functions (whole tensors in memory)
# ---------------------------------------------------------------------------------------------
def _flat2(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _check_pair(x: Tensor, recon: Tensor) -> None:
    if x.shape != recon.shape:
        raise ShapeMismatchError(f"reconstruction: expected recon with the input's shape {tuple(x.shape)}, "
                                 f"found {tuple(recon.shape)}")


def mse(x: Tensor, recon: Tensor) -> float:
    """Mean squared error per element."""
    _check_pair(x, recon)
    return float((x.double() - recon.double()).pow(2).mean())


def total_variance(x: Tensor) -> float:
    """Σ over rows and dimensions of (x − per-dimension mean)², in float64."""
    x_ND = _flat2(x).double()
    return float((x_ND - x_ND.mean(0)).pow(2).sum())


def fvu(x: Tensor, recon: Tensor) -> float:
    """Fraction of variance unexplained around the per-dimension mean (NaN if x has no variance)."""
    _check_pair(x, recon)
    sse = float((x.double() - recon.double()).pow(2).sum())
    tv = total_variance(x)
    return sse / tv if tv > 0 else math.nan


def explained_variance(x: Tensor, recon: Tensor) -> float:
    """1 − FVU."""
    return 1.0 - fvu(x, recon)


def cosine_rows(x: Tensor, recon: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine between each row and its reconstruction, `[N]` (float64)."""
    _check_pair(x, recon)
    x_ND, r_ND = _flat2(x).double(), _flat2(recon).double()
    return (x_ND * r_ND).sum(-1) / (x_ND.norm(dim=-1) * r_ND.norm(dim=-1)).clamp_min(eps)


def shrinkage_rows(x: Tensor, recon: Tensor) -> Tensor:
    """‖x̂‖/‖x‖ per row, `[N']` over the rows with ‖x‖ > 0."""
    _check_pair(x, recon)
    xn = _flat2(x).double().norm(dim=-1)
    rn = _flat2(recon).double().norm(dim=-1)
    keep = xn > 0
    return rn[keep] / xn[keep]


def firing_counts(code: SparseCode) -> Tensor:
    """How many rows each latent fires on, `[d_sae]` int64 (slots with value 0 are inactive)."""
    idx = code.indices.reshape(-1)
    active = (code.values.reshape(-1) != 0)
    return torch.bincount(idx[active], minlength=code.d_sae)[: code.d_sae]


def latent_density(counts_F: Tensor, n_rows: int) -> Tensor:
    """count / rows, float64; 0 for never-firing latents, and all zeros when there are no rows."""
    counts_F = counts_F.double()
    return counts_F / n_rows if n_rows > 0 else torch.zeros_like(counts_F)


def density_histogram(density_F: Tensor, n_rows: int, bin_width: float = DENSITY_BIN_WIDTH) -> dict:
    """Histogram of log10(density) over live latents; dead latents (density 0) counted apart.

    Edges run from floor(log10(1/n_rows)) (the smallest non-zero density) to 0 in steps of
    `bin_width`, so every live latent falls in a bin.
    """
    density_F = density_F.double()
    live = density_F[density_F > 0]
    lo = math.floor(math.log10(1.0 / n_rows)) if n_rows > 0 else -1.0
    lo = min(lo, math.floor(float(live.log10().min()))) if live.numel() else lo
    n_bins = max(1, int(round(-lo / bin_width)))
    edges = torch.linspace(lo, 0.0, n_bins + 1, dtype=torch.float64)
    if live.numel():
        b = torch.bucketize(live.log10(), edges, right=True) - 1
        counts = torch.bincount(b.clamp(0, n_bins - 1), minlength=n_bins)
    else:
        counts = torch.zeros(n_bins, dtype=torch.int64)
    return {"log10_edges": [round(float(e), 6) for e in edges], "counts": counts.tolist(),
            "dead": int((density_F == 0).sum()), "live": int(live.numel())}


# ---------------------------------------------------------------------------------------------
# streaming accumulator
# ---------------------------------------------------------------------------------------------
@dataclass
class RunningMoments:
    """Running count, per-dimension mean and centred sum of squares (float64, Chan et al. merge)."""

    n: int
    mean_D: Tensor
    m2_D: Tensor

    def update(self, x_ND: Tensor, exact: bool = True) -> None:
        """Merge a batch. `exact=False` takes the batch's variance from `torch.var_mean` in the input
        dtype (float64 accumulation on CPU; only the float32 result is rounded, ~1e-7 relative)."""
        nb = x_ND.shape[0]
        if nb == 0:
            return
        if exact:
            xb = x_ND.double()
            mean_b = xb.mean(0)
            m2_b = (xb - mean_b).pow(2).sum(0)
        else:
            var_b, mean_b = torch.var_mean(x_ND, dim=0, correction=0)
            mean_b, m2_b = mean_b.double(), var_b.double() * nb
        m2_b = m2_b.to(self.m2_D.device)
        mean_b = mean_b.to(self.mean_D.device)
        n = self.n + nb
        delta = mean_b - self.mean_D
        self.mean_D = self.mean_D + delta * (nb / n)
        self.m2_D = self.m2_D + m2_b + delta.pow(2) * (self.n * nb / n)
        self.n = n

    @property
    def total(self) -> float:
        return float(self.m2_D.sum())


class ReconstructionAccumulator:
    """Accumulates reconstruction and sparsity statistics over batches, exactly, in float64.

    `update(x, recon, code)` takes any leading shape (`[N, d_in]` or `[B, T, d_in]`); `result()`
    returns a plain dict (see `summarise`'s keys).
    """

    def __init__(self, d_in: int, d_sae: int, dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
                 dead_threshold: float = 0.0):
        self.d_in, self.d_sae = d_in, d_sae
        self.dense_threshold, self.dead_threshold = dense_threshold, dead_threshold
        self.moments = RunningMoments(0, torch.zeros(d_in, dtype=torch.float64), torch.zeros(d_in, dtype=torch.float64))
        self.sse = 0.0
        self.cos_sum = 0.0
        self.shrink_sum = 0.0
        self.shrink_rows = 0
        self.counts_F = torch.zeros(d_sae, dtype=torch.int64)
        self.l0_hist = torch.zeros(1, dtype=torch.int64)

    @property
    def n_rows(self) -> int:
        return self.moments.n

    def update(self, x: Tensor, recon: Tensor, code: SparseCode) -> None:
        _check_pair(x, recon)
        if x.shape[-1] != self.d_in:
            raise ShapeMismatchError(f"reconstruction: expected x [..., d_in={self.d_in}], found {tuple(x.shape)}")
        if code.d_sae != self.d_sae:
            raise ShapeMismatchError(f"reconstruction: expected a code over d_sae={self.d_sae}, found {code.d_sae}")
        x_ND, r_ND = _flat2(x).detach().double(), _flat2(recon).detach().double()
        if code.indices.reshape(-1, code.indices.shape[-1]).shape[0] != x_ND.shape[0]:
            raise ShapeMismatchError(f"reconstruction: code has {code.indices.shape[:-1]} rows, x has {x.shape[:-1]}")
        self.moments.update(x_ND)
        sse_N, cos_N = (x_ND - r_ND).pow(2).sum(-1), cosine_rows(x_ND, r_ND)
        self.sse += float(sse_N.sum())
        self.cos_sum += float(cos_N.sum())
        sh = shrinkage_rows(x_ND, r_ND)
        self.shrink_sum += float(sh.sum())
        self.shrink_rows += int(sh.numel())
        code = code.detach()
        self.counts_F += firing_counts(code).cpu()
        l0_N = code.l0().reshape(-1).cpu()
        # the batch's per-row figures, for per-document sums (the bootstrap intervals) without recomputing
        self.last_rows = {"sse": sse_N, "cos": cos_N, "l0": l0_N}
        h = torch.bincount(l0_N)
        if h.numel() > self.l0_hist.numel():
            self.l0_hist = torch.cat([self.l0_hist, self.l0_hist.new_zeros(h.numel() - self.l0_hist.numel())])
        self.l0_hist[: h.numel()] += h

    def result(self) -> dict:
        n = self.n_rows
        tv = self.moments.total
        fvu_ = self.sse / tv if tv > 0 else math.nan
        density_F = latent_density(self.counts_F, n)
        l0_values = torch.arange(self.l0_hist.numel(), dtype=torch.float64)
        l0_mean = float((l0_values * self.l0_hist).sum() / n) if n else math.nan
        l0_var = float(((l0_values - l0_mean).pow(2) * self.l0_hist).sum() / n) if n else math.nan
        return {
            "n_rows": n,
            "mse": self.sse / (n * self.d_in) if n else math.nan,
            "sse_per_row": self.sse / n if n else math.nan,
            "total_variance_per_row": tv / n if n else math.nan,
            "fvu": fvu_,
            "explained_variance": 1.0 - fvu_,
            "cosine_mean": self.cos_sum / n if n else math.nan,
            "shrinkage_mean": self.shrink_sum / self.shrink_rows if self.shrink_rows else math.nan,
            "l0_mean": l0_mean,
            "l0_std": math.sqrt(l0_var) if n else math.nan,
            "l0_histogram": {"l0": list(range(self.l0_hist.numel())), "counts": self.l0_hist.tolist()},
            "dead_fraction": float((density_F <= self.dead_threshold).double().mean()),
            "dense_fraction": float((density_F > self.dense_threshold).double().mean()),
            "dead_threshold": self.dead_threshold,
            "dense_threshold": self.dense_threshold,
            "density_histogram": density_histogram(density_F, n),
        }

    @property
    def density_F(self) -> Tensor:
        return latent_density(self.counts_F, self.n_rows)


def reconstruction_metrics(x: Tensor, recon: Tensor, code: SparseCode, **kwargs) -> dict:
    """All reconstruction/sparsity metrics for one in-memory batch (the accumulator, once)."""
    acc = ReconstructionAccumulator(x.shape[-1], code.d_sae, **kwargs)
    acc.update(x, recon, code)
    return acc.result()
