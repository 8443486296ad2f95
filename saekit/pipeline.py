"""The main job as plain calls: cache → train → evaluate → analyze, each resumable on its own.

A run folder holds everything one config produced:

    <output_dir>/config.yaml   the resolved config
    <output_dir>/store/        the activation cache (one store per hook)
    <output_dir>/train/        checkpoints, metrics.jsonl, final_sae/ (one per hook and SAE)
    <output_dir>/eval/         report.json, figures
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from saekit.artifacts import atomic_write_bytes
from saekit.config import Config, param
from saekit.data.corpus import CorpusConfig, load_documents
from saekit.sources.base import SourceConfig, make_source
from saekit.store.reader import ActivationStore
from saekit.store.writer import StoreConfig, cache_activations

log = logging.getLogger(__name__)


@dataclass
class RunConfig(Config):
    """One run: which text, which model and hooks, where to store, what SAE to train and how."""

    name: str = param("run", "run name (used for the default output folder)")
    output_dir: str = param("", "run folder; empty = runs/<name>")
    seed: int = param(0, "seed for shuffling and initialisation")
    corpus: CorpusConfig = param(default_factory=CorpusConfig, doc="the documents")
    source: SourceConfig = param(default_factory=SourceConfig, doc="the model and its hook points")
    store: StoreConfig = param(default_factory=StoreConfig, doc="the activation cache")
    sae: dict[str, Any] = param({}, "the SAE: `architecture` plus that architecture's config fields")
    train: dict[str, Any] = param({}, "trainer settings (see saekit.train.TrainConfig)")
    eval: dict[str, Any] = param({}, "evaluation settings (holdout fraction, splice-in documents, ...)")
    analyze: dict[str, Any] = param({}, "feature-browser bundle settings")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    @property
    def store_dir(self) -> Path:
        return Path(self.store.path) if self.store.path else self.run_dir / "store"


def load_run_config(path: str | Path, strict: bool = True) -> RunConfig:
    return RunConfig.from_yaml(path, strict=strict)


def save_resolved(cfg: RunConfig) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cfg.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(redact=True), sort_keys=False).encode())


def cache_stage(cfg: RunConfig, rank: int = 0, world_size: int = 1) -> dict[str, ActivationStore]:
    """Fill the run's activation stores (resuming a partial cache); returns hook -> store."""
    save_resolved(cfg) if rank == 0 else None
    docs = load_documents(cfg.corpus)
    source = make_source(cfg.source)
    kwargs = {}
    if world_size > 1:
        n_shards = max(1, -(-len(docs) // cfg.store.docs_per_shard))
        kwargs = {"shard_range": range(rank, n_shards, world_size), "manifest_name": f"manifest.rank-{rank}.json"}
    paths = cache_activations(source, docs, cfg.store_dir, cfg.store, **kwargs)
    if world_size > 1:
        return {}
    return {h: ActivationStore(p) for h, p in paths.items()}


def store_summary(store: ActivationStore) -> dict:
    m = store.manifest
    return {"store": str(store.path), "hook": store.hook, "kind": store.kind, "model": m["source"]["model"],
            "rows": len(store), "d_in": store.d_in, "docs": m["n_docs"], "shards": len(m["shards"]),
            "complete": store.complete}
