"""A fused top-k encoder for GPUs (Triton): `top_k(ReLU)((x_BD - b_dec) @ W_enc_DF + b_enc)` without
writing the dense `[B, d_sae]` pre-activations to global memory.

Why (DESIGN.md §5): on a GPU the encoder product is cheap next to what follows it: the torch path
writes `[B, d_sae]` pre-activations (8192 x 32768 bf16 = 0.5 GB per step at the issue's H200 shape),
then `torch.topk` reads them back in several passes. Here each program computes `[BLOCK_B, BLOCK_F]`
tiles of the product in registers (fp32 accumulate; bf16 operands under bf16 autocast) and keeps
only what can be in a row's top k, by one of two methods (`METHOD`):

* "merge": a running per-row top-`K_PAD` over `TILES` consecutive tiles (`tl.topk` of each tile,
  one bitonic merge), written as `[B, n_groups * K_PAD]` candidates (33 MB at the H200 shape); a
  small `torch.topk` over them gives `[B, k]`. Exact, but every latent goes through a sort network
  (about 20 compare-exchange layers of int64 per element: compiled for sm_90, 4,096 SASS instructions,
  2,592 of them integer compares and selects, against the filter kernel's 2,424).
* "filter" (default where d_sae >= 64 * SAMPLE_EVERY): "merge" on every 16th latent gives each row a
  lower bound of its k-th largest value; one more product pass keeps the keys at or above it (~16 k
  a row expected, appended through one atomic a row per tile), and a `torch.topk` over those gives
  `[B, k]`. Exact too (the bound comes from the same arithmetic); rows that overflow their room take
  "merge". Costs one product, 1/16 of one through "merge", a compare and a prefix sum per element,
  and one host sync for the overflow check.

Which is faster on a given GPU is for `scripts/bench_train_gpu.py` to say; both are exact.

Candidates are int64 keys, `(order-preserving int32 of the fp32 value) << 32 | (2^31 - 1 - latent)`:
one comparison orders by value and, among equal values, prefers the LOWER latent index, so the
result is deterministic and the tie order is documented (the torch path's `topk` leaves it open).
The slots come back sorted by value, largest first; ReLU applies to the k values after selection,
as in `saekit.sae.topk` (`kernels.sparse.topk_select`).

The backward needs only the k selected values' gradients: `grad_x`, the k columns of `grad_W_enc`
and `grad_b_enc` (and `grad_b_dec`) come from `kernels.sparse` (`embed_sum`, `sparse_t_matmul`,
which use `triton_sparse` on CUDA and the torch path elsewhere); nothing `[B, d_sae]` is built.

`applies(x, k)` decides the dispatch (CUDA tensor, Triton with `tl.topk` importable, `SAEKIT_TRITON=1`
(opt-in until measured on a GPU, see `triton_sparse.enabled`), k <= MAX_K, no fp16 autocast); `encode_with_aux` is what `TopKSAE` calls then. Under
`TRITON_INTERPRET=1` (set before Triton is imported) the kernel runs on CPU tensors, which is how
tests/test_triton_topk.py checks it against the torch path.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from saekit.sae.kernels import triton_sparse
from saekit.sae.kernels.sparse import compute_dtype, embed_sum, sparse_encode, sparse_t_matmul, topk_select

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path serves
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TOPK = tl is not None and hasattr(tl, "topk") and hasattr(tl, "bitonic_merge")  # checked with Triton 3.9
MAX_K = 128  # larger k (AuxK's d_in // 2, say) keeps the torch path: the per-row buffer would not fit in registers
MIN_KEY = -0x7FFFFFFFFFFFFFFF  # below every key a finite value (or -inf) packs to
# A program covers 64 rows x 2048 latents. Compiled for sm_90 (Triton 3.9, no GPU needed), at k = 32 these tiles
# use 203 (bf16) and 183 (fp32) registers a thread and spill none (k = 64: 246; k = 128 with 32 rows: 255); fp32
# operands in the bf16 tile spilled, hence bf16 operands are cast before the kernel (tests/test_triton_topk.py
# compiles them and checks).
TILE = {"bf16": dict(BLOCK_B=64, BLOCK_F=128, BLOCK_D=64, TILES=16, num_warps=8),
        "fp32": dict(BLOCK_B=64, BLOCK_F=64, BLOCK_D=32, TILES=32, num_warps=8)}
TILE_INTERPRET = dict(BLOCK_B=16, BLOCK_F=16, BLOCK_D=16, TILES=2, num_warps=4)  # the interpreter is slow
METHOD = "filter"  # or "merge" (see the module docstring); scripts/bench_train_gpu.py times both
SAMPLE_EVERY = 16  # filter: the bound is the k-th largest over every 16th latent: ~16 k survivors a row expected
CAP_FACTOR = 4  # filter: room for 4x the expected survivors a row; rows past it (or under k) take the merge path


def available(t: Tensor) -> bool:
    """Whether the kernel can run on tensors like `t` here (CUDA, or CPU under the interpreter)."""
    return HAS_TOPK and (t.device.type == "cuda" or INTERPRET)


def applies(x: Tensor, k: int) -> bool:
    """Whether `TopKSAE` should take the fused path for this input: CUDA only (the CPU keeps its native
    kernels), only with `SAEKIT_TRITON=1` (opt-in), fp32 or bf16 inputs (float64 keeps its precision on the torch
    path), and the autocast dtype (if any) must be bf16."""
    dtype = compute_dtype(x.device)
    return (x.device.type == "cuda" and available(x) and triton_sparse.enabled()
            and k <= MAX_K and dtype in (None, torch.bfloat16) and x.dtype in (torch.float32, torch.bfloat16))


if triton is not None and HAS_TOPK:
    _MIN_KEY = tl.constexpr(MIN_KEY)  # a jit function reads only constexpr globals

    @triton.jit
    def _pack(v, cols):
        """fp32 values and their latent indices -> int64 keys ordered by value, then by lower index."""
        bits = v.to(tl.int32, bitcast=True)
        s = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return (s.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)[None, :]

    @triton.jit
    def _round_bf16(v):
        """fp32 -> the nearest bf16 (ties to even), kept in fp32: what the GPU's cast does."""
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _product_tile(x_ptr, w_ptr, b_ptr, row0, row_ok, cols, col_ok, D, stride_x, stride_w,
                      BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, DOT_BF16: tl.constexpr,
                      EMULATE_BF16: tl.constexpr, FP32_PRECISION: tl.constexpr):
        """`x[rows] @ W[:, cols] + b[cols]`, `[BLOCK_B, BLOCK_F]` fp32, accumulated over D in registers."""
        acc = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)
        # 64-bit scalar bases, 32-bit offsets within a block: B * D or D * F may pass 2^31, and 64-bit offset
        # tensors cost registers the selection needs (compiled for sm_90 they spilled)
        r = tl.arange(0, BLOCK_B)
        d = tl.arange(0, BLOCK_D)
        x_base = x_ptr + row0 * stride_x  # row0: int64
        w_base = w_ptr
        for d0 in range(0, D, BLOCK_D):
            d_ok = d0 + d < D
            a = tl.load(x_base + (r[:, None] * stride_x + d[None, :]), mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_base + (d[:, None] * stride_w + cols[None, :]), mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            x_base += BLOCK_D
            w_base += BLOCK_D * stride_w
            if DOT_BF16 and not EMULATE_BF16:
                acc = tl.dot(a.to(tl.bfloat16, fp_downcast_rounding="rtne"), w.to(tl.bfloat16, fp_downcast_rounding="rtne"),
                             acc)
            elif DOT_BF16:  # the interpreter multiplies bf16 tiles as raw uint16 and rounds casts wrongly (3.9)
                acc = tl.dot(_round_bf16(a), _round_bf16(w), acc, input_precision="ieee")  # exact products of bf16
            else:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=FP32_PRECISION)
        return acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    @triton.jit
    def _encode_topk_kernel(x_ptr, w_ptr, b_ptr, key_ptr, B, D, F, TILES, stride_x, stride_w,
                            K_PAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                            DOT_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr, FP32_PRECISION: tl.constexpr):
        """One program: BLOCK_B rows x TILES*BLOCK_F latents -> the rows' K_PAD largest keys of that group.

        Merge: the running best (sorted descending) against the tile's top K_PAD reversed (ascending);
        their elementwise max is a bitonic sequence holding the K_PAD largest of both, which one bitonic
        merge sorts again."""
        pid_b, pid_g = tl.program_id(0), tl.program_id(1)
        row0 = pid_b.to(tl.int64) * BLOCK_B  # a 64-bit scalar base, 32-bit offsets within the block
        r = tl.arange(0, BLOCK_B)
        row_ok = pid_b * BLOCK_B + r < B
        best = tl.full((BLOCK_B, K_PAD), _MIN_KEY, tl.int64)
        for t in range(0, TILES):
            cols = (pid_g * TILES + t) * BLOCK_F + tl.arange(0, BLOCK_F)
            col_ok = cols < F
            pre = _product_tile(x_ptr, w_ptr, b_ptr, row0, row_ok, cols, col_ok, D, stride_x, stride_w,
                                BLOCK_B, BLOCK_F, BLOCK_D, DOT_BF16, EMULATE_BF16, FP32_PRECISION)
            keys = tl.where(col_ok[None, :], _pack(pre, cols), _MIN_KEY)
            top = tl.topk(keys, K_PAD)
            best = tl.bitonic_merge(tl.maximum(best, tl.flip(top, 1)), descending=True)
        n_cand = tl.num_programs(1) * K_PAD
        slots = pid_g * K_PAD + tl.arange(0, K_PAD)
        tl.store(key_ptr + row0 * n_cand + (r[:, None] * n_cand + slots[None, :]), best, mask=row_ok[:, None])

    @triton.jit
    def _filter_kernel(x_ptr, w_ptr, b_ptr, bound_ptr, cnt_ptr, buf_ptr, B, D, F, TILES, stride_x, stride_w, CAP,
                       BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr, FP32_PRECISION: tl.constexpr):
        """One program: BLOCK_B rows x TILES*BLOCK_F latents; every key at or above its row's bound is
        appended to the row's list (`buf[row, cnt[row]++]`, atomically; past CAP only counted). No sorting:
        the product tile is compared once, and only the few survivors touch memory. (Per-element atomics
        on a row's counter, the obvious form, crash Triton 3.9's sm_90 compiler; one per row compiles.)"""
        pid_b, pid_g = tl.program_id(0), tl.program_id(1)
        row0 = pid_b.to(tl.int64) * BLOCK_B
        r = tl.arange(0, BLOCK_B)
        row_ok = pid_b * BLOCK_B + r < B
        bound = tl.load(bound_ptr + row0 + r, mask=row_ok, other=0x7FFFFFFFFFFFFFFF)
        for t in range(0, TILES):
            cols = (pid_g * TILES + t) * BLOCK_F + tl.arange(0, BLOCK_F)
            col_ok = cols < F
            pre = _product_tile(x_ptr, w_ptr, b_ptr, row0, row_ok, cols, col_ok, D, stride_x, stride_w,
                                BLOCK_B, BLOCK_F, BLOCK_D, DOT_BF16, EMULATE_BF16, FP32_PRECISION)
            keys = _pack(pre, cols)
            keep = ((keys >= bound[:, None]) & col_ok[None, :] & row_ok[:, None]).to(tl.int32)
            n = tl.sum(keep, axis=1)  # one atomic a row reserves the row's slots; a prefix sum places them
            base = tl.atomic_add(cnt_ptr + row0 + r, n, mask=row_ok & (n > 0), sem="relaxed")
            slot = base[:, None] + tl.cumsum(keep, axis=1) - keep
            tl.store(buf_ptr + row0 * CAP + (r[:, None] * CAP + slot), keys, mask=(keep > 0) & (slot < CAP))


