"""Certified bf16 pre-filter: an EXACT float32 row-wise top-k encoder on CPUs with bf16 matrix instructions.

Why: in a float32 top-k training step on a CPU the encoder product `x_c @ W_enc` is about two thirds of the
time (one thread, d_in 512, d_sae 8192, batch 4096: ~215 of ~330 ms, at the core's float32 peak), while the
same product in bf16 on AMX / AVX512-BF16 takes ~30-50 ms. Using the bf16 values directly changes which
latents are selected (that is `precision: bf16`). Here bf16 only nominates candidates: a rigorous bound on
its error says which latents can still be in the float32 top-k; those alone are recomputed in float32 (C,
`native_filter.c`), and the top-k among them is exactly the top-k of the recomputed float32 values over
ALL latents. Values, ReLU, the backward, gradients and Adam are the float32 path's.

The bound. Notation for one row: x = x_c[b] (float32), w = W[:, j], s = x . w (exact real), b = b_enc[j];
u = 2^-8 (bf16 unit roundoff, round to nearest), eps = 2^-24 (float32), gamma_n = n eps / (1 - n eps), D = d_in.

1. Operands: bf16(x_i) = x_i (1 + d), bf16(w_i) = w_i (1 + d'), |d|, |d'| <= u, so each product is off by at
   most (2u + u^2) |x_i w_i|.
2. A product of two bf16 numbers is exact in float32; oneDNN accumulates the D products in float32 in some
   order: at most gamma_D sum |bf16(x_i) bf16(w_i)| <= gamma_D (1 + u)^2 sum |x_i w_i|.
3. torch.mm on bf16 CPU tensors returns bf16 (an out= or `out_dtype` float32 result is refused on CPU in
   torch 2.13), so p = bf16(acc): |p - acc| <= u |acc| <= u / (1 - u) |p|.
4. The recompute r = fl(fl(sum x_i w_i) + b) (native_filter.c, fixed order): |fl(sum) - s| <= gamma_D sum |x_i w_i|,
   and the additions of b and the bound's own float32 arithmetic (p + b, +- e) cost a few eps of |p|, |b|
   and e: covered by a_rel = 2^-20 on |p| and |b| and by the factor 1 + (D + 16) 2^-22 on c, which also
   covers the rounding of the float32 norms (relative <= (D/2 + 2) eps).
5. Cauchy-Schwarz: sum |x_i w_i| <= ||x|| ||w||.
6. Subnormals: AMX / AVX512-BF16 read subnormal inputs as zero and flush subnormal results: at most
   2^-126 (sum |x_i| + sum |w_i| + D + 1) <= 2^-126 (sqrt(D) (||x|| + max_j ||w_j||) + D + 1) (the tiny term).

So |p + b - r| <= e = c ||x|| ||w|| + u_rel |p| + a_rel |b| + tiny, with c = (2u + u^2 + gamma_D (1 + u)^2 +
gamma_D)(1 + (D + 16) 2^-22) (~2^-7), u_rel = u / (1 - u) + 2^-20, a_rel = 2^-20. Per row, L = p + b - e and
U = p + b + e bound r; t = the k-th largest L: at least k latents have r >= t, so a latent with U < t cannot be
in the top-k of r, and the candidates {j : U >= t} (at least k, since U >= L) contain it. Ties in r: the
lower latent index wins (unique result, whatever the thread count). A row that is not finite sends the
whole call back to the dense float32 path.

Where it runs: `kernels.sparse.SparseEncode` uses it for selections that declare a row-wise top-k
(`rowwise_k`: `topk_select`, `TopKSAE` outside BatchTopK and its inference threshold) when the product is
float32 on a CPU with bf16 dot-product instructions (avx512_bf16 or amx_bf16) and the native library is
built. `SAEKIT_BF16_FILTER=0` (or `SAEKIT_NATIVE=0`) gives the dense float32 product and top-k. BatchTopK
would need a batch-global threshold over B x d_sae lower bounds; not done. `STATS` records which path ran
and the candidates per row (the benchmark prints them).
"""

from __future__ import annotations

import ctypes
import math
import os
import time

import torch
from torch import Tensor

from saekit.hardware import cpu_has_bf16
from saekit.sae.kernels import native

U_BF16, EPS32 = 2.0 ** -8, 2.0 ** -24
C_SCALE = 1.0
"""Test-only hook: tests shrink the bound's main constant to show that a bound too tight is detected."""
STATS = {"filtered_calls": 0, "dense_calls": 0, "rows": 0, "candidates": 0,
         "bf16_product_s": 0.0, "prep_s": 0.0, "find_s": 0.0, "recompute_s": 0.0}
