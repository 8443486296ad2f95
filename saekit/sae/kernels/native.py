"""Optional native CPU kernels (`native.c`), compiled on first use and called through ctypes.

Why: after the sparse kernels, a top-k training step on a CPU is the encoder product plus a few
memory-bound passes, and the largest of those is `torch.topk` over `[B, d_sae]` (~1 ns per element,
it copies each row into (value, index) pairs and partially sorts them). The C top-k reads each row
once with vector loads and touches only the ~k blocks that can hold a winner: about 3x faster on the
benchmark shape. The k dot products of the decoder backward get the same treatment.

Nothing here is required. The library is built with the system C compiler (`cc`, or `$CC`) into
`$SAEKIT_CACHE_DIR` (default `~/.cache/saekit/native`), keyed by the source, the flags and the CPU,
and written atomically. If there is no compiler, the build fails, or `SAEKIT_NATIVE=0`, every
function here returns None and the callers use their torch paths, which tests compare these against.

Rows are split over `torch.get_num_threads()` OpenMP threads. Built with `-fopenmp` and loaded after
torch, the library binds to the libgomp torch already loaded and reuses its worker threads. (Measured
with Python threads instead: right after the encoder product, torch's OpenMP workers spin-wait for
several milliseconds and the extra threads lost ~10 ms per step competing with them for 2 cores.)
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from saekit.sae.kernels import grad_sumsq

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
SOURCES = (SOURCE, Path(__file__).with_name("native_filter.c"), Path(__file__).with_name("native_bf16.c"))
"""Compiled into one library; `native_filter.c` holds the certified bf16 pre-filter (`native_filter.py`),
`native_bf16.c` the bf16 step's top-k and gather (the bisection top-k, the row-order gather)."""
HEADER = Path(__file__).with_name("native_simd.h")  # vector helpers both sources include (part of the build key)
FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-Wno-unknown-pragmas"]
ATTEMPTS = (["-march=native", "-fopenmp"], ["-march=native"], [])
"""Tried in order: OpenMP and this CPU's vector width first; a compiler without OpenMP (Apple clang)
gets one thread, one that rejects -march=native (some ARM toolchains) gets portable code."""
BLOCK = 32  # must match BS in native.c
MAX_K, MAX_BLOCKS = 1024, 65536

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    return os.environ.get("SAEKIT_NATIVE", "1").lower() not in ("0", "false", "no", "off")