def _unpack(keys: Tensor) -> tuple[Tensor, Tensor]:
    """int64 keys -> (fp32 values, int64 latent indices)."""
    s = (keys >> 32).to(torch.int32)
    vals = torch.where(s < 0, s ^ 0x7FFFFFFF, s).view(torch.float32)
    return vals, 0x7FFFFFFF - (keys & 0xFFFFFFFF)


def _tiles(D: int, F: int, K_PAD: int, tile: dict | None, bf16: bool) -> dict:
    t = {"num_warps": 4, **(tile or (TILE_INTERPRET if INTERPRET else TILE["bf16" if bf16 else "fp32"]))}
    t["BLOCK_F"] = max(t["BLOCK_F"], K_PAD)  # a tile must hold K_PAD candidates
    if K_PAD > 64 and tile is None:  # a wider running top-k: fewer rows a program, or it spills (sm_90, k = 128)
        t["BLOCK_B"] = min(t["BLOCK_B"], 32)
    t["TILES"] = max(1, min(t["TILES"], triton.cdiv(F, t["BLOCK_F"])))
    t["BLOCK_D"] = max(16, min(t["BLOCK_D"], triton.next_power_of_2(D)))
    return t


def _fp32_precision() -> str:
    """fp32 products as torch computes them: TF32 only where torch allows it (`set_float32_matmul_precision`)."""
    return "ieee" if INTERPRET or torch.get_float32_matmul_precision() == "highest" else "tf32"


