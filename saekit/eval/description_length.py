"""Description length (DL) of an SAE's sparse codes, after the MDL-SAE paper.

Ayonrinde, Pearce & Sharkey (2024), "Interpretability as Compression: Reconsidering SAE
Explanations of Neural Activations with MDL-SAEs", treat an SAE as a lossy compressor: the
*explanation* of an activation vector is its sparse code, and the description length is the
number of bits needed to send that code through a channel to a receiver who already holds the
dictionary (the decoder). The dictionary's own cost is constant in the number of rows and is not
counted here. Per activation vector (row):

    DL = B + V

- **B, activity bits** — which latents are active. With each latent's firing probability
  `p_j` (its density over the N rows) and latents coded independently, as in the paper,
  `B = Σ_j H(p_j)` with the binary entropy `H(p) = −p log2 p − (1−p) log2(1−p)`. A latent that
  fires on every row, or never, costs 0 bits.
- **V, value bits** — the values of the active latents, sent at a finite *precision*. The paper's
  simple bound sends each active float with `b` bits (`V_flat = L0 · b`); its refinement, which
  the authors recommend because it adapts to each feature's activation distribution, codes the
  quantised values with an entropy code: `V = Σ_j p_j · H(Q_b(a_j))`, the entropy of latent j's
  quantised-value histogram, paid on the rows where it fires. Both are reported; `V` (entropy
  coding) is the one minimised. A latent that never fires costs 0 value bits.

Quantisation (`b` bits): each latent's active values are mapped onto `2^b` evenly spaced levels
spanning that latent's own range `[lo_j, hi_j]` over the data (step `(hi_j − lo_j)/(2^b − 1)`,
round to nearest). A latent whose active values are all equal is sent exactly with 0 value bits.
The ranges come from a first pass over the data (`LatentValueRange`); the histograms and the
errors from a second (`DescriptionLengthAccumulator`).

Accuracy: for each precision, the quantised code is decoded and its reconstruction error (MSE
and FVU around the per-dimension mean) is reported next to its DL. The SAE's DL is the minimum
DL over the precisions whose FVU exceeds the unquantised code's FVU by at most `fvu_tolerance`
(the paper fixes an acceptable reconstruction error and asks for the shortest description within
it).

Implementation: one `scatter_add_` per batch fills the per-(latent, bin) histograms of every
precision at once (flattened ids `offset_b + latent · 2^b + bin`); entropies are taken over the
whole histogram with `xlogy` and summed per latent — no Python loop over latents. For an SAE with
an affine decoder the quantised error uses `x − decode(q) = (x − x̂) + (v − q) · W_dec[idx]`, one
gather of the k active decoder rows per row shared by all precisions (a batched `[P, k] @ [k, d]`
product); any other decoder goes through its `decode` once per precision.
`description_length_reference` (description_length_reference.py) is a deliberately plain per-latent loop used by the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from saekit.errors import ConfigError, ShapeMismatchError
from saekit.eval.reconstruction import RunningMoments
from saekit.sae.base import SparseCode

DEFAULT_PRECISIONS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
DEFAULT_FVU_TOLERANCE = 0.01
DEFAULT_MAX_HIST_ENTRIES = 1 << 25  # int64 histogram entries over all precisions (256 MB)
METHOD = ("MDL-SAE (Ayonrinde et al. 2024): activity bits = sum_j H(p_j); value bits = sum_j p_j * "
          "entropy of latent j's b-bit quantised values (2^b levels over its own range); "
          "dl = activity + value bits per activation vector")

DecodeFn = Callable[[SparseCode], Tensor]


# ---------------------------------------------------------------------------------------------
# shared elementwise pieces (used by both implementations, so their bins agree exactly)
# ---------------------------------------------------------------------------------------------
def binary_entropy_bits(p: Tensor) -> Tensor:
    """H(p) in bits, elementwise, float64; exactly 0 at p = 0 and p = 1."""
    p = p.double()
    q = 1.0 - p
    return -(torch.xlogy(p, p) + torch.xlogy(q, q)) / math.log(2.0)


def unit_position(values: Tensor, lo: Tensor, span: Tensor) -> Tensor:
    """(v − lo) / span in float32, 0 where span is 0 (a latent with one distinct value)."""
    v = values.float()
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (v - lo) / safe, torch.zeros_like(v))


def range_tables(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """float32 (lo, span = hi − lo) from float64 ranges; the one conversion both implementations use."""
    lo64, hi64 = lo.double(), hi.double()
    return lo64.float(), (hi64 - lo64).clamp_min(0).float()


def quantise_bins(u: Tensor, bits: int) -> Tensor:
    """Bin index in [0, 2^bits − 1] for positions u in [0, 1] (round to nearest level)."""
    levels = (1 << bits) - 1
    return torch.round(u * levels).clamp_(0, levels).long()


def dequantise(bins: Tensor, lo: Tensor, span: Tensor, bits: int) -> Tensor:
    """The level value lo + bin · span / (2^bits − 1), float32."""
    return lo + bins.float() * (span / ((1 << bits) - 1))


def check_precisions(precisions: Sequence[int]) -> tuple[int, ...]:
    """Distinct bit precisions in 1..24, else ConfigError (shared with the float64 reference, which must refuse
    exactly what the fast path refuses)."""
    ps = tuple(int(b) for b in precisions)
    if not ps or any(b < 1 or b > 24 for b in ps) or len(set(ps)) != len(ps):
        raise ConfigError(f"description length: expected distinct precisions (bits) in 1..24, found {list(precisions)}")
    return ps


def _code_parts(item: Any) -> tuple[SparseCode, Tensor | None, Tensor | None]:
    """Accept a SparseCode or a tuple (code, x, recon) with x / recon possibly None."""
    if isinstance(item, SparseCode):
        return item, None, None
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], SparseCode):
        parts = list(item) + [None, None]
        return parts[0], parts[1], parts[2]
    raise ShapeMismatchError(f"description length: expected a SparseCode or (code, x, recon), found {type(item).__name__}")


def _flat_code(code: SparseCode) -> tuple[Tensor, Tensor]:
    k = code.indices.shape[-1]
    return code.indices.reshape(-1, k), code.values.detach().reshape(-1, k)


# ---------------------------------------------------------------------------------------------
# pass 1: per-latent ranges
# ---------------------------------------------------------------------------------------------
class LatentValueRange:
    """First pass: per-latent firing counts and the [lo, hi] range of the active values."""

    def __init__(self, d_sae: int):
        self.d_sae = d_sae
        self.n_rows = 0
        self.counts_F = torch.zeros(d_sae, dtype=torch.int64)
        # one extra "dump" slot receives the inactive slots, so nothing is filtered out
        self._lo = torch.full((d_sae + 1,), math.inf, dtype=torch.float64)
        self._hi = torch.full((d_sae + 1,), -math.inf, dtype=torch.float64)

    def update(self, code: SparseCode) -> None:
        if code.d_sae != self.d_sae:
            raise ShapeMismatchError(f"description length: expected codes over d_sae={self.d_sae}, found {code.d_sae}")
        idx_NK, val_NK = _flat_code(code)
        self.n_rows += idx_NK.shape[0]
        active = val_NK != 0
        ids = torch.where(active, idx_NK, self.d_sae).reshape(-1).cpu()
        v = val_NK.reshape(-1).double().cpu()
        self._lo.scatter_reduce_(0, ids, v, reduce="amin")
        self._hi.scatter_reduce_(0, ids, v, reduce="amax")
        self.counts_F += torch.bincount(ids, minlength=self.d_sae + 1)[: self.d_sae]

    @property
    def lo_F(self) -> Tensor:
        """Smallest active value per latent (0 for never-firing latents)."""
        return torch.where(self.counts_F > 0, self._lo[: self.d_sae], 0.0)

    @property
    def hi_F(self) -> Tensor:
        return torch.where(self.counts_F > 0, self._hi[: self.d_sae], 0.0)


# ---------------------------------------------------------------------------------------------
# pass 2: histograms and quantised errors, vectorised over latents and precisions
# ---------------------------------------------------------------------------------------------
class DescriptionLengthAccumulator:
    """Second pass: per-(latent, bin) histograms for every precision and the quantised errors.

    Give `decoder_FD` (`W_dec [d_sae, d_in]`) for an affine decoder (fast path), or `decode_fn`
    (a `SparseCode -> x_hat` function) for any decoder; with neither, only bits are computed.
    Errors need `x` in `update`; `recon` (the unquantised reconstruction) is computed with
    `decode_fn` when not given (the fast path requires it). `error_chunk` is the number of rows
    whose k decoder rows are gathered at once (default 64 on CPU, 1024 on an accelerator).
    The histograms live on the CPU; errors are computed on the decoder's device.
    """

    def __init__(self, lo_F: Tensor, hi_F: Tensor, precisions: Sequence[int] = DEFAULT_PRECISIONS, *,
                 decoder_FD: Tensor | None = None, decode_fn: DecodeFn | None = None, error_chunk: int | None = None,
                 max_hist_entries: int = DEFAULT_MAX_HIST_ENTRIES):
        self.precisions = check_precisions(precisions)
        if lo_F.shape != hi_F.shape or lo_F.ndim != 1:
            raise ShapeMismatchError(f"description length: expected lo_F and hi_F of shape [d_sae], "
                                     f"found {tuple(lo_F.shape)} and {tuple(hi_F.shape)}")
        self.d_sae = lo_F.shape[0]
        if decoder_FD is not None and decoder_FD.shape[0] != self.d_sae:
            raise ShapeMismatchError(f"description length: expected decoder [d_sae={self.d_sae}, d_in], "
                                     f"found {tuple(decoder_FD.shape)}")
        # float32 tables with a dump slot at index d_sae (lo = 0, span = 0) for inactive slots
        lo32, span32 = range_tables(lo_F, hi_F)
        self.lo_F = torch.cat([lo32.cpu(), torch.zeros(1)])
        self.span_F = torch.cat([span32.cpu(), torch.zeros(1)])
        # one histogram block per precision, (d_sae + 1) rows of 2^b bins; the extra row is the
        # dump for inactive slots, so every slot can be scattered without filtering
        sizes = [(self.d_sae + 1) << b for b in self.precisions]
        total = sum(sizes)
        if total > max_hist_entries:
            raise ConfigError(f"description length: histograms for precisions {list(self.precisions)} over "
                              f"d_sae={self.d_sae} need {total} entries, above max_hist_entries={max_hist_entries}; "
                              f"use fewer or smaller precisions")
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        P = len(self.precisions)
        self._offsets = offsets
        self._off_P11 = torch.tensor(offsets, dtype=torch.int64).view(P, 1, 1)
        self._bits_P11 = torch.tensor(self.precisions, dtype=torch.int64).view(P, 1, 1)
        self._levels_P11 = torch.tensor([(1 << b) - 1 for b in self.precisions], dtype=torch.float32).view(P, 1, 1)
        self.hist = torch.zeros(total, dtype=torch.int64)
        self.n_rows = 0
        self.nnz = 0
        self.decoder_FD = decoder_FD.detach() if decoder_FD is not None else None
        self.decode_fn = decode_fn
        self.error_chunk = error_chunk
        self.moments: RunningMoments | None = None
        self.sse0 = 0.0
        self.inc_P = torch.zeros(len(self.precisions), dtype=torch.float64)  # SSE increase over unquantised
        self._d_in: int | None = None

    # -- update -----------------------------------------------------------------------------
    def update(self, code: SparseCode, x: Tensor | None = None, recon: Tensor | None = None) -> None:
        if code.d_sae != self.d_sae:
            raise ShapeMismatchError(f"description length: expected codes over d_sae={self.d_sae}, found {code.d_sae}")
        idx_NK, val_NK = _flat_code(code)
        n, k = idx_NK.shape
        self.n_rows += n
        idx_c = idx_NK.cpu()
        active = (val_NK != 0).cpu()
        self.nnz += int(active.sum())
        ids_c = torch.where(active, idx_c, self.d_sae)
        lo = self.lo_F[ids_c]
        span = self.span_F[ids_c]
        u = unit_position(val_NK.cpu(), lo, span)
        # all precisions at once: [P, N, K] bins (same arithmetic as quantise_bins) and flat ids
        bins_PNK = torch.round(u * self._levels_P11).clamp_(min=0).clamp_(max=self._levels_P11).long()
        ids = (ids_c << self._bits_P11).add_(bins_PNK).add_(self._off_P11).reshape(-1)
        self.hist.scatter_add_(0, ids, torch.ones(1, dtype=torch.int64).expand(ids.shape[0]))
        if x is not None and (self.decoder_FD is not None or self.decode_fn is not None):
            q_PNK = (lo + bins_PNK.float() * (span / self._levels_P11)).masked_fill_(~active, 0.0)
            self._update_errors(code, idx_NK, val_NK, q_PNK, x, recon)

    def _update_errors(self, code: SparseCode, idx_NK: Tensor, val_NK: Tensor, q_PNK: Tensor, x: Tensor,
                       recon: Tensor | None) -> None:
        x_ND = x.detach().reshape(-1, x.shape[-1])
        if x_ND.shape[0] != idx_NK.shape[0]:
            raise ShapeMismatchError(f"description length: x has {x_ND.shape[0]} rows, code has {idx_NK.shape[0]}")
        if self.moments is None:
            self._d_in = x_ND.shape[1]
            self.moments = RunningMoments(0, torch.zeros(self._d_in, dtype=torch.float64),
                                          torch.zeros(self._d_in, dtype=torch.float64))
        self.moments.update(x_ND, exact=False)  # FVU denominators to ~1e-7; increases are summed directly
        if recon is None:
            if self.decode_fn is None:
                raise ConfigError("description length: the decoder fast path needs the unquantised recon")
            recon = self.decode_fn(code)
        r_ND = x_ND - recon.detach().reshape(x_ND.shape).to(x_ND.dtype)
        sse0_batch = float(torch.linalg.vector_norm(r_ND, dim=-1).double().square().sum())
        self.sse0 += sse0_batch
        if self.decoder_FD is not None:
            # x − decode(q) = r + d with d = (v − q) · W_dec[idx]; the increase over the unquantised
            # error, ‖r + d‖² − ‖r‖² = ‖d‖² + 2 d·r, is summed directly (no cancellation).
            W = self.decoder_FD
            n, k = idx_NK.shape
            P, D = q_PNK.shape[0], W.shape[1]
            delta_NPK = (val_NK.to(q_PNK.device, q_PNK.dtype) - q_PNK).permute(1, 0, 2).to(W.device, W.dtype)
            idx_d = idx_NK.to(W.device)
            r_dev = r_ND.to(W.device, W.dtype)
            inc_NP = torch.empty(n, P, dtype=W.dtype, device=W.device)  # per-row increases, summed in float64
            # rows per gathered [chunk, k, d_in] block: cache-sized on CPU, large on accelerators
            ch = self.error_chunk or (64 if W.device.type == "cpu" else 1024)

            def rows(start: int, stop: int) -> None:
                Wg_buf = torch.empty(ch * k, D, dtype=W.dtype, device=W.device)
                d_buf = torch.empty(ch, P, D, dtype=W.dtype, device=W.device)
                for s in range(start, stop, ch):  # bounded memory: [chunk, k, d_in] gathered rows (cache-sized)
                    e = min(s + ch, stop)
                    b = e - s
                    Wg_BKD = torch.index_select(W, 0, idx_d[s:e].reshape(-1), out=Wg_buf[: b * k]).view(b, k, D)
                    d_BPD = torch.bmm(delta_NPK[s:e], Wg_BKD, out=d_buf[:b])
                    torch.bmm(d_BPD, r_dev[s:e, :, None], out=inc_NP[s:e, :, None])  # d·r
                    inc_NP[s:e].mul_(2.0).add_(torch.linalg.vector_norm(d_BPD, dim=2).square_())

            _run_row_parallel(rows, n, ch, W.device)
            self.inc_P += inc_NP.sum(0, dtype=torch.float64).cpu()
        else:
            # ‖x − x_q‖² − ‖x − x̂‖² = (x̂ − x_q)·(2x − x_q − x̂), summed in float64 without cancellation
            x64, r64 = x_ND.double(), recon.detach().reshape(x_ND.shape).double()
            for p in range(len(self.precisions)):
                qcode = SparseCode(idx_NK, q_PNK[p].to(val_NK.dtype).to(val_NK.device), self.d_sae)
                xq = self.decode_fn(qcode).detach().reshape(x_ND.shape).double()
                self.inc_P[p] += float(((r64 - xq) * (2 * x64 - xq - r64)).sum())

    # -- result ----------------------------------------------------------------------------
    def latent_bits(self) -> tuple[Tensor, Tensor, Tensor]:
        """(counts_F, activity_bits_F, value_bits_PF): per-latent bits per row, float64."""
        n = max(self.n_rows, 1)
        value_bits = []
        counts_F = None
        for p, b in enumerate(self.precisions):
            off = self._offsets[p]
            h_FL = self.hist[off: off + (self.d_sae << b)].view(self.d_sae, 1 << b).double()  # dump row dropped
            c_F = h_FL.sum(1)
            counts_F = c_F if counts_F is None else counts_F
            # n_j H_j = n_j log2 n_j − Σ_bins c log2 c   (bits for all of latent j's values)
            total_F = (torch.xlogy(c_F, c_F) - torch.xlogy(h_FL, h_FL).sum(1)) / math.log(2.0)
            value_bits.append(total_F.clamp_min(0) / n)
        activity_F = binary_entropy_bits(counts_F / n)
        return counts_F.long(), activity_F, torch.stack(value_bits)

    def result(self, fvu_tolerance: float = DEFAULT_FVU_TOLERANCE, per_latent: bool = False) -> dict:
        counts_F, activity_F, value_PF = self.latent_bits()
        tv = self.moments.total if self.moments is not None else None
        errors = None
        if self.moments is not None:
            errors = (self.sse0, self.inc_P.tolist(), tv, self.moments.n * self._d_in)
        out = summarise_sweep(self.n_rows, self.d_sae, self.precisions, float(activity_F.sum()),
                              value_PF.sum(1).tolist(), self.nnz, errors, fvu_tolerance)
        if per_latent:
            out["per_latent"] = {"counts_F": counts_F, "activity_bits_F": activity_F, "value_bits_PF": value_PF}
        return out


def _run_row_parallel(fn: Callable[[int, int], None], n: int, chunk: int, device: torch.device) -> None:
    """Run `fn(start, stop)` over [0, n): on CPU, one contiguous row range per intra-op thread.

    Why: the per-chunk ops are small (cache-sized on purpose), and thousands of small OpenMP
    regions stall at their barriers whenever a core is busy with something else. Python threads
    running single-threaded torch ops (which release the GIL) need no barrier at all. The global
    intra-op thread count is set to 1 for the duration and restored afterwards.
    """
    workers = min(torch.get_num_threads(), max(1, n // max(chunk, 1)))
    if device.type != "cpu" or workers <= 1:
        fn(0, n)
        return
    from concurrent.futures import ThreadPoolExecutor

    step = -(-n // workers)
    bounds = [(s, min(s + step, n)) for s in range(0, n, step)]
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=len(bounds)) as ex:
            for f in [ex.submit(fn, a, b) for a, b in bounds]:
                f.result()
    finally:
        torch.set_num_threads(prev)


def summarise_sweep(n_rows: int, d_sae: int, precisions: Sequence[int], activity_bits: float,
                    value_bits_P: Sequence[float], nnz: int,
                    errors: tuple[float, Sequence[float], float, int] | None,
                    fvu_tolerance: float) -> dict:
    """The report dict shared by the vectorised and reference implementations.

    `errors` is (unquantised SSE, SSE increase per precision from quantising, total variance around the
    mean, number of elements).
    """
    l0 = nnz / n_rows if n_rows else math.nan
    sweep = []
    unq = None
    if errors is not None:
        sse0, inc_P, tv, n_el = errors
        fvu0 = sse0 / tv if tv > 0 else math.nan
        unq = {"mse": sse0 / n_el, "fvu": fvu0}
    for p, b in enumerate(precisions):
        entry = {"bits": int(b),
                 "value_bits_per_row": value_bits_P[p],
                 "dl_bits_per_row": activity_bits + value_bits_P[p],
                 "flat_value_bits_per_row": l0 * b,
                 "dl_flat_bits_per_row": activity_bits + l0 * b}
        if errors is not None:
            sse_b = sse0 + inc_P[p]
            entry.update({"mse": sse_b / n_el, "fvu": sse_b / tv if tv > 0 else math.nan,
                          "fvu_increase": inc_P[p] / tv if tv > 0 else math.nan})
        sweep.append(entry)
    ok = [e for e in sweep if errors is not None and e["fvu_increase"] <= fvu_tolerance]
    best = min(ok, key=lambda e: e["dl_bits_per_row"]) if ok else None
    return {
        "method": METHOD,
        "n_rows": int(n_rows),
        "d_sae": int(d_sae),
        "l0_mean": l0,
        "activity_bits_per_row": activity_bits,
        "unquantised": unq,
        "sweep": sweep,
        "fvu_tolerance": fvu_tolerance,
        "selected_bits": best["bits"] if best else None,
        "dl_bits_per_row": best["dl_bits_per_row"] if best else None,
        "within_tolerance": best is not None,
    }


# ---------------------------------------------------------------------------------------------
# the two-pass driver
# ---------------------------------------------------------------------------------------------
def _iterate(batches: Iterable | Callable[[], Iterable]) -> Iterator:
    if callable(batches):
        return iter(batches())
    it = iter(batches)
    if it is batches:
        raise ConfigError("description length: needs two passes over the data; pass a re-iterable (list, "
                          "dataset) or a function returning a fresh iterator, not a one-shot iterator")
    return it


def description_length(batches: Iterable | Callable[[], Iterable], d_sae: int,
                       precisions: Sequence[int] = DEFAULT_PRECISIONS, *, decoder_FD: Tensor | None = None,
                       decode_fn: DecodeFn | None = None, fvu_tolerance: float = DEFAULT_FVU_TOLERANCE,
                       error_chunk: int | None = None, per_latent: bool = False) -> dict:
    """DL sweep over precisions, streaming twice over `batches`.

    `batches` yields SparseCodes or `(code, x, recon)` tuples (a re-iterable or a zero-argument
    function returning an iterator). Returns the dict of `summarise_sweep` (bits per activation
    vector for each precision, the quantised errors, and the selected DL).
    """
    ranges = LatentValueRange(d_sae)
    for item in _iterate(batches):
        ranges.update(_code_parts(item)[0])
    acc = DescriptionLengthAccumulator(ranges.lo_F, ranges.hi_F, precisions, decoder_FD=decoder_FD,
                                       decode_fn=decode_fn, error_chunk=error_chunk)
    for item in _iterate(batches):
        acc.update(*_code_parts(item))
    return acc.result(fvu_tolerance, per_latent=per_latent)
