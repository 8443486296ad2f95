"""Feeding many trainers from one batch stream: the data plumbing of multi-SAE runs.

Why here, in `train/`: these classes know batch sources and trainers only, never runs, configs or
stores; the orchestration that builds them from a multi-SAE config (`MultiConfig`, `train_multi`)
is stage work and lives in `saekit.run.multi`.

* `SharedBatches` / `BatchView` — each batch of a source is read once and served to every trainer
  that trains on that hook with the same batch size. Every SAE sees exactly the batches a separate
  run `train(sae, store.batches(batch_size, seed), ...)` reads, so results equal separate runs.
* `StreamTee` / `ShuffleBuffer` — with no store, the model's batches are split by hook and each
  hook's rows go through a fixed-size buffer sampled with a seeded generator, whose batches are
  shared the same way. Equal to separate runs fed the same stream.
* `train_many` — the trainers are stepped in lockstep (`saekit.train.loop.Trainer`); an SAE that
  reads more warm-up batches than another (input normalisation) simply runs a few batches ahead, and
  `SharedBatches` keeps the batches between the slowest and the fastest consumer. SAEs whose training
  draws from torch's global RNG during steps would see a different random stream than in a separate
  run (the built-in architectures draw none).
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from saekit.errors import ConfigError, SaekitError
from saekit.train.loop import Trainer, TrainingInterrupted

log = logging.getLogger(__name__)


class MemoryBudgetError(SaekitError, MemoryError):
    """A buffer would not fit the configured or the available memory (checked before allocating)."""


# -- sharing one batch source between several trainers ------------------------------------------
class SharedBatches:
    """Reads each batch of `source` once and serves it to any number of views, each at its own position.

    A view's checkpoint state is its position plus the source state at that position, so a resumed
    multi-run repositions the source (sources that can seek back, like the store's, support any
    mix of positions)."""

    def __init__(self, source: Any):
        self.source = source
        self.read = 0  # position of the next batch the source yields
        self.cache: dict[int, Tensor] = {}
        self.states: dict[int, dict] = {0: source.state_dict()}  # source state *before* reading position p
        self.views: list[BatchView] = []

    def view(self) -> "BatchView":
        v = BatchView(self)
        self.views.append(v)
        return v

    def get(self, pos: int) -> Tensor:
        if pos in self.cache:
            return self.cache[pos]
        if pos != self.read:
            if pos not in self.states:
                raise SaekitError(f"SharedBatches: cannot reposition the source to batch {pos} (known positions "
                                  f"{sorted(self.states)})")
            self.source.load_state_dict(self.states[pos])
            self.read = pos
        while self.read <= pos:
            self.cache[self.read] = self.source.next_batch()
            self.read += 1
            self.states[self.read] = self.source.state_dict()
        return self.cache[pos]

    def evict(self) -> None:
        low = min(v.pos for v in self.views)
        for d in (self.cache, self.states):
            for p in [p for p in d if p < low]:
                del d[p]


class BatchView:
    """One trainer's BatchSource over a SharedBatches."""

    def __init__(self, shared: SharedBatches):
        self.shared, self.pos = shared, 0
        src = shared.source
        self.d_in, self.fingerprint = src.d_in, src.fingerprint
        for attr in ("batch_size", "rank", "world_size"):
            if hasattr(src, attr):
                setattr(self, attr, getattr(src, attr))

    def next_batch(self) -> Tensor:
        x = self.shared.get(self.pos)
        self.pos += 1
        self.shared.evict()
        return x

    def state_dict(self) -> dict:
        return {"position": self.pos, "source": self.shared.states[self.pos]}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["position"])
        self.shared.states.setdefault(self.pos, state["source"])


# -- streaming ---------------------------------------------------------------------------------------
def endless(make_iter: Callable[[int], Iterator[Tensor]]) -> Iterator[Tensor]:
    """make_iter(0), make_iter(1), ... chained: the stream of a finite corpus, epoch after epoch."""
    epoch = 0
    while True:
        empty = True
        for block in make_iter(epoch):
            empty = False
            yield block
        if empty:
            raise SaekitError("the activation stream is empty")
        epoch += 1


class StreamTee:
    """Splits one stream of `{hook: rows}` blocks into one row stream per hook (one model pass for all)."""

    def __init__(self, blocks: Iterator[dict[str, Tensor]], hooks: list[str]):
        self.blocks, self.pending = blocks, {h: collections.deque() for h in hooks}

    def stream(self, hook: str) -> Iterator[Tensor]:
        q = self.pending[hook]
        while True:
            if not q:
                for h, rows in next(self.blocks).items():
                    if h in self.pending:
                        self.pending[h].append(rows)
            yield q.popleft()


