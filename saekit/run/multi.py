"""Multi-SAE runs: several hooks, several SAE configs per hook, one model pass.

    saekit train configs/multi_sae.yaml          (a MultiConfig: the config has a `saes:` list)

Why here, in the run layer: a multi-SAE run caches (or streams) activations, builds SAEs from the
store's facts and writes `train/<name>/` per SAE; that is stage work, like `saekit.run.stages`. The
batch-sharing machinery it feeds the trainers with (`SharedBatches`, `ShuffleBuffer`, `StreamTee`,
`train_many`) knows nothing of runs and stays in `saekit.train.multi`.

Two ways to feed the SAEs:
* `mode: store` — the activation store is filled once (one model pass caches every hook), then
  each batch is read from it once and handed to every SAE that trains on that hook with the same
  batch size. Every SAE sees exactly the batches a separate run reads, so the results are identical
  to separate runs, at the cost of one read.
* `mode: stream` — nothing touches disk: the model's batches are split by hook, and each hook's rows
  go through a shuffle buffer whose batches are shared the same way. Equal to separate runs fed the
  same stream.

Each SAE's outputs (train, eval, probe, bundle) live where `RunFolder.for_sae(name)` says.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from saekit.data.corpus import fingerprint, load_documents
from saekit.errors import ConfigError
from saekit.run.config import BufferConfig, MultiConfig, SAESpec
from saekit.run.stages import create_sae_for, save_resolved
from saekit.sources.factory import make_source
from saekit.store.locate import cached_hooks
from saekit.store.reader import ActivationStore
from saekit.store.writer import cache_activations
from saekit.train.config import TrainConfig
from saekit.train.distributed import StepSync, current_sync
from saekit.train.multi import Job, SharedBatches, ShuffleBuffer, StreamTee, check_memory, stream_blocks, train_many

__all__ = ["BufferConfig", "MultiConfig", "SAESpec", "build_jobs", "train_multi"]


def build_jobs(cfg: MultiConfig, batch_source: Callable[[str, int], Any], d_in: dict[str, int],
               source_spec: dict | None = None) -> list[Job]:
    """Jobs for every SAE of `cfg`; `batch_source(hook, batch_size)` is called once per (hook,
    batch size) and its batches are shared by all SAEs of that group."""
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
        sae = create_sae_for(spec.sae, d_in[hook], hook, source_spec or {}, cfg.seed, cfg.corpus.name)
        jobs.append(Job(spec.name, sae, shared[key].view(), tcfg, cfg.folder.train(spec.name)))
    return jobs


def train_multi(cfg: MultiConfig, resume: bool | str = "auto", source: Any = None, docs: list[dict] | None = None,
                callbacks: dict[str, list] | None = None) -> dict:
    """Train every SAE of `cfg` from one model pass (store or stream mode); name -> TrainResult.

    `source`/`docs` override the config's (tests feed synthetic sources)."""
    sync = current_sync()
    if sync.is_main:
        save_resolved(cfg)
    if cfg.mode == "store":
        stores = _stores(cfg, source, docs)
        d_in = {h: s.d_in for h, s in stores.items()}
        spec = next(iter(stores.values())).manifest["source"]
        jobs = build_jobs(cfg, lambda h, bs: stores[h].batches(bs, seed=cfg.seed, rank=sync.rank,
                                                                world_size=sync.world_size), d_in, spec)
    else:
        jobs = _stream_jobs(cfg, source, docs, sync)
    return train_many(jobs, resume, callbacks)


def _stores(cfg: MultiConfig, source: Any, docs: list[dict] | None) -> dict[str, ActivationStore]:
    """hook -> store, caching first unless every hook's store is complete."""
    root = cfg.store_dir
    hooks = cached_hooks(root)
    if not hooks or not all(ActivationStore(root, hook=h).complete for h in hooks):
        src = source if source is not None else make_source(cfg.source)
        cache_activations(src, docs if docs is not None else load_documents(cfg.corpus), root, cfg.store)
    return {h: ActivationStore(root, hook=h) for h in cached_hooks(root)}


def _stream_jobs(cfg: MultiConfig, source: Any, docs: list[dict] | None, sync: StepSync) -> list[Job]:
    source = source if source is not None else make_source(cfg.source)
    docs = docs if docs is not None else load_documents(cfg.corpus)
    hooks = list(source.hooks)
    sizes = {TrainConfig.from_dict({**cfg.train, **s.train}).batch_size for s in cfg.saes}
    if len(sizes) > 1:
        raise ConfigError(f"stream mode: every SAE must use one batch size (hooks are read at one rate), "
                          f"found {sorted(sizes)}")
    per_hook = cfg.buffer.capacity_rows * 4 * sum(source.d_in[h] for h in hooks)
    check_memory(per_hook, cfg.buffer.max_gb * 2**30, f"{len(hooks)} shuffle buffers of {cfg.buffer.capacity_rows} rows")
    stream_id = hashlib.sha256(f"{fingerprint(docs)}:{source.spec()}".encode()).hexdigest()[:16]
    tee = StreamTee(stream_blocks(source, docs), hooks)

    def shuffle_buffer(hook: str, batch_size: int) -> ShuffleBuffer:
        return ShuffleBuffer(lambda: (b[hook] for b in stream_blocks(source, docs)), source.d_in[hook],
                             cfg.buffer.capacity_rows, batch_size, seed=cfg.seed, fingerprint=f"{stream_id}:{hook}",
                             max_bytes=cfg.buffer.max_gb * 2**30, rank=sync.rank, world_size=sync.world_size,
                             stream=tee.stream(hook))

    return build_jobs(cfg, shuffle_buffer, {h: source.d_in[h] for h in hooks}, source.spec())
