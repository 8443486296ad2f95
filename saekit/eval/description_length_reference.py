"""The description-length sweep computed the plain way: one latent at a time, in memory.

Why keep it: it is the oracle the vectorised `description_length` is tested against (equal to
1e-10) and the reference `scripts/bench_mdl.py` times on a slice.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from saekit.eval.description_length import (
    DEFAULT_FVU_TOLERANCE,
    DEFAULT_PRECISIONS,
    DecodeFn,
    check_precisions,
    dequantise,
    quantise_bins,
    range_tables,
    summarise_sweep,
    unit_position,
)
from saekit.sae.base import SparseCode


def description_length_reference(indices_NK: Tensor, values_NK: Tensor, d_sae: int,
                                 precisions: Sequence[int] = DEFAULT_PRECISIONS, *, x_ND: Tensor | None = None,
                                 decode_fn: DecodeFn | None = None, recon_ND: Tensor | None = None,
                                 fvu_tolerance: float = DEFAULT_FVU_TOLERANCE, per_latent: bool = False) -> dict:
    """Plain per-latent loop over an in-memory code; same result dict as `description_length`."""
    precisions = check_precisions(precisions)
    k = indices_NK.shape[-1]
    idx = indices_NK.reshape(-1, k).cpu()
    val = values_NK.detach().reshape(-1, k).cpu()
    n_rows = idx.shape[0]
    flat_idx, flat_val = idx.reshape(-1), val.reshape(-1)
    active_pos = torch.nonzero(flat_val != 0).squeeze(1)
    order = torch.argsort(flat_idx[active_pos], stable=True)
    active_pos = active_pos[order]
    counts = torch.bincount(flat_idx[active_pos], minlength=d_sae).tolist()
    q_flat = {b: torch.zeros(flat_val.shape, dtype=torch.float32) for b in precisions}
    activity_F = [0.0] * d_sae
    value_PF = [[0.0] * d_sae for _ in precisions]
    start = 0
    for j in range(d_sae):
        n_j = counts[j]
        pos = active_pos[start: start + n_j]
        start += n_j
        if n_j == 0:
            continue
        p_j = n_j / n_rows
        activity_F[j] = 0.0 if p_j >= 1.0 else -(p_j * math.log2(p_j) + (1 - p_j) * math.log2(1 - p_j))
        v = flat_val[pos]
        lo, span = range_tables(v.double().min(), v.double().max())
        u = unit_position(v, lo.expand(n_j), span.expand(n_j))
        for p, b in enumerate(precisions):
            bins = quantise_bins(u, b)
            _, c = torch.unique(bins, return_counts=True)
            h = -sum((ci / n_j) * math.log2(ci / n_j) for ci in c.tolist())
            value_PF[p][j] = n_j * max(h, 0.0) / n_rows
            q_flat[b][pos] = dequantise(bins, lo, span, b)
    activity_bits = sum(activity_F)
    value_P = [sum(row) for row in value_PF]
    errors = None
    if x_ND is not None and decode_fn is not None:
        x64 = x_ND.detach().reshape(n_rows, -1).double()
        tv = float((x64 - x64.mean(0)).pow(2).sum())
        if recon_ND is None:
            recon_ND = decode_fn(SparseCode(idx, val, d_sae))
        sse0 = float((x64 - recon_ND.detach().reshape(x64.shape).double()).pow(2).sum())
        sse_P = []
        for b in precisions:
            xq = decode_fn(SparseCode(idx, q_flat[b].to(val.dtype).view(n_rows, k), d_sae))
            sse_P.append(float((x64 - xq.detach().reshape(x64.shape).double()).pow(2).sum()) - sse0)
        errors = (sse0, sse_P, tv, x64.numel())
    out = summarise_sweep(n_rows, d_sae, precisions, activity_bits, value_P, len(active_pos), errors, fvu_tolerance)
    if per_latent:
        out["per_latent"] = {"counts_F": torch.tensor(counts, dtype=torch.int64),
                             "activity_bits_F": torch.tensor(activity_F, dtype=torch.float64),
                             "value_bits_PF": torch.tensor(value_PF, dtype=torch.float64)}
    return out
