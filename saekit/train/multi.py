"""Many SAEs from one forward pass: several hooks, several SAE configs per hook, one model pass.

    saekit train configs/multi_sae.yaml          (a MultiConfig: the config has a `saes:` list)

Two ways to feed them:
* `mode: store` — the activation store is filled once (one model pass caches every hook), then
  each batch is read from it once and handed to every SAE that trains on that hook with the same
  batch size (`SharedBatches`). Every SAE sees exactly the batches a separate run
  `train(sae, store.batches(batch_size, seed), ...)` reads, so the results are identical to
  separate runs, at the cost of one read.
* `mode: stream` — nothing touches disk: the model's batches are split by hook (`StreamTee`), and
  each hook's rows go through a `ShuffleBuffer` (a fixed-size buffer filled from the stream and
  sampled with a seeded generator) whose batches are shared the same way. Equal to separate runs fed
  the same stream.

The trainers are stepped in lockstep (`saekit.train.loop.Trainer`); an SAE that reads more warm-up
batches than another (input normalisation) simply runs a few batches ahead, and `SharedBatches`
keeps the batches between the slowest and the fastest consumer. SAEs whose training draws from
torch's global RNG during steps would see a different random stream than in a separate run (the
built-in architectures draw none).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from saekit.config import Config, param
from saekit.errors import ConfigError, SaekitError
from saekit.store.run import ActivationRunConfig

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
        self._carry = rows[n:]
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
    """Refuse an allocation larger than `max_bytes` or than the memory currently available."""
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


# -- configuration -------------------------------------------------------------------------------------
@dataclass
class SAESpec(Config):
    """One SAE of a multi-run."""

    name: str = param(doc="folder name under <run>/train/")
    sae: dict[str, Any] = param(doc="`architecture` plus its config fields (d_in is taken from the hook)")
    hook: str = param("", "hook the SAE reads; empty = the source's only hook")
    train: dict[str, Any] = param({}, "overrides of the shared train settings for this SAE")


@dataclass
class BufferConfig(Config):
    """The streaming shuffle buffer (one per hook)."""

    capacity_rows: int = param(65536, "rows held per hook", ge=1)
    max_gb: float = param(8.0, "refuse buffers larger than this in total (GiB), checked before allocating", gt=0)


@dataclass
class MultiConfig(ActivationRunConfig):
    """Several SAEs trained from one model pass (a run config with a `saes:` list)."""

    name: str = param("multi", "run name (default output folder runs/<name>)")
    mode: str = param("store", "store: cache once, read each batch once; stream: no disk, shuffle buffers",
                      choices=["store", "stream"])
    buffer: BufferConfig = param(default_factory=BufferConfig, doc="shuffle buffers (mode: stream)")
    train: dict[str, Any] = param({}, "trainer settings shared by every SAE (saekit.train.TrainConfig)")
    saes: list[SAESpec] = param([], "the SAEs")

    def validate(self) -> None:
        if not self.saes:
            raise ConfigError("multi config: expected at least one entry in `saes`, found none")
        names = [s.name for s in self.saes]
        if len(set(names)) != len(names):
            raise ConfigError(f"multi config: SAE names must be unique, found {names}")


# -- training --------------------------------------------------------------------------------------
@dataclass
class Job:
    """One SAE of a multi-run, ready to train."""

    name: str
    sae: Any
    batches: Any
    cfg: Any  # TrainConfig
    run_dir: Path


def train_many(jobs: list[Job], resume: bool | str = False, callbacks: dict[str, list] | None = None) -> dict:
    """Train several SAEs in lockstep, one step each per round; returns name -> TrainResult.

    A stop signal checkpoints every SAE, then raises TrainingInterrupted."""
    from saekit.train.loop import Trainer, TrainingInterrupted

    callbacks = callbacks or {}
    trainers = {j.name: Trainer(j.sae, j.batches, j.cfg, j.run_dir, callbacks.get(j.name), resume) for j in jobs}
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


def build_jobs(cfg: MultiConfig, batch_source: Callable[[str, int], Any], d_in: dict[str, int],
               model_name: str = "") -> list[Job]:
    """Jobs for every SAE of `cfg`; `batch_source(hook, batch_size)` is called once per (hook,
    batch size) and its batches are shared by all SAEs of that group."""
    from saekit.sae.registry import create
    from saekit.train.config import TrainConfig

    shared: dict[tuple[str, int], SharedBatches] = {}
    jobs = []
    hooks = list(d_in)
    for spec in cfg.saes:
        hook = spec.hook or (hooks[0] if len(hooks) == 1 else "")
        if hook not in d_in:
            raise ConfigError(f"saes[{spec.name}].hook: expected one of {hooks}, found {spec.hook!r}")
        tcfg = TrainConfig.from_dict({**cfg.train, **spec.train}, where=f"saes[{spec.name}].train")
        key = (hook, tcfg.batch_size)
        if key not in shared:
            shared[key] = SharedBatches(batch_source(hook, tcfg.batch_size))
        sae = create({"d_in": d_in[hook], "hook_name": hook, "model_name": model_name, "seed": cfg.seed, **spec.sae})
        jobs.append(Job(spec.name, sae, shared[key].view(), tcfg, cfg.run_dir / "train" / spec.name))
    return jobs


def train_multi(cfg: MultiConfig, resume: bool | str = "auto", source: Any = None, docs: list[dict] | None = None,
                callbacks: dict[str, list] | None = None) -> dict:
    """Train every SAE of `cfg` from one model pass (store or stream mode); name -> TrainResult.

    `source`/`docs` override the config's (tests feed synthetic sources)."""
    from saekit.train.distributed import current_sync

    sync = current_sync()
    if cfg.mode == "store":
        stores = _stores(cfg, source, docs)
        d_in = {h: s.d_in for h, s in stores.items()}
        model = str(next(iter(stores.values())).manifest["source"].get("model", ""))
        jobs = build_jobs(cfg, lambda h, bs: stores[h].batches(bs, seed=cfg.seed, rank=sync.rank,
                                                                world_size=sync.world_size), d_in, model)
    else:
        jobs = _stream_jobs(cfg, source, docs, sync)
    return train_many(jobs, resume, callbacks)


