"""Sparse encode/decode for top-k style SAEs: custom autograd functions plus dense references.

Why (DESIGN.md §5): after the top-k selection a training step only touches k of d_sae latents per
row, so the one dense product a step needs is the encoder product `x @ W_enc`. Autograd on the
dense formulation spends about five more dense products (decode, its two gradients, the encoder's
two gradients) and several passes over `[B, d_sae]` tensors. Here:

* `sparse_decode`  x_hat_BD = sum_j vals_BK[:, j] * W_dec_FD[idx_BK[:, j]] + b_dec_D
  forward is an `embedding_bag` (gathers k rows, never builds `[B, k, D]`); backward computes
  `grad_vals` as k dot products per row and `grad_W_dec` as a sparse `S^T @ grad`.
* `sparse_encode`  vals_BK = select(pre_BF) with pre_BF = (x_BD - b_dec_D) @ W_enc_DF + b_enc_F
  forward runs the dense product (optionally into a reused workspace) and hands it to `select`;
  backward never touches `[B, d_sae]`: `grad_W_enc = x^T @ S` touches only the selected columns.

`S^T @ M` for a row-sparse S (k entries per row) is computed by sorting the entries by latent and
running one `embedding_bag` over the rows of M: measured ~100x faster than `index_add_` of the k
outer products and ~100x faster than MKL's CSR `sparse.mm` on the benchmark shape (2 cores).

Each fast primitive has an eager dense `*_ref` beside it; tests check values and gradients agree
and that the autograd functions pass `torch.autograd.gradcheck` in float64.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.sae.kernels import native, native_filter, triton_sparse

Select = Callable[[Tensor], tuple[Tensor, Tensor]]
"""`select(pre_BF) -> (idx_BK, vals_BK)`: which latents fire and their values; a slot whose value
is 0 is inactive and passes no gradient (as ReLU at 0)."""


@contextlib.contextmanager
def serial() -> Iterator[None]:
    """Run the O(B*K*D) sparse ops on one thread.

    They are memory-bound and short, so a second thread gains little; but every parallel region
    waits for all its threads, and on a shared machine (other processes on the cores) each wait can
    cost a scheduler time slice. Measured: with other jobs running, the many short parallel ops
    took the step from 0.8x to 0.4x of the encoder-product floor. Only the encoder product and
    the top-k keep all threads. (torch.set_num_threads costs < 1 us.)
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# -- sparse primitives -----------------------------------------------------------------------
def _on_gpu_triton(t: Tensor) -> bool:
    """CUDA tensors take the Triton kernels when Triton is installed and `SAEKIT_TRITON=1` (opt-in until
    measured on a GPU; `saekit.sae.kernels.triton_sparse.enabled`)."""
    return t.device.type == "cuda" and triton_sparse.enabled() and triton_sparse.available(t)



def embed_sum(idx_BK: Tensor, w_BK: Tensor, table_FD: Tensor) -> Tensor:
    """`out[b] = sum_j w[b, j] * table[idx[b, j]]`, `[B, D]`, without materialising `[B, K, D]`."""
    if idx_BK.shape[1] == 0:
        return table_FD.new_zeros(idx_BK.shape[0], table_FD.shape[1])
    if _on_gpu_triton(table_FD) and table_FD.dtype == torch.float32:
        return triton_sparse.embed_sum(idx_BK, w_BK, table_FD)
    fast = native.embed_sum(idx_BK, w_BK, table_FD)
    if fast is not None:
        return fast
    return F.embedding_bag(idx_BK, table_FD, per_sample_weights=w_BK.to(table_FD.dtype), mode="sum")


def embed_sum_ref(idx_BK: Tensor, w_BK: Tensor, table_FD: Tensor) -> Tensor:
    return (w_BK.unsqueeze(-1) * table_FD[idx_BK]).sum(1)