def _launch(kernel, x: Tensor, W: Tensor, b: Tensor, ptrs: tuple, t: dict, bf16: bool, tail: tuple = (),
            **const) -> None:
    B, D = x.shape
    F = W.shape[1]
    grid = (triton.cdiv(B, t["BLOCK_B"]), triton.cdiv(F, t["BLOCK_F"] * t["TILES"]))
    kernel[grid](x, W, b, *ptrs, B, D, F, t["TILES"], x.stride(0), W.stride(0), *tail,
                 BLOCK_B=t["BLOCK_B"], BLOCK_F=t["BLOCK_F"], BLOCK_D=t["BLOCK_D"], DOT_BF16=bf16,
                 EMULATE_BF16=INTERPRET, FP32_PRECISION=_fp32_precision(), num_warps=t["num_warps"], **const)


def _merge(x: Tensor, W: Tensor, b: Tensor, k: int, K_PAD: int, t: dict, bf16: bool) -> Tensor:
    """The k largest keys a row, `[B, k]` sorted, through the running top-k of every latent."""
    n_groups = triton.cdiv(W.shape[1], t["BLOCK_F"] * t["TILES"])
    keys = torch.empty(x.shape[0], n_groups * K_PAD, dtype=torch.int64, device=x.device)
    if x.shape[0]:
        _launch(_encode_topk_kernel, x, W, b, (keys,), t, bf16, K_PAD=K_PAD)
    return keys.topk(k, dim=1, sorted=True).values  # the second, small pass: n_groups * K_PAD candidates a row