def _stores(cfg: MultiConfig, source: Any, docs: list[dict] | None) -> dict:
    from saekit.data.corpus import load_documents
    from saekit.store.reader import ActivationStore
    from saekit.store.writer import CACHE_INDEX, cache_activations

    root = cfg.store_dir
    index = root / CACHE_INDEX
    if not index.exists() or not all(ActivationStore(root, hook=h).complete for h in _index_hooks(index)):
        src = source
        if src is None:
            from saekit.sources.base import make_source

            src = make_source(cfg.source)
        cache_activations(src, docs if docs is not None else load_documents(cfg.corpus), root, cfg.store)
    return {h: ActivationStore(root, hook=h) for h in _index_hooks(index)}


def _index_hooks(index: Path) -> list[str]:
    from saekit.artifacts import read_json

    return list(read_json(index)["stores"])


def _stream_jobs(cfg: MultiConfig, source: Any, docs: list[dict] | None, sync) -> list[Job]:
    from saekit.data.corpus import fingerprint, load_documents

    if source is None:
        from saekit.sources.base import make_source

        source = make_source(cfg.source)
    docs = docs if docs is not None else load_documents(cfg.corpus)
    hooks = list(source.hooks)
    from saekit.train.config import TrainConfig

    sizes = {TrainConfig.from_dict({**cfg.train, **s.train}).batch_size for s in cfg.saes}
    if len(sizes) > 1:
        raise ConfigError(f"stream mode: every SAE must use one batch size (hooks are read at one rate), "
                          f"found {sorted(sizes)}")
    per_hook = cfg.buffer.capacity_rows * 4 * sum(source.d_in[h] for h in hooks)
    check_memory(per_hook, cfg.buffer.max_gb * 2**30, f"{len(hooks)} shuffle buffers of {cfg.buffer.capacity_rows} rows")
    fp = hashlib.sha256(f"{fingerprint(docs)}:{source.spec()}".encode()).hexdigest()[:16]
    tee = StreamTee(stream_blocks(source, docs), hooks)

    def make(hook: str, bs: int) -> ShuffleBuffer:
        return ShuffleBuffer(lambda: (b[hook] for b in stream_blocks(source, docs)), source.d_in[hook],
                             cfg.buffer.capacity_rows, bs, seed=cfg.seed, fingerprint=f"{fp}:{hook}",
                             max_bytes=cfg.buffer.max_gb * 2**30, rank=sync.rank, world_size=sync.world_size,
                             stream=tee.stream(hook))

    return build_jobs(cfg, make, {h: source.d_in[h] for h in hooks}, str(source.spec().get("model", "")))


def stream_blocks(source: Any, docs: list[dict]) -> Iterator[dict[str, Tensor]]:
    """`{hook: rows}` blocks of the source over the corpus, endlessly (epoch e reshuffles nothing:
    the corpus order is the config's)."""
    return endless(lambda epoch: (b.acts for b in source.iter_batches(docs)))
