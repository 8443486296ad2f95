"""The batch-source protocol the trainer reads from, and an in-memory implementation.

Why a protocol: the trainer must checkpoint *where it is in the data* (docs/RELIABILITY.md 16), whether
rows come from an on-disk store, memory, or a streaming model. Every source can report and
restore its position as plain JSON, and names a fingerprint of its contents so a resume against
different data is refused.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class BatchSource(Protocol):
    d_in: int
    fingerprint: str

    def next_batch(self) -> Tensor:
        """The next `[batch_size, d_in]` rows (float32)."""

    def state_dict(self) -> dict:
        """JSON-serialisable position (epoch, offset, seed...)."""

    def load_state_dict(self, state: dict) -> None: ...


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The deterministic row order of one epoch."""
    g = torch.Generator().manual_seed(hash_seed(seed, epoch))
    return torch.randperm(n, generator=g)


def hash_seed(*parts: int) -> int:
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class TensorBatches:
    """Shuffled batches from an in-memory tensor `[N, d_in]`, endlessly, epoch by epoch.

    With `rank`/`world_size`, each rank takes a disjoint slice of every global batch
    (rows `rank::world_size` of the global batch), so the union over ranks is the
    single-process batch.
    """

    def __init__(self, x_ND: Tensor, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.x_ND = x_ND
        self.d_in = x_ND.shape[-1]
        self.batch_size = batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.offset = 0, 0
        self._perm = self._make_perm()
        self._last_rows = torch.zeros(0, dtype=torch.int64)  # data rows of the latest batch (describe_rows)
        head = x_ND[: min(len(x_ND), 4096)].contiguous().float().numpy().tobytes()
        self.fingerprint = hashlib.sha256(head + str(tuple(x_ND.shape)).encode()).hexdigest()[:16]

    def _make_perm(self) -> Tensor:
        n = len(self.x_ND)
        return epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)

    def next_global_indices(self) -> Tensor:
        n = len(self.x_ND)
        if self.offset + self.batch_size > n:  # drop the ragged tail so every batch is full
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._make_perm()
        idx = self._perm[self.offset: self.offset + self.batch_size]
        self.offset += self.batch_size
        return idx

    def next_batch(self) -> Tensor:
        idx = self.next_global_indices()[self.rank:: self.world_size]
        self._last_rows = idx
        if isinstance(self.x_ND, Tensor):  # a row copy per index: half the time of advanced indexing, same rows
            return torch.index_select(self.x_ND, 0, idx).float()
        return self.x_ND[idx].float()  # row views of a store (they trace rows to documents)

    def describe_rows(self, rows: list[int]) -> str:
        """Where rows of the latest batch come from, so a NaN can be found in the data (promise 22):
        the document and position when the data is a store (or a view of one), else the data row."""
        valid = [r for r in rows if 0 <= r < len(self._last_rows)]
        if not valid:
            return ""
        data_rows = self._last_rows[valid]
        trace = getattr(self.x_ND, "describe_rows", None)
        if callable(trace):
            return trace(data_rows)
        return "data rows " + ", ".join(str(int(r)) for r in data_rows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self.seed = int(state["epoch"]), int(state["offset"]), int(state["seed"])
        self._perm = self._make_perm()
