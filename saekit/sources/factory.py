"""`make_source`: the one place that maps a `SourceConfig.kind` to its source class.

Kept out of `sources/base.py` so the base (the protocol and config every source imports) does not
import the sources built on it: the arrows stay one-way, base <- hf / lens / embeddings <- factory.
"""

from __future__ import annotations

from saekit.sources.base import ActivationSource, SourceConfig
from saekit.sources.embeddings import EmbeddingSource
from saekit.sources.hf import HFSource
from saekit.sources.lens import LensSource


def make_source(cfg: SourceConfig) -> ActivationSource:
    """The activation source a run's `source:` section asks for (HF module hooks, TransformerLens hook
    names, or sentence-transformers pooled vectors)."""
    if cfg.kind == "embedding":
        return EmbeddingSource(cfg)
    if cfg.kind == "lens":
        return LensSource(cfg)
    return HFSource(cfg)
