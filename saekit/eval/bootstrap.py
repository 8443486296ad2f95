"""Error bars: a seeded, vectorised bootstrap over documents.

Why documents: the rows of one document (its tokens) are strongly correlated, so resampling rows
would make every interval too narrow. Each metric is written as a function of per-document
*sufficient statistics* (sums over the document's rows: squared error, row count, centred sums, ...).
A bootstrap resample is then a vector of multinomial counts `w_G` over the G documents, and every
resampled statistic is one matrix product `W_RG @ s_G...`: 1,000 resamples of an FVU over a few
thousand documents cost a few milliseconds, far below the evaluation pass itself.

    boot = Bootstrap(n_units=G, resamples=1000, seed=0)
    lo, hi = boot.ratio_ci(sse_G, tv_G)                    # a ratio of sums
    lo, hi = boot.ci(lambda S: S["a"] / S["b"], {"a": a_G, "b": b_G})   # any function of resampled sums

Intervals are percentile intervals (2.5 %, 97.5 %) of the resampled statistic. `compare_figures`
says whether two figures are distinguishable (their intervals do not overlap) and the smallest
difference their data can detect (the sum of the two half-widths).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from saekit.errors import ConfigError

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
LEVEL = 0.95


def resample_weights(n_units: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                     dtype: torch.dtype = torch.float64) -> Tensor:
    """Multinomial counts `[R, G]`: row r says how often each unit is drawn in resample r. The counts
    are small integers, exact in float32 too (the dtype does not change the draws)."""
    if n_units < 1 or resamples < 1:
        raise ConfigError(f"bootstrap: expected n_units >= 1 and resamples >= 1, found {n_units}, {resamples}")
    g = torch.Generator().manual_seed(int(seed))
    draws_RG = torch.randint(0, n_units, (resamples, n_units), generator=g)
    W_RG = torch.zeros(resamples, n_units, dtype=dtype)
    W_RG.scatter_add_(1, draws_RG, torch.ones((), dtype=dtype).expand(resamples, n_units))
    return W_RG


def percentile_interval(values_R: Tensor, level: float = LEVEL) -> list[float] | None:
    """[lo, hi] percentiles of the finite resampled values (None when none is finite)."""
    v = values_R[torch.isfinite(values_R)].double()
    if v.numel() == 0:
        return None
    a = (1.0 - level) / 2
    q = torch.quantile(v, torch.tensor([a, 1 - a], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


class Bootstrap:
    """Resample weights over `n_units` documents, shared by every metric of a report (so the
    intervals of related figures come from the same resamples).

    Cost: the weights are drawn once and kept (float32: counts are exact) when they fit in
    `MAX_WEIGHTS` numbers; larger draws are made in chunks of resamples (seeded per chunk, so the same
    weights every time) and redrawn per call, so memory stays near `MAX_WEIGHTS` numbers whatever G
    is. `values` stacks every statistic into one `[G, M]` matrix: one float32 product per chunk for
    all of them, the metric itself then computed in float64 on the `[R, M]` resampled sums."""

    MAX_WEIGHTS = 1 << 24

    def __init__(self, n_units: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED):
        if n_units < 1 or resamples < 1:
            raise ConfigError(f"bootstrap: expected n_units >= 1 and resamples >= 1, found {n_units}, {resamples}")
        self.n_units, self.resamples, self.seed = int(n_units), int(resamples), int(seed)
        self.chunk = max(1, min(self.resamples, self.MAX_WEIGHTS // self.n_units))
        self._kept: Tensor | None = None

    def replicate_weights(self) -> Iterator[Tensor]:
        """The resample weights `[R_chunk, n_units]` (float32 counts), chunk by chunk, the same every call.

        Public for statistics that are not a function of per-unit sums (`values` covers those): a caller
        that needs each resample's weights itself (scripts/mdl_real.py resamples per-document histograms
        through a sparse product) draws exactly the resamples every other figure of the report uses."""
        if self._kept is not None and self._kept.shape[0] == self.chunk == self.resamples:
            yield self._kept
            return
        for i, lo in enumerate(range(0, self.resamples, self.chunk)):
            W_RG = resample_weights(self.n_units, min(self.chunk, self.resamples - lo), self.seed * 1_000_003 + i,
                                    torch.float32)
            if self.chunk == self.resamples:
                self._kept = W_RG
            yield W_RG

    def values(self, fn: Callable[[dict[str, Tensor]], Tensor], stats: dict[str, Tensor]) -> Tensor:
        """`fn(resampled sums)` for every resample, `[R]`; `stats` maps names to per-unit statistics."""
        for k, v in stats.items():
            if v.shape[0] != self.n_units:
                raise ConfigError(f"bootstrap: expected '{k}' over {self.n_units} units, found {tuple(v.shape)}")
        cols = [v.reshape(self.n_units, -1).float() for v in stats.values()]
        bounds = torch.tensor([0] + [c.shape[1] for c in cols]).cumsum(0).tolist()
        S_GM = torch.cat(cols, 1)
        out = []
        for W_RG in self.replicate_weights():
            P_RM = (W_RG @ S_GM).double()
            out.append(fn({k: P_RM[:, a:b].reshape(-1, *v.shape[1:])
                           for (k, v), a, b in zip(stats.items(), bounds, bounds[1:])}))
        return torch.cat(out)

    def ci(self, fn: Callable[[dict[str, Tensor]], Tensor], stats: dict[str, Tensor],
           level: float = LEVEL) -> list[float] | None:
        """Percentile interval of `fn(resampled sums)`."""
        return percentile_interval(self.values(fn, stats), level)

    def ratio_ci(self, num_G: Tensor, den_G: Tensor, level: float = LEVEL) -> list[float] | None:
        """Interval of Σnum / Σden (a mean when den counts rows)."""
        return self.ci(lambda s: s["n"] / s["d"], {"n": num_G, "d": den_G}, level)

    def describe(self, unit: str) -> dict:
        return {"unit": unit, "n_units": self.n_units, "resamples": self.resamples, "seed": self.seed,
                "level": LEVEL, "method": "percentile"}


def fvu_from_sums(s: dict[str, Tensor]) -> Tensor:
    """FVU from resampled sums: sse / (Σ‖x−c‖² − ‖Σ(x−c)‖²/n) for any fixed shift c."""
    sx = s["sum_x"]
    tv = s["sumsq"] - (sx * sx).sum(-1) / s["n"]
    return s["sse"] / tv


def loss_recovered_from_sums(s: dict[str, Tensor], ablation: str) -> Tensor:
    """(CE_ablated − CE_spliced) / (CE_ablated − CE_clean), each CE a resampled token mean."""
    mean = {k: s[k] / s["n"] for k in ("clean", "spliced", ablation)}
    return (mean[ablation] - mean["spliced"]) / (mean[ablation] - mean["clean"])


def half_width(ci: list[float] | None) -> float | None:
    return None if ci is None else (ci[1] - ci[0]) / 2


def compare_figures(a: float | None, ci_a: list[float] | None, b: float | None,
                    ci_b: list[float] | None) -> dict:
    """Is a − b distinguishable? Not when the two intervals overlap. `detectable` is the smallest
    difference these data could call distinguishable (the sum of the two half-widths)."""
    if a is None or b is None or ci_a is None or ci_b is None or not all(map(math.isfinite, (a, b))):
        return {"difference": None if a is None or b is None else a - b, "distinguishable": None, "detectable": None}
    overlap = ci_a[0] <= ci_b[1] and ci_b[0] <= ci_a[1]
    return {"difference": a - b, "distinguishable": not overlap, "detectable": half_width(ci_a) + half_width(ci_b)}


class GroupedSums:
    """Per-document sums accumulated over streamed batches: doc ids of any size map to units 0..G-1
    in order of first appearance. Rows without doc ids use blocks of `block_rows` consecutive rows."""

    def __init__(self, block_rows: int = 64):
        self.block_rows = block_rows
        self.unit_of: dict[int, int] = {}
        self.acc: dict[str, Tensor] = {}
        self.rows_seen = 0
        self.unit = "document"

    def units_for(self, doc_N: Tensor | None, n: int) -> Tensor:
        """Unit index `[n]` of each row of the next batch."""
        if doc_N is None:
            self.unit = f"block of {self.block_rows} rows"
            doc_N = torch.arange(self.rows_seen, self.rows_seen + n) // self.block_rows
        self.rows_seen += n
        uniq, inv = torch.unique(doc_N.reshape(-1).cpu().long(), return_inverse=True)
        ids = torch.tensor([self.unit_of.setdefault(int(d), len(self.unit_of)) for d in uniq.tolist()],
                           dtype=torch.long)
        return ids[inv]

    def add(self, name: str, unit_N: Tensor, values: Tensor) -> None:
        """Add per-row `values` (`[n]` or `[n, D]`) into their units' sums (reduced at once: memory is
        one row of sums per document, never one per row)."""
        v = values.detach().cpu()
        unit_N = unit_N.to(v.device)
        # sum the rows of each unit in the batch first (few units, many rows; a segment sum over rows
        # sorted by unit is far faster than index_add on CPU), then widen to float64
        if len(unit_N) and bool((unit_N[1:] < unit_N[:-1]).any()):
            order = torch.argsort(unit_N, stable=True)
            unit_N, v = unit_N[order], v[order]
        unit_N, lengths = torch.unique_consecutive(unit_N, return_counts=True)
        v = torch.segment_reduce(v.float(), "sum", lengths=lengths, axis=0).double()
        acc = self.acc.get(name)
        g = len(self.unit_of)
        if acc is None or acc.shape[0] < g:
            grown = torch.zeros((max(g, 2 * (0 if acc is None else acc.shape[0])), *v.shape[1:]), dtype=torch.float64)
            if acc is not None:
                grown[: acc.shape[0]] = acc
            acc = self.acc[name] = grown
        acc.index_add_(0, unit_N, v)

    def totals(self) -> dict[str, Tensor]:
        """name -> `[G]` or `[G, D]` per-unit sums."""
        g = len(self.unit_of)
        return {name: acc[:g] for name, acc in self.acc.items()}

    @property
    def n_units(self) -> int:
        return len(self.unit_of)


def mean_interval(values_U: Tensor, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                  units_U: Tensor | None = None) -> list[float] | None:
    """ci95 of the mean of per-item `values_U` (e.g. 0/1 correctness of a probe's test examples),
    resampling the units in `units_U` (each item its own unit when None)."""
    v = torch.as_tensor(values_U, dtype=torch.float64).reshape(-1)
    if v.numel() < 2:
        return None
    units = torch.arange(v.numel()) if units_U is None else \
        torch.unique(torch.as_tensor(units_U).reshape(-1), return_inverse=True)[1]
    g = int(units.max()) + 1
    if g < 2:
        return None
    sum_G = torch.zeros(g, dtype=torch.float64).index_add_(0, units, v)
    n_G = torch.zeros(g, dtype=torch.float64).index_add_(0, units, torch.ones_like(v))
    return Bootstrap(g, resamples, seed).ratio_ci(sum_G, n_G)


def interval_fn(resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Callable:
    """`mean_interval` with fixed resamples and seed, for layers below eval that take an interval
    function as an argument (probing is one: it may not import eval)."""
    return lambda values_U, units_U=None: mean_interval(values_U, resamples, seed, units_U)