def gather_dot(idx_BK: Tensor, table_FD: Tensor, rows_BD: Tensor) -> Tensor:
    """`out[b, j] = table[idx[b, j]] . rows[b]`, `[B, K]`: the k dot products per row a sparse
    decode's backward needs (uses ATen's embedding_bag per-sample-weight backward kernel)."""
    B, K = idx_BK.shape
    if K == 0:
        return rows_BD.new_zeros(B, 0)
    if _on_gpu_triton(table_FD) and table_FD.dtype == rows_BD.dtype == torch.float32:
        return triton_sparse.gather_dot(idx_BK, table_FD, rows_BD)
    fast = native.gather_dot(idx_BK, table_FD, rows_BD)
    if fast is not None:
        return fast
    native.check_indices(idx_BK, table_FD.shape[0])  # ATen's kernel below does not bounds-check
    offsets = torch.arange(0, B * K, K, device=idx_BK.device)
    offset2bag = torch.arange(B, device=idx_BK.device).repeat_interleave(K)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        rows_BD.contiguous(), table_FD.contiguous(), idx_BK.reshape(-1).contiguous(), offsets, offset2bag, 0, -1)
    return out.view(B, K)


def gather_dot_ref(idx_BK: Tensor, table_FD: Tensor, rows_BD: Tensor) -> Tensor:
    return (table_FD[idx_BK] * rows_BD.unsqueeze(1)).sum(-1)


def sparse_t_matmul(idx_BK: Tensor, w_BK: Tensor, M_BD: Tensor, n: int, transposed: bool = False) -> Tensor:
    """`S^T @ M`, `[n, D]` (or, `transposed`, `M^T @ S` `[D, n]`, contiguous), where `S [B, n]` holds
    `w[b, j]` at `(b, idx[b, j])` (duplicates add).

    Torch path: sort the B*K entries by latent; then each latent's output row is a weighted sum of
    rows of M, which is exactly an `embedding_bag` with one bag per latent (empty bags give zeros).
    The native kernel does the same and writes the transposed layout directly (the encoder's weight
    is `[D, n]`; a separate transposing copy of the gradient took ~8 ms a step on the benchmark).
    """
    if _on_gpu_triton(M_BD) and M_BD.dtype == torch.float32 and not torch.are_deterministic_algorithms_enabled():
        out = triton_sparse.sparse_t_matmul(idx_BK, w_BK, M_BD, n)  # float32 atomics: not bit-reproducible
        return out.t().contiguous() if transposed else out
    fast = native.sparse_t_matmul(idx_BK, w_BK, M_BD, n, transposed)
    if fast is not None:
        return fast
    native.check_indices(idx_BK, n)  # else bincount grows past n and embedding_bag fails obscurely
    out = _sparse_t_matmul_torch(idx_BK, w_BK, M_BD, n)
    return out.t().contiguous() if transposed else out


def _sparse_t_matmul_torch(idx_BK: Tensor, w_BK: Tensor, M_BD: Tensor, n: int) -> Tensor:
    B, K = idx_BK.shape
    flat_idx = idx_BK.reshape(-1)
    # int32 keys: torch's int64 sort took ~150x longer on top-k index patterns (192 ms vs 0.8 ms)
    order = torch.argsort(flat_idx.to(torch.int32) if n < 2**31 else flat_idx)
    rows = torch.div(order, max(K, 1), rounding_mode="floor")
    counts = torch.bincount(flat_idx, minlength=n)
    offsets = torch.zeros(n, dtype=torch.long, device=idx_BK.device)
    offsets[1:] = counts[:-1].cumsum(0)
    return F.embedding_bag(rows, M_BD.contiguous(), offsets, per_sample_weights=w_BK.reshape(-1)[order].to(M_BD.dtype),
                           mode="sum")


def sparse_t_matmul_ref(idx_BK: Tensor, w_BK: Tensor, M_BD: Tensor, n: int) -> Tensor:
    S_BN = w_BK.new_zeros(idx_BK.shape[0], n).scatter_add_(1, idx_BK, w_BK)
    return S_BN.T @ M_BD


