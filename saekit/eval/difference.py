"""An interval for a difference of two means, each set's documents resampled on their own.

Why its own function: contrastive feature search (saekit.analysis.contrastive, a layer below eval)
ranks latents by mean(A) − mean(B) over two independent sets of documents; the bootstrap of that
difference resamples A and B separately (same resample count, seeds apart) and takes the percentile
interval of the resampled differences. Analysis takes it as an argument, as probing takes
`bootstrap.interval_fn`.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from saekit.eval.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, Bootstrap, percentile_interval


def difference_interval(a_G: Tensor, b_H: Tensor, resamples: int = DEFAULT_RESAMPLES,
                        seed: int = DEFAULT_SEED) -> list[float] | None:
    """95 % percentile interval of mean(a) − mean(b); None when a set has fewer than two documents."""
    if a_G.numel() < 2 or b_H.numel() < 2:
        return None
    mean = lambda S: S["x"] / S["n"]  # noqa: E731
    ones = lambda v: v.new_ones(v.shape)  # noqa: E731
    a_R = Bootstrap(a_G.numel(), resamples, seed).values(mean, {"x": a_G.double(), "n": ones(a_G.double())})
    b_R = Bootstrap(b_H.numel(), resamples, seed + 7919).values(mean, {"x": b_H.double(), "n": ones(b_H.double())})
    return percentile_interval(a_R - b_R)


def difference_interval_fn(resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Callable:
    """`difference_interval` with fixed resamples and seed, for contrastive search."""
    return lambda a_G, b_H: difference_interval(a_G, b_H, resamples, seed)
