"""Matching-pursuit kernels: fast atom selection, differentiable coefficients, and the eager oracle.

Why three pieces:

- `select_atoms` runs the greedy pursuit *without gradient*. It computes the correlations
  `c = x @ W_dec.T` once and then updates them through the Gram matrix (`c <- c - alpha * G[j]`),
  so k steps cost one dense product plus k cheap `[rows, d_sae]` updates instead of k products.
  Rows are processed in chunks so that the `[chunk, d_sae]` correlation block stays in cache;
  the chunks are shared among Python worker threads, each running its ops on one intra-op thread.
  Why: a pursuit step is a handful of ~0.1 ms ops per chunk, and an intra-op parallel region waits
  for all its threads at every op; on a loaded machine each wait can cost a scheduler time slice
  (measured: 2-thread ops 50-100x slower than 1-thread ops under load). Independent workers only
  ever wait once, at the end.
- `MPCoefficients` recomputes the coefficients of the selected atoms differentiably with the
  pursuit recursion on the gathered atoms only (`alpha_t = <r_t, d_t>`, `r_{t+1} = r_t - alpha_t d_t`).
  This is exactly the naive unrolled pursuit's computation graph restricted to the atoms that
  were picked, so values and gradients equal the naive path, but the backward pass touches only
  the k selected atoms per row and keeps `O(rows * d_in)` memory (it walks the recursion
  backwards instead of storing k residuals).
- `naive_pursuit` is the eager reference (a full correlation product per step, autograd through
  the unroll) that tests compare against.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.sae.kernels.sparse import serial, sparse_t_matmul
from saekit.sae.kernels.sparse import sparse_decode as topk_sparse_decode

SELECT_CHUNK_ROWS = 128


@dataclass(frozen=True)
class PursuitOptions:
    """How one pursuit runs; all of it can change at inference without retraining.

    mode: "fixed" runs exactly `steps` steps (the paper's k); "threshold" runs at most `steps`
    steps and stops a row once its residual norm falls below `threshold` (times `||x - b_dec||`
    when `relative`), or, with `stop_on_duplicate`, once the selected set stops changing.
    """

    mode: str
    steps: int
    threshold: float = 0.0
    relative: bool = False
    stop_on_duplicate: bool = True
    nonneg: bool = True


@dataclass
class Selection:
    """The outcome of the no-grad pursuit: atom per step and whether that step contributed."""

    idx_NK: Tensor  # long, selected atom at each step
    active_NK: Tensor  # bool, False for clipped (nonneg) steps and steps after a row stopped


def gram_matrix(W_FD: Tensor, block: int = 2048, out_FF: Tensor | None = None) -> Tensor:
    """`W_FD @ W_FD.T` in row blocks of `block` atoms, written into `out_FF` when given.

    Why full products into a reused buffer: the earlier upper-block-triangle product plus a
    transposed mirror copy saved half the flops, but the strided mirror copy and a fresh 268 MB
    allocation (page faults) per refresh cost more than that at d_sae=8192 on 2 cores.
    """
    F = W_FD.shape[0]
    G_FF = W_FD.new_empty(F, F) if out_FF is None else out_FF
    for i in range(0, F, block):
        torch.mm(W_FD[i:i + block], W_FD.T, out=G_FF[i:i + block])
    return G_FF


def select_atoms(xc_ND: Tensor, W_FD: Tensor, opts: PursuitOptions, G_FF: Tensor | None = None,
                 keep_F: Tensor | None = None, chunk_rows: int = SELECT_CHUNK_ROWS) -> Selection:
    """Greedy matching pursuit selection (no gradient), chunked over rows.

    `G_FF` is the Gram matrix of `W_FD`; without it each step multiplies the selected atoms by the
    dictionary instead (for dictionaries whose Gram matrix does not fit in memory). `keep_F`
    (bool) masks atoms out for this call (atom dropout).

    Works in any grad mode and thread count: grad, inference and autocast modes are thread-local,
    so every chunk's buffers are allocated by the thread that writes them (a buffer made in the
    caller's `torch.inference_mode` is an inference tensor a worker may not write), and selection
    always runs without gradient and without autocast (in the selection dtype, on every thread alike).
    """
    N, K = xc_ND.shape[0], opts.steps
    diag_F = G_FF.diagonal() if G_FF is not None else W_FD.pow(2).sum(-1)
    chunks = [slice(start, start + chunk_rows) for start in range(0, N, chunk_rows)]
    if not chunks:
        return Selection(xc_ND.new_zeros(0, K, dtype=torch.long), xc_ND.new_zeros(0, K, dtype=torch.bool))

    def run(my_chunks: list[slice]) -> list[tuple[Tensor, Tensor]]:
        with torch.no_grad(), torch.autocast(xc_ND.device.type, enabled=False):
            return [_select_chunk(xc_ND[sl], W_FD, G_FF, diag_F, keep_F, opts) for sl in my_chunks]

    workers = min(torch.get_num_threads(), len(chunks)) if xc_ND.device.type == "cpu" else 1
    with serial():
        if workers <= 1:
            parts = run(chunks)
        else:
            with ThreadPoolExecutor(workers) as pool:
                per_worker = list(pool.map(run, [chunks[i::workers] for i in range(workers)]))
            parts = [per_worker[i % workers][i // workers] for i in range(len(chunks))]
        return Selection(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def _select_chunk(xc_CD: Tensor, W_FD: Tensor, G_FF: Tensor | None, diag_F: Tensor, keep_F: Tensor | None,
                  opts: PursuitOptions) -> tuple[Tensor, Tensor]:
    """Run the pursuit on one chunk of rows: (atom per step `idx_CK`, step contributed `active_CK`)."""
    idx_CK = torch.zeros(xc_CD.shape[0], opts.steps, dtype=torch.long, device=xc_CD.device)
    active_CK = torch.zeros(xc_CD.shape[0], opts.steps, dtype=torch.bool, device=xc_CD.device)
    c_CF = xc_CD @ W_FD.T
    buf_CF = torch.empty_like(c_CF) if G_FF is not None else None
    drop_F = None if keep_F is None else ~keep_F
    adaptive = opts.mode == "threshold"
    if adaptive:
        res2_C = xc_CD.pow(2).sum(-1)
        tol2_C = (opts.threshold ** 2) * (res2_C if opts.relative else torch.ones_like(res2_C))
        done_C = res2_C <= tol2_C
    for t in range(opts.steps):
        val_C, j_C = _pick(c_CF, opts.nonneg, drop_F)
        alpha_C = val_C.clamp_min(0) if opts.nonneg else val_C
        live_C = alpha_C != 0
        if adaptive:
            live_C &= ~done_C
            if opts.stop_on_duplicate and t > 0:
                live_C &= ~(idx_CK[:, :t] == j_C[:, None]).any(-1)
            alpha_C = alpha_C * live_C
        idx_CK[:, t] = j_C
        active_CK[:, t] = live_C
        if adaptive:
            res2_C = res2_C - 2 * alpha_C * val_C + alpha_C.pow(2) * diag_F[j_C]
            done_C |= ~live_C | (res2_C < tol2_C)
            if bool(done_C.all()):
                break
        if t + 1 < opts.steps:
            _update_correlations(c_CF, W_FD, G_FF, buf_CF, j_C, alpha_C)
    return idx_CK, active_CK


def _pick(c_CF: Tensor, nonneg: bool, drop_F: Tensor | None) -> tuple[Tensor, Tensor]:
    """The best atom per row: largest correlation (nonneg) or largest |correlation| (signed)."""
    if nonneg and drop_F is None:
        return row_max(c_CF)
    score_CF = c_CF if nonneg else c_CF.abs()
    if drop_F is not None:
        score_CF = score_CF.masked_fill(drop_F, float("-inf"))
    j_C = row_max(score_CF)[1]
    return c_CF.gather(-1, j_C[:, None])[:, 0], j_C


def row_max(s_CF: Tensor, block: int = 64) -> tuple[Tensor, Tensor]:
    """`s_CF.max(-1)` (first index on ties) in two levels: block maxima, then one block per row.

    Why: on CPU `max`/`argmax` with indices over a wide row is ~10x slower than `amax`, and this
    runs once per pursuit step over the whole `[rows, d_sae]` block.
    """
    C, F = s_CF.shape
    if F % block or F < 16 * block or not s_CF.is_contiguous():
        return s_CF.max(-1)
    blocks_CBL = s_CF.view(C, F // block, block)
    val_C, b_C = blocks_CBL.amax(-1).max(-1)
    inner_CL = blocks_CBL[torch.arange(C, device=s_CF.device), b_C]
    return val_C, b_C * block + inner_CL.argmax(-1)


def _update_correlations(c_CF: Tensor, W_FD: Tensor, G_FF: Tensor | None, buf_CF: Tensor | None,
                         j_C: Tensor, alpha_C: Tensor) -> None:
    """`c <- c - alpha * <d_j, W>`: one gathered Gram row per row (or one product without a Gram)."""
    if G_FF is not None:
        torch.index_select(G_FF, 0, j_C, out=buf_CF)
        c_CF.addcmul_(buf_CF, alpha_C[:, None], value=-1)
    else:
        c_CF.addmm_(W_FD[j_C] * alpha_C[:, None], W_FD.T, alpha=-1)


class MPCoefficients(torch.autograd.Function):
    """Coefficients of fixed, already-selected atoms, with the naive pursuit's gradient.

    forward(xc [N, D], W [F, D], idx [N, K], active [N, K]) -> alpha [N, K], where for each row
    `alpha_t = active_t * <r_t, W[idx_t]>`, `r_0 = xc`, `r_{t+1} = r_t - alpha_t W[idx_t]`.
    The backward walks the recursion in reverse, rebuilding `r_t = r_{t+1} + alpha_t d_t`, so it
    stores only `r_K` and alpha (no `[N, K, D]` or `[N, F]` tensors).
    """

    @staticmethod
    def forward(ctx, xc_ND: Tensor, W_FD: Tensor, idx_NK: Tensor, active_NK: Tensor) -> Tensor:
        with serial():  # k short memory-bound steps: one thread avoids a barrier per op (see serial)
            alpha_NK, r_ND, mask_NK = MPCoefficients._recurse(xc_ND, W_FD, idx_NK, active_NK)
        ctx.save_for_backward(W_FD, idx_NK, mask_NK, alpha_NK, r_ND)
        return alpha_NK

    @staticmethod
    def _recurse(xc_ND: Tensor, W_FD: Tensor, idx_NK: Tensor, active_NK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r_ND = xc_ND.clone()
        mask_NK = active_NK.to(xc_ND.dtype)
        alpha_NK = xc_ND.new_zeros(idx_NK.shape)
        for t in range(idx_NK.shape[1]):
            d_ND = W_FD[idx_NK[:, t]]
            a_N = row_dot(r_ND, d_ND) * mask_NK[:, t]
            alpha_NK[:, t] = a_N
            r_ND.addcmul_(d_ND, a_N[:, None], value=-1)
        return alpha_NK, r_ND, mask_NK

    @staticmethod
    def backward(ctx, g_alpha_NK: Tensor):
        with serial():
            return MPCoefficients._backward(ctx, g_alpha_NK)

    @staticmethod
    def _backward(ctx, g_alpha_NK: Tensor):
        W_FD, idx_NK, mask_NK, alpha_NK, r_ND = ctx.saved_tensors
        r_ND = r_ND.clone()
        rho_ND = torch.zeros_like(r_ND)  # dL/dr_{t+1}
        acc = _RowGradAccumulator(W_FD, *idx_NK.shape) if ctx.needs_input_grad[1] else None
        for t in reversed(range(idx_NK.shape[1])):
            j_N = idx_NK[:, t]
            d_ND = W_FD[j_N]
            a_N = alpha_NK[:, t]
            r_ND.addcmul_(d_ND, a_N[:, None])  # r_t
            ga_N = (g_alpha_NK[:, t] - row_dot(rho_ND, d_ND)) * mask_NK[:, t]
            if acc is not None:
                acc.add(j_N, r_ND, ga_N, rho_ND, a_N)
            rho_ND.addcmul_(d_ND, ga_N[:, None])
        grad_x = rho_ND if ctx.needs_input_grad[0] else None
        return grad_x, acc.result() if acc is not None else None, None, None


def row_dot(a_ND: Tensor, b_ND: Tensor) -> Tensor:
    """Row-wise dot products `[N]` as one batched product (no `[N, D]` temporary)."""
    return torch.bmm(a_ND.unsqueeze(1), b_ND.unsqueeze(2)).view(-1)


class _RowGradAccumulator:
    """Collects per-step atom gradients `gd [N, D]` for atoms `j [N]` and adds them into `grad_W [F, D]`.

    Why: `index_add_` of `[N, D]` rows into `[F, D]` was the single largest cost of an MP training
    step on CPU (~0.1 s per pursuit step, k of them). Instead up to STAGE_BYTES of steps are staged
    in one buffer and added with one sorted `embedding_bag` (`sparse.sparse_t_matmul`).
    """

    STAGE_BYTES = 64 * 2 ** 20

    def __init__(self, W_FD: Tensor, n_rows: int, steps: int):
        self.grad_FD = torch.zeros_like(W_FD)
        row_bytes = n_rows * W_FD.shape[1] * W_FD.element_size()
        slots = max(1, min(steps, self.STAGE_BYTES // max(row_bytes, 1)))
        self.gd_SND = W_FD.new_empty(slots, n_rows, W_FD.shape[1])
        self.j_SN = torch.empty(slots, n_rows, dtype=torch.long, device=W_FD.device)
        self.used = 0

    def add(self, j_N: Tensor, r_ND: Tensor, ga_N: Tensor, rho_ND: Tensor, a_N: Tensor) -> None:
        gd_ND = torch.mul(r_ND, ga_N[:, None], out=self.gd_SND[self.used])
        gd_ND.addcmul_(rho_ND, a_N[:, None], value=-1)
        self.j_SN[self.used] = j_N
        self.used += 1
        if self.used == self.gd_SND.shape[0]:
            self._flush()

    def _flush(self) -> None:
        if self.used:
            n = self.used
            j_R1 = self.j_SN[:n].reshape(-1, 1)
            gd_RD = self.gd_SND[:n].reshape(-1, self.gd_SND.shape[2])
            ones_R1 = torch.ones(j_R1.shape, dtype=gd_RD.dtype, device=gd_RD.device)
            self.grad_FD.add_(sparse_t_matmul(j_R1, ones_R1, gd_RD, self.grad_FD.shape[0]))
            self.used = 0

    def result(self) -> Tensor:
        self._flush()
        return self.grad_FD


def mp_coefficients(xc_ND: Tensor, W_FD: Tensor, sel: Selection) -> Tensor:
    """Differentiable coefficients `[N, K]` of the selected atoms (see MPCoefficients)."""
    return MPCoefficients.apply(xc_ND, W_FD, sel.idx_NK, sel.active_NK)


def merge_duplicates(idx_NK: Tensor, vals_NK: Tensor, trim: bool = False) -> tuple[Tensor, Tensor]:
    """Sum the coefficients of atoms picked more than once, left-packed per row.

    Why: MP may re-select an atom; the sparse code should list each latent once so that
    `l0()` counts distinct latents. Differentiable in `vals_NK`. Unused slots get index 0, value 0;
    `trim` drops the slots no row uses (variable-width codes of the adaptive mode).
    """
    idx_sorted, perm = idx_NK.sort(-1)
    vals_sorted = vals_NK.gather(-1, perm)
    new_group = torch.ones_like(idx_sorted, dtype=torch.bool)
    new_group[:, 1:] = idx_sorted[:, 1:] != idx_sorted[:, :-1]
    gid_NK = new_group.long().cumsum(-1) - 1
    out_vals = vals_NK.new_zeros(vals_NK.shape).scatter_add(-1, gid_NK, vals_sorted)
    out_idx = torch.zeros_like(idx_NK).scatter(-1, gid_NK, idx_sorted)
    if not trim or idx_NK.numel() == 0:
        return out_idx, out_vals
    width = int(gid_NK[:, -1].max()) + 1
    return out_idx[:, :width], out_vals[:, :width]


def sparse_decode(idx_NK: Tensor, vals_NK: Tensor, W_FD: Tensor) -> Tensor:
    """`sum_t vals_t * W[idx_t]` without materialising `[N, K, D]`.

    Uses the top-k SAE's `sparse.sparse_decode`, whose backward adds the decoder gradient with one
    sorted embedding_bag; autograd's own embedding_bag backward was ~10x slower here.
    """
    if idx_NK.shape[-1] == 0:
        return W_FD.new_zeros(idx_NK.shape[0], W_FD.shape[1])
    return topk_sparse_decode(vals_NK.to(W_FD.dtype), idx_NK, W_FD)


def naive_pursuit(xc_ND: Tensor, W_FD: Tensor, opts: PursuitOptions) -> tuple[Tensor, Tensor, Tensor]:
    """Eager reference: a full correlation product per step and autograd through the whole unroll.

    Returns (idx [N, K], alpha [N, K], residual norms [N, K+1]). Selection follows the same rules
    as `select_atoms` (fixed mode only), so the two can be compared atom by atom.
    """
    if opts.mode != "fixed":
        raise ValueError("naive_pursuit implements the fixed-k mode only")
    r_ND = xc_ND
    idx, alphas, norms = [], [], [r_ND.norm(dim=-1)]
    for _ in range(opts.steps):
        c_NF = r_ND @ W_FD.T
        j_N = (c_NF if opts.nonneg else c_NF.abs()).detach().argmax(-1)
        a_N = c_NF.gather(-1, j_N[:, None])[:, 0]
        a_N = a_N.clamp_min(0) if opts.nonneg else a_N
        r_ND = r_ND - a_N[:, None] * W_FD[j_N]
        idx.append(j_N)
        alphas.append(a_N)
        norms.append(r_ND.norm(dim=-1))
    return torch.stack(idx, -1), torch.stack(alphas, -1), torch.stack(norms, -1)