"""Counters since `reset_stats()`: calls per path, rows and candidates, and CPU seconds per part of the filter
(`find_s`: the bound and the candidate scan, `recompute_s`: float32 dot products and the selection, both
summed over the kernel's threads; the product and prep parts: the process's CPU time)."""


def enabled() -> bool:
    off = ("0", "false", "no", "off")
    return native.enabled() and os.environ.get("SAEKIT_BF16_FILTER", "1").lower() not in off


def bound_constants(d_in: int) -> dict[str, float]:
    """`c`, `u_rel`, `a_rel` and the tiny term's coefficients of the bound (module docstring)."""
    gamma = d_in * EPS32 / (1 - d_in * EPS32)
    c = (2 * U_BF16 + U_BF16 ** 2 + gamma * (1 + U_BF16) ** 2 + gamma) * (1 + (d_in + 16) * 2.0 ** -22)
    return {"c": c * C_SCALE, "u_rel": U_BF16 / (1 - U_BF16) + 2.0 ** -20, "a_rel": 2.0 ** -20,
            "tiny_per_norm": 2.0 ** -126 * math.sqrt(d_in), "tiny_const": 2.0 ** -126 * (d_in + 1)}


def applies(x_c_BD: Tensor, W_enc_DF: Tensor, k: int) -> bool:
    """Whether `topk` will try: float32 CPU tensors, a CPU with bf16 instructions, the switch on, the library built."""
    return (enabled() and cpu_has_bf16() and x_c_BD.device.type == "cpu" and W_enc_DF.device.type == "cpu"
            and x_c_BD.dtype == W_enc_DF.dtype == torch.float32 and x_c_BD.dim() == 2 and W_enc_DF.dim() == 2
            and 1 <= k <= W_enc_DF.shape[1] and x_c_BD.shape[0] > 0 and W_enc_DF.shape[1] % 32 == 0
            and W_enc_DF.shape[1] * ROW_TILE < 2 ** 31 and native.library() is not None)  # the C kernel's limits