class ShuffleBuffer:
    """A BatchSource over a stream of row blocks: a `[capacity, d_in]` buffer filled from the stream;
    each global batch is `batch_size` rows drawn without replacement by a seeded generator, whose
    slots are then refilled from the stream. Ranks take rows `rank::world_size` of each global batch.

    Why a buffer: consecutive rows of a stream come from the same documents; sampling from a large
    buffer decorrelates a batch without writing the rows to disk. `open_stream()` must restart the
    same stream from its beginning: resuming replays it (exact, at the cost of recomputing it)."""

    def __init__(self, open_stream: Callable[[], Iterator[Tensor]], d_in: int, capacity: int, batch_size: int,
                 seed: int = 0, fingerprint: str = "stream", max_bytes: float | None = None,
                 rank: int = 0, world_size: int = 1, stream: Iterator[Tensor] | None = None):
        if capacity < batch_size:
            raise ConfigError(f"buffer capacity: expected >= batch_size={batch_size}, found {capacity}")
        check_memory(capacity * d_in * 4, max_bytes, f"shuffle buffer [{capacity}, {d_in}] float32")
        self.open_stream, self.d_in, self.capacity, self.batch_size = open_stream, d_in, capacity, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.fingerprint = f"{fingerprint}:buffer{capacity}:seed{seed}"
        self.buf_CD = torch.empty(capacity, d_in)
        self._reset(stream)

    def _reset(self, stream: Iterator[Tensor] | None = None) -> None:
        self._stream = stream if stream is not None else self.open_stream()
        self._carry = torch.zeros(0, self.d_in)
        self._gen = torch.Generator().manual_seed(self.seed)
        self.batches_read = 0
        self.buf_CD.copy_(self._rows(self.capacity))

    def _rows(self, n: int) -> Tensor:
        parts, have = [self._carry], self._carry.shape[0]
        while have < n:
            block = next(self._stream).float().reshape(-1, self.d_in)
            parts.append(block)
            have += block.shape[0]
        rows = torch.cat(parts)
        self._carry = rows[n:].clone()  # a view would pin all of `rows` (right after filling: 2x the buffer)
        return rows[:n]

    def next_global_batch(self) -> Tensor:
        idx = torch.randperm(self.capacity, generator=self._gen)[: self.batch_size]
        out = self.buf_CD[idx]
        self.buf_CD[idx] = self._rows(self.batch_size)
        self.batches_read += 1
        return out

    def next_batch(self) -> Tensor:
        return self.next_global_batch()[self.rank:: self.world_size]

    def state_dict(self) -> dict:
        return {"batches": self.batches_read, "seed": self.seed, "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        """Replay the stream from its start up to the saved position."""
        if int(state["batches"]) == self.batches_read:
            return
        self._reset()
        for _ in range(int(state["batches"])):
            self.next_global_batch()


def check_memory(n_bytes: float, max_bytes: float | None, what: str) -> None:
    """Log the estimate, then refuse an allocation larger than `max_bytes` or than the memory currently
    available: the user sees what a buffer will take before it is allocated, not only when it is refused."""
    log.info("%s: %.3f GiB (estimate, before allocating)", what, n_bytes / 2**30)
    available = _available_bytes()
    if max_bytes is not None and n_bytes > max_bytes:
        raise MemoryBudgetError(f"{what}: expected at most {max_bytes / 2**30:.2f} GiB (buffer.max_gb), "
                                f"found {n_bytes / 2**30:.2f} GiB; lower buffer.capacity_rows")
    if available is not None and n_bytes > available:
        raise MemoryBudgetError(f"{what}: needs {n_bytes / 2**30:.2f} GiB, only {available / 2**30:.2f} GiB "
                                "available; lower buffer.capacity_rows")


def _available_bytes() -> float | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# -- training --------------------------------------------------------------------------------------
@dataclass
class Job:
    """One SAE of a multi-run, ready to train."""

    name: str
    sae: Any
    batches: Any
    cfg: Any  # TrainConfig
    run_dir: Path
    val_batches: Any = None  # held-out rows for validation during training (see saekit.train.validation)


def train_many(jobs: list[Job], resume: bool | str = False, callbacks: dict[str, list] | None = None) -> dict:
    """Train several SAEs in lockstep, one step each per round; returns name -> TrainResult.

    A stop signal checkpoints every SAE, then raises TrainingInterrupted."""
    callbacks = callbacks or {}
    trainers = {j.name: Trainer(j.sae, j.batches, j.cfg, j.run_dir, callbacks.get(j.name), resume,
                                val_batches=j.val_batches) for j in jobs}
    for t in trainers.values():
        t.keep_grads = False  # the SAEs step in turn: only the stepping one holds gradients
    first = next(iter(trainers.values()))
    with first.environment() as stop:
        try:
            for t in trainers.values():
                t.start()
            while not all(t.done for t in trainers.values()):
                paths = [t.step(lambda: stop.signum, raise_on_stop=False) for t in trainers.values() if not t.done]
                if any(t.stop_requested for t in trainers.values()):
                    raise TrainingInterrupted(stop.signum or 15, paths[-1])
            return {name: t.finish() for name, t in trainers.items()}
        finally:
            for t in trainers.values():
                t.close()


def stream_blocks(source: Any, docs: list[dict]) -> Iterator[dict[str, Tensor]]:
    """`{hook: rows}` blocks of the source over the corpus, endlessly (epoch e reshuffles nothing:
    the corpus order is the config's)."""
    return endless(lambda epoch: (b.acts for b in source.iter_batches(docs)))
