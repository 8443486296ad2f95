"""Sums of squares of gradients, taken by the kernels that write them, so the trainer's gradient norm
needs no extra pass over them.

Why: clipping and the non-finite check need the global gradient norm; `torch.nn.utils.get_total_norm`
reads every gradient once more after it is final (32 MB on the benchmark shape, ~4 ms of a ~180 ms CPU
step). The native kernels that write the large gradients (`sparse_t_matmul`, the encoder's weight
gradient; `remove_parallel_rows_`, the last edit of the unit-norm decoder's) square each tile while it
is still in cache and record the sum here, but only while a trainer collects (`collecting()`), so code
that runs a backward on its own never keeps tensors alive through this module.

A record holds the tensor's storage (so that memory cannot be freed and reused while recorded; not the
tensor itself, which autograd then could not hand to `.grad` without a copy), where the tensor starts, its
shape, strides and dtype, and its version counter at the time. `lookup(g)` answers only for a tensor over
the same memory, shape, strides and dtype whose version is unchanged (autograd's `.grad` is the kernel's
output or a detached alias of it, which shares the counter), i.e. nothing wrote to it since: an in-place
torch op such as a distributed average or a clip bumps the version, and native kernels that write through
raw pointers bump it themselves (`torch.autograd.graph.increment_version`). Anything else falls back to torch.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import Tensor

_records: list[tuple] | None = None  # (storage, _key(t), version, sum of squares); None: not collecting


def active() -> bool:
    """True while a trainer collects: kernels then compute the by-product."""
    return _records is not None


@contextlib.contextmanager
def collecting() -> Iterator[None]:
    """Record the kernels' sums of squares from here to the end of the block, then forget them."""
    global _records
    outer, _records = _records, []
    try:
        yield
    finally:
        _records = outer


def record(t: Tensor, sumsq: float) -> None:
    """`sumsq` is the sum of squares of `t` as it is now (called by the kernel that just wrote it)."""
    if _records is not None:
        _records.append((t.untyped_storage(), _key(t), t._version, float(sumsq)))


def forget() -> None:
    """Drop the records so far (the gradients are about to change where versions cannot tell)."""
    if _records is not None:
        _records.clear()


def lookup(g: Tensor) -> float | None:
    """The recorded sum of squares of `g`'s current values, or None (the newest record wins)."""
    if _records is None:
        return None
    key = _key(g)
    for _storage, k, version, sumsq in reversed(_records):
        if k == key and g._version == version:
            return sumsq
    return None


def _key(t: Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device