def prepare(W_DF: Tensor) -> tuple[Tensor, Tensor]:
    """`(W^T [F, D] contiguous, ||W[:, j]|| [F])` in one pass (C): the recompute reads latent rows, and the
    backward's input gradient can share the transposed copy."""
    D, F = W_DF.shape
    W_DF = W_DF.detach().contiguous()
    WT_FD, nw_F = torch.empty(F, D, dtype=torch.float32), torch.empty(F, dtype=torch.float32)
    native.library().saekit_filter_prep(W_DF.data_ptr(), D, F, WT_FD.data_ptr(), nw_F.data_ptr(),
                                        native._threads(max(F // 16, 1)))
    return WT_FD, nw_F


GIVE_UP_FRACTION, RETRY_AFTER = 0.10, 64
"""When a call's candidates exceed this fraction of its (>= 2^22) pre-activations, the next RETRY_AFTER calls take the
dense path (`_guard`, process-wide). Break-even measured on the benchmark shape (one thread): a candidate's
float32 dot product costs ~13x a GEMM's per multiply-add (gathered rows), so the filter stops paying near
6 % of d_sae; the trained SAEs measured sit at 4-6 % (README), a degenerate encoder (near-identical
columns) at 100 %, where the dense path is ~10x faster."""
_guard = {"skip": 0}
CHUNK_ROWS, ROW_TILE = 1024, 512  # ROW_TILE: as in native_filter.c
"""Rows per bf16 product: the [1024, d_sae] bf16 block (16 MB at d_sae 8192) is scanned while it is still in cache;
one [B, d_sae] product streamed to memory and read back was ~10 % slower a call on the benchmark shape."""


def bf16_product(x_c_BD: Tensor, W_DF: Tensor, work_BF: Tensor | None = None) -> Tensor:
    """bf16(x_c) @ bf16(W), `[B, F]` bf16 (oneDNN, float32 accumulation), into `work_BF` when given."""
    with torch.autocast("cpu", enabled=False):
        x_b, W_b = x_c_BD.detach().to(torch.bfloat16), W_DF.detach().to(torch.bfloat16)
        return torch.mm(x_b, W_b, out=work_BF) if work_BF is not None else torch.mm(x_b, W_b)


def topk(x_c_BD: Tensor, W_DF: Tensor, b_F: Tensor | None, k: int,
         work: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """`(values_BK, indices_BK, W^T_FD)`: the exact row-wise top-k of `fl(x_c @ W + b)` (float32, unordered
    within a row, before ReLU), or None when it does not apply or a row is not finite (use the dense path).
    `work`: an optional reused buffer (any dtype, contiguous) for the bf16 product of `CHUNK_ROWS` rows."""
    if not applies(x_c_BD, W_DF, k) or (b_F is not None and (b_F.dtype != torch.float32 or b_F.shape != W_DF.shape[1:])):
        return None
    if _guard["skip"] > 0:
        _guard["skip"] -= 1
        return None
    x_c_BD, b_F = x_c_BD.detach().contiguous(), (b_F.detach().contiguous() if b_F is not None else None)
    B, F = x_c_BD.shape[0], W_DF.shape[1]
    t0 = time.process_time()
    WT_FD, nw_F = prepare(W_DF)
    nw_max = float(nw_F.max())
    if not math.isfinite(nw_max):
        return None
    with torch.autocast("cpu", enabled=False):
        x_b, W_b = x_c_BD.to(torch.bfloat16), W_DF.detach().to(torch.bfloat16)
    t1 = time.process_time()
    R = min(B, max(CHUNK_ROWS, ROW_TILE * torch.get_num_threads()))  # a C tile per thread at least
    if work is not None and work.is_contiguous() and work.numel() * work.element_size() >= R * F * 2:
        pre_RF = work.view(-1).view(torch.uint8)[: R * F * 2].view(torch.bfloat16).view(R, F)
    else:
        pre_RF = torch.empty(R, F, dtype=torch.bfloat16)
    vals, idx = torch.empty(B, k), torch.empty(B, k, dtype=torch.int64)
    total, phase_s, mm_s = 0, [0.0, 0.0], 0.0
    for s in range(0, B, R):
        n = min(R, B - s)
        t = time.process_time()
        torch.mm(x_b[s:s + n], W_b, out=pre_RF[:n])
        mm_s += time.process_time() - t
        found = _filter_rows(pre_RF[:n], b_F, x_c_BD[s:s + n], WT_FD, nw_F, nw_max, k, vals[s:s + n], idx[s:s + n])
        if found is None:
            return None
        total, phase_s = total + found[0], [phase_s[0] + found[1], phase_s[1] + found[2]]
    if total > GIVE_UP_FRACTION * B * F and B * F >= 2 ** 22:  # small calls cost little either way
        _guard["skip"] = RETRY_AFTER
    for key, value in (("filtered_calls", 1), ("rows", B), ("candidates", total), ("bf16_product_s", mm_s),
                       ("prep_s", t1 - t0), ("find_s", phase_s[0]), ("recompute_s", phase_s[1])):
        STATS[key] += value
    return vals, idx, WT_FD


def _filter_rows(pre_BF, b_F, x_c_BD, WT_FD, nw_F, nw_max, k, vals_BK, idx_BK) -> tuple[int, float, float] | None:
    """One call of the C kernel on a block of rows, writing into `vals_BK` / `idx_BK` (contiguous row ranges);
    `(candidates, find seconds, recompute seconds)` or None when a row is not finite."""
    (B, F), D = pre_BF.shape, x_c_BD.shape[1]
    cst = bound_constants(D)
    tiny = cst["tiny_const"] + cst["tiny_per_norm"] * nw_max
    total, phase_s = ctypes.c_int64(0), (ctypes.c_double * 2)()
    status = native.library().saekit_topk_filtered(
        pre_BF.data_ptr(), b_F.data_ptr() if b_F is not None else None, x_c_BD.data_ptr(), WT_FD.data_ptr(),
        nw_F.data_ptr(), B, F, D, k, cst["c"], cst["u_rel"], cst["a_rel"], cst["tiny_per_norm"], tiny,
        vals_BK.data_ptr(), idx_BK.data_ptr(), ctypes.byref(total), phase_s, native._threads(B))
    return (total.value, phase_s[0], phase_s[1]) if status == 0 else None


def record_dense() -> None:
    """Counts a row-wise top-k encode that took the dense float32 product."""
    STATS["dense_calls"] += 1


def reset_stats() -> None:
    """Zeroes STATS and lifts the guard (a fresh start: tests, benchmark variants)."""
    _guard["skip"] = 0
    for key in STATS:
        STATS[key] = 0.0 if key.endswith("_s") else 0


def summary() -> dict:
    """`{"path": "bf16_filter" | "dense_fp32" | "mixed" | "none", "candidates_per_row": mean or None}`."""
    f, d = STATS["filtered_calls"], STATS["dense_calls"]
    path = "none" if f + d == 0 else "mixed" if f and d else "bf16_filter" if f else "dense_fp32"
    per_row = round(STATS["candidates"] / STATS["rows"], 1) if STATS["rows"] else None
    return {"path": path, "candidates_per_row": per_row}