# -- decode ------------------------------------------------------------------------------------
class SparseDecode(torch.autograd.Function):
    """x_hat_BD = sum_j vals_BK[:, j] * W_dec_FD[idx_BK[:, j]] (+ b_dec_D); sparse in both passes.

    On CPU with the native kernels the backward is one fused pass (`native.decode_backward`): each row of
    the incoming gradient is read once for both weight and value gradients. Under CPU bf16 autocast the
    forward gather reads a bf16 copy of W_dec made once per step (half the bytes of its ~2^17 row reads),
    summing in float32; the output, the gradients and the parameter stay float32."""

    @staticmethod
    def forward(ctx, vals_BK: Tensor, idx_BK: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor | None) -> Tensor:
        table_FD = _bf16_table(W_dec_FD)
        ctx.save_for_backward(vals_BK, idx_BK, W_dec_FD, table_FD)
        ctx.has_bias = b_dec_D is not None
        out_BD = embed_sum(idx_BK, vals_BK, table_FD if table_FD is not None else W_dec_FD)  # all threads
        with serial():
            return out_BD.add_(b_dec_D) if b_dec_D is not None else out_BD

    @staticmethod
    def backward(ctx, grad_BD: Tensor):
        vals_BK, idx_BK, W_dec_FD, table_FD = ctx.saved_tensors
        grad_BD = grad_BD.contiguous()
        fused = native.decode_backward(idx_BK, vals_BK, W_dec_FD, grad_BD) \
            if ctx.needs_input_grad[0] and ctx.needs_input_grad[2] else None
        if fused is not None:  # both products in one pass over the rows of grad (CPU): ~2x the two below
            with serial():
                g_b = grad_BD.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
            return fused[0], None, fused[1], g_b
        # the two sparse products are heavy enough (~2^26 multiply-adds each) to use all threads
        g_vals = gather_dot(idx_BK, table_FD if table_FD is not None else W_dec_FD, grad_BD) \
            if ctx.needs_input_grad[0] else None
        g_W = None
        if ctx.needs_input_grad[2]:
            M_BD = grad_BD.to(torch.bfloat16) if table_FD is not None else grad_BD  # bf16 rows, float32 sums
            g_W = sparse_t_matmul(idx_BK, vals_BK.to(W_dec_FD.dtype), M_BD, W_dec_FD.shape[0])
        with serial():
            g_b = grad_BD.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return g_vals, None, g_W, g_b


def _native_bf16(device: torch.device) -> bool:
    """True under CPU bf16 autocast when the native kernels (which read bf16 and sum in float32) are there."""
    return device.type == "cpu" and compute_dtype(device) == torch.bfloat16 and native.library() is not None


def _bf16_table(W_FD: Tensor) -> Tensor | None:
    """A bf16 copy of a float32 weight for the native gathers under CPU bf16 autocast, else None."""
    if W_FD.dtype != torch.float32 or not _native_bf16(W_FD.device):
        return None
    with torch.no_grad():
        return W_FD.detach().to(torch.bfloat16)


def sparse_decode(vals_BK: Tensor, idx_BK: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor | None = None) -> Tensor:
    return SparseDecode.apply(vals_BK, idx_BK, W_dec_FD, b_dec_D)


def dense_decode_ref(vals_BK: Tensor, idx_BK: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor | None = None) -> Tensor:
    """Eager reference: scatter into a dense code and multiply."""
    z_BF = vals_BK.new_zeros(vals_BK.shape[0], W_dec_FD.shape[0]).scatter_add(1, idx_BK, vals_BK)
    out = z_BF @ W_dec_FD
    return out + b_dec_D if b_dec_D is not None else out