def _cpu_key() -> str:
    """Identifies the instruction set `-march=native` compiled for (a shared home directory may be
    mounted on machines with different CPUs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "saekit" / "native"
    return Path(os.environ.get("SAEKIT_CACHE_DIR", default))


def _compile(cc: str, flags: list[str], out: Path) -> None:
    """Compile to a temporary file in the cache folder, then rename: a concurrent or interrupted
    build never leaves a half-written library under the final name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} {' '.join(flags)} failed: {res.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
    src = b"".join(path.read_bytes() for path in (*SOURCES, HEADER))
    errors = []
    for flags in (FLAGS + extra for extra in ATTEMPTS):
        key = hashlib.sha256(src + " ".join([cc, *flags]).encode() + _cpu_key().encode()).hexdigest()[:16]
        out = _cache_dir() / f"saekit_native_{key}.so"
        if out.exists():
            return out
        try:
            _compile(cc, flags, out)
            return out
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            errors.append(str(e))
    raise RuntimeError("; ".join(errors))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    for name in ("saekit_topk_rows", "saekit_topk_rows_bf16"):
        getattr(lib, name).argtypes = [p, p, i64, i64, i32, p, p, i32]
        getattr(lib, name).restype = ctypes.c_int
    for name in ("saekit_gather_dot", "saekit_gather_dot_bf16"):
        getattr(lib, name).argtypes = [p, i64, i32, p, p, i64, p, i32]
        getattr(lib, name).restype = None
    lib.saekit_sparse_t_matmul.argtypes = [p, p, i64, i32, p, i32, i64, i64, i32, p, i32, p]
    lib.saekit_sparse_t_matmul.restype = ctypes.c_int
    for name in ("saekit_embed_sum", "saekit_embed_sum_bf16"):
        getattr(lib, name).argtypes = [p, p, i64, i32, p, i64, p, i32]
        getattr(lib, name).restype = None
    lib.saekit_decode_backward.argtypes = [p, p, i64, i32, p, p, i32, i64, i64, p, p, i32]
    lib.saekit_decode_backward.restype = ctypes.c_int
    lib.saekit_rows_remove_parallel.argtypes = [p, p, i64, i64, i32, p]
    lib.saekit_rows_remove_parallel.restype = ctypes.c_int
    lib.saekit_rows_unit_norm.argtypes = [p, i64, i64, i32]
    lib.saekit_rows_unit_norm.restype = None
    for name in ("saekit_topk_rows_bisect", "saekit_topk_rows_bf16_bisect"):
        getattr(lib, name).argtypes = [p, p, i64, i64, i32, p, p, i32]
        getattr(lib, name).restype = ctypes.c_int
    lib.saekit_embed_sum_rows_bf16.argtypes = [p, p, i64, i32, p, i64, p, i32]
    lib.saekit_embed_sum_rows_bf16.restype = None
    lib.saekit_filter_prep.argtypes = [p, i64, i64, p, p, i32]
    lib.saekit_filter_prep.restype = None
    f32 = ctypes.c_float
    lib.saekit_topk_filtered.argtypes = [p, p, p, p, p, i64, i64, i64, i32, f32, f32, f32, f32, f32, p, p, p, p, i32]
    lib.saekit_topk_filtered.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first call; None when disabled or unavailable."""
    global _lib, _tried
    if not enabled():
        return None
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _declare(ctypes.CDLL(str(_build())))
            except Exception as e:  # noqa: BLE001 - any failure means "use the torch path"
                log.warning("saekit native kernels unavailable, using torch fallbacks: %s", e)
                _lib = None
    return _lib


def _threads(n_rows: int) -> int:
    """Torch's thread count (so `sparse.serial()` applies here too), fewer for small batches."""
    return max(1, min(torch.get_num_threads(), n_rows // 64))


def _usable(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def topk_rows(pre_BF: Tensor, k: int, bias_F: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """Row-wise top-k `(values_BK, indices_BK)` of a float32 or bfloat16 `[B, F]` matrix (plus the float32
    `bias_F` when given: the selection and the values are those of `pre + bias`), unordered within a row,
    or None when the native path does not apply (then use `torch.topk`). Exact: the same set as
    `torch.topk` up to ties. A NaN anywhere also returns None, so NaN handling stays torch's.
    The values are float32 (for bf16 input: the bf16 values exactly, plus the bias; a bf16 encoder
    product under CPU autocast then needs neither torch's bf16 top-k nor a float32 copy of `[B, F]`)."""
    lib = library()
    if lib is None or pre_BF.dtype not in (torch.float32, torch.bfloat16) or pre_BF.dim() != 2 \
            or not _usable(pre_BF):
        return None
    B, F = pre_BF.shape
    if not (1 <= k <= MAX_K) or F % BLOCK or k > F // BLOCK or F // BLOCK > MAX_BLOCKS or B == 0:
        return None
    if bias_F is not None and (bias_F.dtype != torch.float32 or bias_F.shape != (F,) or not _usable(bias_F)):
        return None
    vals = torch.empty(B, k, dtype=torch.float32)
    idx = torch.empty(B, k, dtype=torch.int64)
    fn = _topk_fn(lib, pre_BF.dtype, F)
    status = fn(pre_BF.data_ptr(), bias_F.data_ptr() if bias_F is not None else None, B, F, k, vals.data_ptr(),
                idx.data_ptr(), _threads(B))
    return (vals, idx) if status == 0 else None


BISECT = {"on": True}
"""Test hook: False gives native.c's heap top-k (the two are compared in tests/test_native.py, tests/test_bf16_cpu.py)."""


def _topk_fn(lib: ctypes.CDLL, dtype: torch.dtype, F: int):
    """`native_bf16.c`'s bisection kernel (one body for float32 and bf16 rows; its thresholds take no
    data-dependent heap sifts: at k 32 on the benchmark shape ~0.6x the time for bf16 and for float32) where
    d_sae is a multiple of 256, else native.c's heap kernel. Both return the same values (the bisection: ties to
    the lower latent index)."""
    bisect = BISECT["on"] and F % 256 == 0
    if dtype == torch.float32:
        return lib.saekit_topk_rows_bisect if bisect else lib.saekit_topk_rows
    return lib.saekit_topk_rows_bf16_bisect if bisect else lib.saekit_topk_rows_bf16


def check_indices(idx: Tensor, n: int) -> None:
    """Raise IndexError unless every index is in [0, n): the kernels read memory at these offsets."""
    lo, hi = (int(v) for v in torch.aminmax(idx)) if idx.numel() else (0, 0)
    if lo < 0 or hi >= n:
        raise IndexError(f"latent index out of range: expected [0, {n}), found {lo if lo < 0 else hi}")


def _table_fn(lib: ctypes.CDLL, name: str, table: Tensor):
    """The float32 kernel, or its `_bf16` twin for a bf16 table (float32 sums either way); the gather of a
    bf16 table is `native_bf16.c`'s row-order one (whole rows, prefetched: ~0.7x the time)."""
    if table.dtype == torch.float32:
        return getattr(lib, name)
    if table.dtype != torch.bfloat16:
        return None
    return lib.saekit_embed_sum_rows_bf16 if name == "saekit_embed_sum" else getattr(lib, name + "_bf16")


def gather_dot(idx_BK: Tensor, table_FD: Tensor, rows_BD: Tensor) -> Tensor | None:
    """`out[b, j] = table[idx[b, j]] . rows[b]` (float32) for CPU tensors, `table` float32 or bf16,
    `rows` float32; or None (use the torch path)."""
    lib = library()
    if lib is None or rows_BD.dtype != torch.float32 or idx_BK.dtype != torch.int64 \
            or not _usable(idx_BK, table_FD, rows_BD) or _table_fn(lib, "saekit_gather_dot", table_FD) is None:
        return None
    B, K = idx_BK.shape
    F, D = table_FD.shape
    if B == 0 or K == 0:
        return None
    check_indices(idx_BK, F)
    out = torch.empty(B, K, dtype=torch.float32)
    _table_fn(lib, "saekit_gather_dot", table_FD)(idx_BK.data_ptr(), B, K, table_FD.data_ptr(), rows_BD.data_ptr(),
                                                   D, out.data_ptr(), _threads(B))
    return out


def sparse_t_matmul(idx_BK: Tensor, w_BK: Tensor, M_BD: Tensor, n: int, transposed: bool = False) -> Tensor | None:
    """`S^T @ M` `[n, D]` (or `M^T @ S` `[D, n]` when `transposed`), float32, where `S [B, n]` holds `w[b, j]`
    at `(b, idx[b, j])`, for CPU tensors (`w` float32, `M` float32 or bf16); None when the native path
    does not apply."""
    lib = library()
    if lib is None or w_BK.dtype != torch.float32 or M_BD.dtype not in (torch.float32, torch.bfloat16) \
            or idx_BK.dtype != torch.int64 or not _usable(idx_BK, w_BK, M_BD) or idx_BK.shape != w_BK.shape:
        return None
    B, K = idx_BK.shape
    D = M_BD.shape[1]
    check_indices(idx_BK, n)
    out = torch.empty((D, n) if transposed else (n, D), dtype=torch.float32)
    ss = ctypes.c_double(0.0) if grad_sumsq.active() else None  # a trainer's gradient norm: see grad_sumsq
    status = lib.saekit_sparse_t_matmul(idx_BK.data_ptr(), w_BK.data_ptr(), B, K, M_BD.data_ptr(),
                                        int(M_BD.dtype == torch.bfloat16), D, n, int(transposed), out.data_ptr(),
                                        _threads(max(n // 16, 1)), ctypes.byref(ss) if ss is not None else None)
    if status == 0 and ss is not None:
        grad_sumsq.record(out, ss.value)
    return out if status == 0 else None


def decode_backward(idx_BK: Tensor, vals_BK: Tensor, W_FD: Tensor, grad_BD: Tensor) -> tuple[Tensor, Tensor] | None:
    """Both gradients of `x_hat = sum_j vals[:, j] * W[idx[:, j]]` given `grad_BD` in one pass:
    `(grad_vals [B, K], grad_W [F, D])`, float32 (`grad_BD` float32 or bf16, the rest float32, CPU), the
    same as `gather_dot(idx, W, grad)` and `sparse_t_matmul(idx, vals, grad, F)`; or None."""
    lib = library()
    if lib is None or vals_BK.dtype != torch.float32 or W_FD.dtype != torch.float32 \
            or grad_BD.dtype not in (torch.float32, torch.bfloat16) or idx_BK.dtype != torch.int64 \
            or not _usable(idx_BK, vals_BK, W_FD, grad_BD) or idx_BK.shape != vals_BK.shape:
        return None
    B, K = idx_BK.shape
    F, D = W_FD.shape
    if B == 0 or K == 0 or grad_BD.shape != (B, D):
        return None
    check_indices(idx_BK, F)
    g_vals, g_W = torch.empty(B, K, dtype=torch.float32), torch.empty(F, D, dtype=torch.float32)
    status = lib.saekit_decode_backward(idx_BK.data_ptr(), vals_BK.data_ptr(), B, K, W_FD.data_ptr(), grad_BD.data_ptr(),
                                        int(grad_BD.dtype == torch.bfloat16), D, F, g_W.data_ptr(), g_vals.data_ptr(),
                                        _threads(max(F // 16, 1)))
    return (g_vals, g_W) if status == 0 else None


def embed_sum(idx_BK: Tensor, w_BK: Tensor, table_FD: Tensor) -> Tensor | None:
    """`out[b] = sum_j w[b, j] * table[idx[b, j]]`, `[B, D]` float32, for CPU tensors (`w` float32,
    `table` float32 or bf16), or None."""
    lib = library()
    if lib is None or w_BK.dtype != torch.float32 or idx_BK.dtype != torch.int64 \
            or not _usable(idx_BK, w_BK, table_FD) or idx_BK.shape != w_BK.shape \
            or _table_fn(lib, "saekit_embed_sum", table_FD) is None:
        return None
    B, K = idx_BK.shape
    F, D = table_FD.shape
    check_indices(idx_BK, F)
    out = torch.empty(B, D, dtype=torch.float32)
    _table_fn(lib, "saekit_embed_sum", table_FD)(idx_BK.data_ptr(), w_BK.data_ptr(), B, K, table_FD.data_ptr(), D,
                                                 out.data_ptr(), _threads(B))
    return out


def _rows_usable(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.dim() == 2 and t.shape == tensors[0].shape for t in tensors) \
        and _usable(*tensors)


def remove_parallel_rows_(g_FD: Tensor, W_FD: Tensor) -> bool:
    """`g[f] -= (g[f] . W[f]) W[f]` in place for float32 CPU `[F, D]` tensors (one pass instead of torch's
    three and a `[F, D]` temporary); False when the native path does not apply (nothing changed).
    While a trainer collects gradient sums of squares (`grad_sumsq`), the same pass sums the new rows' squares."""
    lib = library()
    if lib is None or not _rows_usable(g_FD, W_FD):
        return False
    ss = ctypes.c_double(0.0) if grad_sumsq.active() else None
    if lib.saekit_rows_remove_parallel(g_FD.data_ptr(), W_FD.data_ptr(), *g_FD.shape, _threads(g_FD.shape[0]),
                                       ctypes.byref(ss) if ss is not None else None) != 0:
        return False
    torch.autograd.graph.increment_version(g_FD)  # written through a raw pointer: records of the old values expire
    if ss is not None:
        grad_sumsq.record(g_FD, ss.value)
    return True


def unit_norm_rows_(W_FD: Tensor) -> bool:
    """`W[f] /= max(||W[f]||, 1e-12)` in place for a float32 CPU `[F, D]` tensor; False when the native
    path does not apply (nothing changed)."""
    lib = library()
    if lib is None or not _rows_usable(W_FD):
        return False
    lib.saekit_rows_unit_norm(W_FD.data_ptr(), *W_FD.shape, _threads(W_FD.shape[0]))
    return True
