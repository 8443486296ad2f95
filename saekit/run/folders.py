"""A run folder's parts as the stages need them: the resolved config written back, the run's SAE and
store opened together behind the preflight, and the store refused when it is empty or half-cached.

Shared by the stages (`stages.py`) and the evaluation stage (`evaluate.py`); `saekit.layout.RunFolder`
says where each part lives, this module opens and checks them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from saekit.artifacts import atomic_write_bytes
from saekit.errors import EmptyDataError, IncompleteStoreError
from saekit.eval.preflight import Preflight, preflight
from saekit.layout import RunFolder
from saekit.run.config import ActivationRunConfig, RunConfig, load_run_config
from saekit.sae.base import SparseAutoencoder
from saekit.sae.registry import load_sae
from saekit.store.locate import store_for_hook
from saekit.store.reader import ActivationStore


def save_resolved(cfg: ActivationRunConfig) -> None:
    """Write the resolved config into the run folder (analysis, probing and the browser read it back)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    data = cfg.resolved_dict(redact=True) if isinstance(cfg, RunConfig) else cfg.to_dict(redact=True)
    text = yaml.safe_dump(data, sort_keys=False)
    atomic_write_bytes(cfg.folder.config, text.encode())


def as_folder(run: str | Path | RunFolder) -> RunFolder:
    return run if isinstance(run, RunFolder) else RunFolder(Path(run))


def open_sae_and_store(folder: RunFolder, device: str = "cpu", force: bool = False
                       ) -> tuple[SparseAutoencoder, ActivationStore]:
    """The SAE of a (single or SAE-scoped) run folder and the store of its hook, checked by the preflight."""
    sae, store, _ = checked_sae_and_store(folder, device=device, force=force)
    return sae, store


def checked_sae_and_store(folder: RunFolder, sae: SparseAutoencoder | None = None, device: str = "cpu",
                          force: bool = False) -> tuple[SparseAutoencoder, ActivationStore, Preflight]:
    """The run's SAE (or `sae`), the store of its hook, and the preflight record of the two (d_in, model,
    hook, first FVU: a named error when they disagree). `force` (or the run config's `sae.force`) accepts
    a model-name alias."""
    folder = folder.require_run().require_one_sae()
    sae = sae if sae is not None else load_sae(folder.train(), device=device)
    store = require_rows(store_for_hook(folder.store, sae.cfg.hook_name or None))
    return sae, store, preflight(sae, store, force=force or configured_force(folder))


def configured_force(folder: RunFolder) -> bool:
    """`sae.force` of the run's resolved config (a run of an imported SAE whose model name is an alias)."""
    if not folder.config.exists():
        return False
    cfg = load_run_config(folder.config, strict=False)  # only `sae.force` is read here
    return isinstance(cfg, RunConfig) and cfg.imports_sae and bool(cfg.sae.get("force", False))


def store_summary(store: ActivationStore) -> dict:
    m = store.manifest
    return {"store": str(store.path), "hook": store.hook, "kind": store.kind, "model": m["source"]["model"],
            "forward_dtype": m["source"].get("forward_dtype", "float32"), "rows": len(store), "d_in": store.d_in,
            "docs": m["n_docs"], "shards": len(m["shards"]),
            "complete": store.complete}


def run_store(cfg: RunConfig, hook: str | None = None) -> ActivationStore:
    hook = hook or (cfg.source.hooks[0] if cfg.source.kind != "embedding" else None)
    return require_rows(ActivationStore(cfg.store_dir, hook=hook))


def require_rows(store: ActivationStore) -> ActivationStore:
    """Refuse a store with 0 rows (an empty corpus, or documents that were all special tokens): every
    stage would otherwise 'succeed' on nothing (an SAE initialised from no data, NaN statistics)."""
    if len(store) == 0:
        raise EmptyDataError(f"{store.path}: the activation store has 0 rows ({store.manifest.n_docs} documents "
                             f"cached); expected at least one row: check the corpus section of the run config")
    return store


def require_complete(store: ActivationStore) -> ActivationStore:
    """Refuse a store whose caching job was interrupted, naming what exists and how to resume."""
    m = store.manifest
    if not store.complete:
        have = [e["index"] for e in m.shards]
        raise IncompleteStoreError(
            f"{store.path}: the activation store is incomplete: {len(have)} of {m.n_shards} shards cached "
            f"(shards {have}); expected a complete store before training. Run `saekit cache CONFIG` with the same "
            f"config to resume caching where it stopped")
    return store