# -- encode ------------------------------------------------------------------------------------
class SparseEncode(torch.autograd.Function):
    """vals_BK, idx_BK = select((x_BD - b_dec_D) @ W_enc_DF + b_enc_F); gradients only through the
    selected, non-zero slots, so the backward costs O(B*K*D) instead of two dense products.

    A `select` with `adds_bias = True` is called as `select(pre_BF, b_enc_F)` on the bias-free product
    (CPU): it adds the bias itself (the native top-k does it while reading the block), which saves
    copying b_enc over the whole `[B, d_sae]` block and the GEMM reading it back (~10 % of a step)."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor | None, select: Select,
                out_BF: Tensor | None = None):
        with serial():
            x_c_BD = _centred(x_BD, b_dec_D)
        filtered = _filtered_select(x_c_BD, W_enc_DF, b_enc_F, select, out_BF)
        WT_FD = None
        if filtered is not None:  # exact float32 top-k from a certified bf16 pre-filter (CPU, native)
            idx_BK, vals_BK, WT_FD = filtered
            x_op_BD = x_c_BD
        else:
            fuse_bias = getattr(select, "adds_bias", False) and x_BD.device.type == "cpu"
            pre_BF, x_op_BD = _encoder_product(x_c_BD, W_enc_DF, None if fuse_bias else b_enc_F, out_BF)
            idx_BK, vals_BK = select(pre_BF, b_enc_F.detach()) if fuse_bias else select(pre_BF)
            del pre_BF  # the backward never needs the dense pre-activations
        vals_BK = vals_BK.to(W_enc_DF.dtype)  # bf16 product: the k values in the parameters' dtype
        # under CPU bf16 autocast the weight gradient reads the bf16 rows the product read (half the bytes);
        # the filter's transposed W_enc is kept only when the input gradient will read it
        ctx.save_for_backward(x_c_BD, x_op_BD if _native_bf16(x_BD.device) else x_c_BD, W_enc_DF, idx_BK, vals_BK,
                              WT_FD if ctx.needs_input_grad[0] else None)
        ctx.has_b_dec = b_dec_D is not None
        ctx.mark_non_differentiable(idx_BK)
        return vals_BK, idx_BK

    @staticmethod
    def backward(ctx, grad_vals_BK: Tensor, _grad_idx):
        x_c_BD, x_op_BD, W_enc_DF, idx_BK, vals_BK, WT_FD = ctx.saved_tensors
        need_x, need_W, need_be, need_bd = ctx.needs_input_grad[:4]
        need_bd = need_bd and ctx.has_b_dec
        with serial():
            g_BK = (grad_vals_BK * (vals_BK != 0)).to(W_enc_DF.dtype)  # bf16 under autocast -> param dtype
        n_lat = W_enc_DF.shape[1]
        g_x = g_W = g_be = g_bd = None
        if need_W:  # x^T @ S: only the selected columns receive gradient (all threads, as in the decoder)
            g_W = sparse_t_matmul(idx_BK, g_BK, x_op_BD, n_lat, transposed=True)
        with serial():
            if need_be or need_bd:
                s_F = g_BK.new_zeros(n_lat).index_add_(0, idx_BK.reshape(-1), g_BK.reshape(-1))
                g_be = s_F if need_be else None
                g_bd = -(W_enc_DF @ s_F) if need_bd else None  # sum over rows of -grad_x, without grad_x
            if need_x:
                g_x = embed_sum(idx_BK, g_BK, WT_FD if WT_FD is not None else W_enc_DF.t().contiguous())
        return g_x, g_W, g_be, g_bd, None, None


def _centred(x_BD: Tensor, b_dec_D: Tensor | None) -> Tensor:
    """`x - b_dec`; under CPU bf16 autocast with the native kernels, written straight into bf16 (the product's
    operand, and what the weight gradient reads): one pass, the same bits as the float32 difference cast after
    (the float32 `x_c` has no other reader there)."""
    if b_dec_D is None:
        return x_BD
    if _native_bf16(x_BD.device) and x_BD.dtype == b_dec_D.dtype == torch.float32:
        with torch.autocast("cpu", enabled=False):
            return torch.sub(x_BD, b_dec_D, out=torch.empty(x_BD.shape, dtype=torch.bfloat16))
    return x_BD - b_dec_D


def _filtered_select(x_c_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, select: Select,
                     out_BF: Tensor | None) -> tuple[Tensor, Tensor, Tensor] | None:
    """`(idx_BK, vals_BK, W_enc^T)` through `native_filter` for a selection that declares a row-wise top-k
    (`select.rowwise_k`, completed by `select.finish(idx, vals, cols)`), float32 on CPU; else None (dense path).
    The workspace `out_BF`, when given, holds the filter's bf16 product blocks (pages already mapped)."""
    k = getattr(select, "rowwise_k", None)
    if k is None or x_c_BD.device.type != "cpu" or compute_dtype(x_c_BD.device) is not None:
        return None
    found = native_filter.topk(x_c_BD, W_enc_DF, b_enc_F, k, out_BF)
    if found is None:
        native_filter.record_dense()
        return None
    vals_BK, idx_BK, WT_FD = found

    def cols(idx_A: Tensor) -> Tensor:  # exact float32 pre-activations of a few latents (AuxK's dead ones)
        with torch.no_grad():
            return torch.mm(x_c_BD.detach(), W_enc_DF.detach().index_select(1, idx_A)).add_(b_enc_F.detach()[idx_A])
    idx_BK, vals_BK = select.finish(idx_BK, vals_BK, cols)
    return idx_BK, vals_BK, WT_FD