def _filter(x: Tensor, W: Tensor, b: Tensor, k: int, K_PAD: int, t: dict, bf16: bool, every: int,
            cap_factor: float) -> Tensor:
    """The same keys through a bound: the k-th largest value over every `every`-th latent (a lower bound of
    the row's k-th largest, computed by `_merge` with the same tile, so the same arithmetic) keeps the
    row's top k and ~k*every others; then one pass keeps what reaches the bound, one `topk` over the
    survivors. Rows with more than the room (or, never expected, fewer than k) take `_merge` again."""
    B = x.shape[0]
    kth = _merge(x, W[:, ::every].contiguous(), b[::every].contiguous(), k, K_PAD, t, bf16)[:, k - 1]
    s = (kth >> 32) - 64  # the value only (ties at the bound all pass), 64 ulps lower for good measure
    bound = s.clamp_min(-2**31) << 32
    cap = triton.next_power_of_2(int(cap_factor * k * every))
    buf = torch.full((B, cap), MIN_KEY, dtype=torch.int64, device=x.device)
    cnt = torch.zeros(B, dtype=torch.int32, device=x.device)
    _launch(_filter_kernel, x, W, b, (bound, cnt, buf), t, bf16, tail=(cap,))
    top = buf.topk(k, dim=1, sorted=True).values
    bad = ((cnt > cap) | (cnt < k)).nonzero().flatten()  # a host sync: the one price of the filter
    if bad.numel():
        top[bad] = _merge(x[bad], W, b, k, K_PAD, t, bf16)
    return top


