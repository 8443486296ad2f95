"""The part of a run config that says which activations: documents, model and hooks, store, folder.

Why: the single-SAE run (`saekit.pipeline.RunConfig`) and the multi-SAE run
(`saekit.train.multi.MultiConfig`) cache and read activations the same way; they share these fields
and the paths derived from them instead of declaring them twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saekit.config import Config, param
from saekit.data.corpus import CorpusConfig
from saekit.sources.base import SourceConfig
from saekit.store.writer import StoreConfig


@dataclass
class ActivationRunConfig(Config):
    """Documents, model, store and run folder of a run."""

    name: str = param("run", "run name (used for the default output folder)")
    output_dir: str = param("", "run folder; empty = runs/<name>")
    seed: int = param(0, "seed for data order and initialisation")
    corpus: CorpusConfig = param(default_factory=CorpusConfig, doc="the documents")
    source: SourceConfig = param(default_factory=SourceConfig, doc="the model and its hook points")
    store: StoreConfig = param(default_factory=StoreConfig, doc="the activation cache")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    @property
    def store_dir(self) -> Path:
        return Path(self.store.path) if self.store.path else self.run_dir / "store"