def compute_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force on `device` (bf16 under `precision: bf16`), None outside autocast."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _encoder_product(x_c_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor | None,
                     out_BF: Tensor | None) -> tuple[Tensor, Tensor]:
    """`(x_c @ W_enc [+ b_enc], the x operand)`, `[B, F]`. Under autocast the operands are cast
    explicitly (autocast ignores ops with `out=`), so a reused workspace of the autocast dtype works:
    on a CPU with bf16 instructions (AMX / AVX512-BF16) the bf16 product is ~3-4x the float32 one, and
    the native row-wise top-k reads the bf16 block directly. Parameters (and Adam's state) stay float32."""
    dtype = compute_dtype(x_c_BD.device)
    if dtype is not None and dtype != W_enc_DF.dtype:
        with torch.autocast(x_c_BD.device.type, enabled=False):
            x_op, W_op = x_c_BD.to(dtype), W_enc_DF.to(dtype)
            b_op = b_enc_F.to(dtype) if b_enc_F is not None else None
    else:
        x_op, W_op, b_op = x_c_BD, W_enc_DF, b_enc_F
    kw = {"out": out_BF} if out_BF is not None else {}
    with torch.autocast(x_c_BD.device.type, enabled=False):
        pre = torch.addmm(b_op, x_op, W_op, **kw) if b_op is not None else torch.mm(x_op, W_op, **kw)
    return pre, x_op


def sparse_encode(x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor | None, select: Select,
                  out_BF: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Encode with `select`; `out_BF` is an optional reused buffer for the dense pre-activations
    (reusing it saves the page faults of a fresh `[B, d_sae]` allocation every step)."""
    return SparseEncode.apply(x_BD, W_enc_DF, b_enc_F, b_dec_D, select, out_BF)


def dense_encode_ref(x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor | None,
                     select: Select) -> tuple[Tensor, Tensor]:
    """Eager reference: dense pre-activations through autograd, then gather the selected slots."""
    x_c = x_BD - b_dec_D if b_dec_D is not None else x_BD
    pre_BF = x_c @ W_enc_DF + b_enc_F
    with torch.no_grad():
        idx_BK, vals_BK = select(pre_BF.detach())
    return pre_BF.gather(1, idx_BK) * (vals_BK != 0), idx_BK


# -- loss ------------------------------------------------------------------------------------------
class SquaredErrorSum(torch.autograd.Function):
    """sum((recon - x)^2): one pass each way, its backward on one thread (see `serial`). The sum of
    squares is a BLAS dot of the difference with itself (no `[B, D]` temporary for the squares)."""

    @staticmethod
    def forward(ctx, recon: Tensor, x: Tensor) -> Tensor:
        with serial():
            diff = recon - x
            ctx.save_for_backward(diff)
            if diff.dtype in (torch.float32, torch.float64) and diff.is_contiguous():
                flat = diff.view(-1)
                return torch.dot(flat, flat)
            return diff.pow(2).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (diff,) = ctx.saved_tensors
        with serial():
            g = diff * (2 * grad)
            return (g if ctx.needs_input_grad[0] else None), (-g if ctx.needs_input_grad[1] else None)


def squared_error_sum(recon: Tensor, x: Tensor) -> Tensor:
    return SquaredErrorSum.apply(recon, x)


# -- selections ----------------------------------------------------------------------------------
def rowwise_topk(pre_BF: Tensor, k: int, bias_F: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`(values_BK, indices_BK)` of each row's k largest entries of `pre_BF (+ bias_F)`, unordered: the
    native kernel where it applies (float32 or bf16 on CPU, see `saekit.sae.kernels.native`; it adds the
    bias while reading), else `torch.topk(sorted=False)`."""
    fast = native.topk_rows(pre_BF, k, bias_F) if pre_BF.device.type == "cpu" else None
    if fast is not None:
        return fast
    return (pre_BF if bias_F is None else pre_BF + bias_F).topk(k, dim=1, sorted=False)


def topk_select(k: int) -> Select:
    """Row-wise top-k of the pre-activations, ReLU applied to the k values only (not to `[B, F]`);
    it adds the encoder bias itself (`adds_bias`, see `SparseEncode`)."""
    def select(pre_BF: Tensor, bias_F: Tensor | None = None) -> tuple[Tensor, Tensor]:
        vals_BK, idx_BK = rowwise_topk(pre_BF, k, bias_F)
        with serial():
            return idx_BK, vals_BK.clamp_min_(0)

    def finish(idx_BK: Tensor, vals_BK: Tensor, _cols) -> tuple[Tensor, Tensor]:
        with serial():
            return idx_BK, vals_BK.clamp_min_(0)
    select.adds_bias = True
    select.rowwise_k = k  # SparseEncode may take the exact top-k from `native_filter`, then calls finish
    select.finish = finish
    return select