def topk_pre(x_c_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, k: int, bf16: bool = False,
             tile: dict | None = None, method: str | None = None, every: int | None = None,
             cap_factor: float | None = None) -> tuple[Tensor, Tensor]:
    """The k largest of `x_c @ W_enc + b_enc` per row, `(values_BK fp32, indices_BK int64)`, sorted by
    value (largest first; equal values: lower index first). No ReLU here. `bf16`: bf16 operands, fp32
    accumulate. `tile`, `method`, `every`, `cap_factor` override the module's defaults (tests use them
    to cross tile, group and room edges on tiny shapes); the filter needs d_sae >= 64 * every."""
    B, D = x_c_BD.shape
    F = W_enc_DF.shape[1]
    K_PAD = max(triton.next_power_of_2(k), 2)
    t = _tiles(D, F, K_PAD, tile, bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32  # bf16 operands read as bf16: half the traffic, no spills
    x, W, b = x_c_BD.to(dtype).contiguous(), W_enc_DF.to(dtype).contiguous(), b_enc_F.contiguous()
    every = every or SAMPLE_EVERY
    if (method or METHOD) == "filter" and B and F // every >= (max(4 * K_PAD, 64) if method is None else k):
        top = _filter(x, W, b, k, K_PAD, t, bf16, every, cap_factor or CAP_FACTOR)
    else:
        top = _merge(x, W, b, k, K_PAD, t, bf16)
    return _unpack(top)


class FusedTopKEncode(torch.autograd.Function):
    """vals_BK, idx_BK = ReLU(top_k((x_BD - b_dec_D) @ W_enc_DF + b_enc_F)) with the product and the
    selection fused; the backward, as `kernels.sparse.SparseEncode`'s, touches only the k selected
    columns per row (slots whose value is 0 pass no gradient, as ReLU at 0)."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor | None, k: int):
        x_c_BD = x_BD - b_dec_D if b_dec_D is not None else x_BD
        bf16 = compute_dtype(x_BD.device) == torch.bfloat16 or torch.bfloat16 in (x_BD.dtype, W_enc_DF.dtype)
        vals_BK, idx_BK = topk_pre(x_c_BD, W_enc_DF, b_enc_F, k, bf16=bf16)
        vals_BK = vals_BK.clamp_min_(0).to(W_enc_DF.dtype)
        ctx.save_for_backward(x_c_BD, W_enc_DF, idx_BK, vals_BK)
        ctx.has_b_dec = b_dec_D is not None
        ctx.mark_non_differentiable(idx_BK)
        return vals_BK, idx_BK

    @staticmethod
    def backward(ctx, grad_vals_BK: Tensor, _grad_idx):
        x_c_BD, W_enc_DF, idx_BK, vals_BK = ctx.saved_tensors
        need_x, need_W, need_be, need_bd = ctx.needs_input_grad[:4]
        g_BK = (grad_vals_BK * (vals_BK != 0)).to(W_enc_DF.dtype)
        n_lat = W_enc_DF.shape[1]
        g_x = g_W = g_be = g_bd = None
        if need_W:  # x^T @ S: only the selected columns receive gradient
            g_W = sparse_t_matmul(idx_BK, g_BK, x_c_BD.to(W_enc_DF.dtype), n_lat, transposed=True)
        if need_be or (need_bd and ctx.has_b_dec):
            s_F = g_BK.new_zeros(n_lat).index_add_(0, idx_BK.reshape(-1), g_BK.reshape(-1))
            g_be = s_F if need_be else None
            g_bd = -(W_enc_DF @ s_F) if need_bd and ctx.has_b_dec else None
        if need_x:
            g_x = embed_sum(idx_BK, g_BK, W_enc_DF.t().contiguous()).to(x_c_BD.dtype)
        return g_x, g_W, g_be, g_bd, None


def fused_topk_encode(x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor | None,
                      k: int) -> tuple[Tensor, Tensor]:
    """`(vals_BK, idx_BK)`: the fused encoder (forward in Triton, sparse backward)."""
    return FusedTopKEncode.apply(x_BD, W_enc_DF, b_enc_F, b_dec_D, k)


def encode_with_aux(x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor | None, k: int,
                    dead_F: Tensor | None, aux_k: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    """`TopKSAE`'s row-wise top-k encode on the fused path: `((vals, idx), aux)` where `aux` is None
    without dead latents, else the dead latents' own top-`aux_k` `(vals, idx)` (AuxK, ReLU after),
    as the torch path computes it. AuxK only needs the dead columns' product, `[B, n_dead]`, through
    `kernels.sparse.sparse_encode` (its gradients reach `W_enc`/`b_enc` through `index_select`)."""
    main = fused_topk_encode(x_BD, W_enc_DF, b_enc_F, b_dec_D, k)
    if dead_F is None:
        return main, None
    x_c_BD = x_BD - b_dec_D if b_dec_D is not None else x_BD
    n_aux = min(aux_k, dead_F.numel())
    vals, pos = sparse_encode(x_c_BD, W_enc_DF.index_select(1, dead_F), b_enc_F.index_select(0, dead_F), None,
                              topk_select(n_aux))
    return main, (vals, dead_F[pos])
