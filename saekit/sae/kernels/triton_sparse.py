"""Triton kernels for the sparse half of a top-k step on GPUs: decode, its value gradient, and the
sparse weight gradient `S^T @ M`, each reading k rows per example instead of a dense `[B, d_sae]`.

Why: on a GPU the torch fallbacks (`embedding_bag`, its per-sample-weight backward, a sort plus an
`embedding_bag` for `S^T @ M`) launch several kernels and sort B*k entries every step; these
kernels do each product in one launch. Inputs may be bf16 (the tables and rows are read in their
dtype) and accumulate in float32; outputs are float32, like the parameters.

`available()` says whether they can run: Triton importable and either a CUDA tensor or Triton's
interpreter (`TRITON_INTERPRET=1`, set before this module is imported), which runs them on CPU
tensors; the tests compare them with the eager references that way. `saekit.sae.kernels.sparse`
calls them for CUDA tensors when `enabled()` and `available()`; everything else keeps the torch path.
`enabled()`: the Triton kernels (these and `triton_topk`) are opt-in, `SAEKIT_TRITON=1`, until they
have been measured on a GPU: so far they have run only under the interpreter and been compiled for
sm_90 without a device (scripts/bench_train_gpu.py is the check to run on one).
`S^T @ M` uses float32 atomic adds: fast, but not bit-reproducible run to run (the deterministic
training mode then keeps the torch path; see `sparse.sparse_t_matmul`).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path serves
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def enabled() -> bool:
    """Whether the user asked for the Triton kernels on CUDA (`SAEKIT_TRITON=1`; read at every call)."""
    return os.environ.get("SAEKIT_TRITON", "0") == "1"


def available(t: Tensor) -> bool:
    """Whether these kernels can run on tensors like `t` here."""
    return triton is not None and (t.device.type == "cuda" or INTERPRET)


if triton is not None:
    @triton.jit
    def _embed_sum_kernel(idx_ptr, w_ptr, table_ptr, out_ptr, K, D, BLOCK_D: tl.constexpr):
        """out[b, d-block] = sum_j w[b, j] * table[idx[b, j], d-block]; one program per (row, d-block)."""
        b = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = d < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j in range(0, K):
            f = tl.load(idx_ptr + b * K + j)
            w = tl.load(w_ptr + b * K + j).to(tl.float32)
            acc += w * tl.load(table_ptr + f * D + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * D + d, acc, mask=mask)

    @triton.jit
    def _gather_dot_kernel(idx_ptr, table_ptr, rows_ptr, out_ptr, K, D, BLOCK_D: tl.constexpr):
        """out[b, j] = table[idx[b, j]] . rows[b]; one program per (row, slot)."""
        b, j = tl.program_id(0), tl.program_id(1)
        f = tl.load(idx_ptr + b * K + j)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = d < D
            acc += (tl.load(table_ptr + f * D + d, mask=mask, other=0.0).to(tl.float32)
                    * tl.load(rows_ptr + b * D + d, mask=mask, other=0.0).to(tl.float32))
        tl.store(out_ptr + b * K + j, tl.sum(acc, axis=0))

    @triton.jit
    def _scatter_rows_kernel(idx_ptr, w_ptr, M_ptr, out_ptr, K, D, BLOCK_D: tl.constexpr):
        """out[idx[b, j], d-block] += w[b, j] * M[b, d-block] (S^T @ M); one program per (row, d-block)."""
        b = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = d < D
        m = tl.load(M_ptr + b * D + d, mask=mask, other=0.0).to(tl.float32)
        for j in range(0, K):
            f = tl.load(idx_ptr + b * K + j)
            w = tl.load(w_ptr + b * K + j).to(tl.float32)
            tl.atomic_add(out_ptr + f * D + d, w * m, mask=mask)


def _block(D: int) -> int:
    return min(triton.next_power_of_2(D), 256)


def embed_sum(idx_BK: Tensor, w_BK: Tensor, table_FD: Tensor) -> Tensor:
    """`out[b] = sum_j w[b, j] * table[idx[b, j]]`, `[B, D]` float32."""
    B, K = idx_BK.shape
    D = table_FD.shape[1]
    out = torch.empty(B, D, dtype=torch.float32, device=table_FD.device)
    if B and D:
        block = _block(D)
        _embed_sum_kernel[(B, triton.cdiv(D, block))](idx_BK.contiguous(), w_BK.contiguous(), table_FD.contiguous(),
                                                       out, K, D, BLOCK_D=block)
    return out


def gather_dot(idx_BK: Tensor, table_FD: Tensor, rows_BD: Tensor) -> Tensor:
    """`out[b, j] = table[idx[b, j]] . rows[b]`, `[B, K]` float32."""
    B, K = idx_BK.shape
    D = table_FD.shape[1]
    out = torch.empty(B, K, dtype=torch.float32, device=table_FD.device)
    if B and K:
        _gather_dot_kernel[(B, K)](idx_BK.contiguous(), table_FD.contiguous(), rows_BD.contiguous(), out, K, D,
                                   BLOCK_D=_block(D))
    return out


def sparse_t_matmul(idx_BK: Tensor, w_BK: Tensor, M_BD: Tensor, n: int) -> Tensor:
    """`S^T @ M`, `[n, D]` float32, where `S [B, n]` holds `w[b, j]` at `(b, idx[b, j])` (duplicates add)."""
    B, K = idx_BK.shape
    D = M_BD.shape[1]
    out = torch.zeros(n, D, dtype=torch.float32, device=M_BD.device)
    if B and K and D:
        block = _block(D)
        _scatter_rows_kernel[(B, triton.cdiv(D, block))](idx_BK.contiguous(), w_BK.contiguous(), M_BD.contiguous(),
                                                          out, K, D, BLOCK_D=block)
    return out
