"""Which store of a cache root an SAE reads: the one of its hook when the root caches several.

Why: a run caches one store per hook under one root (`CACHE_INDEX` lists them); a multi-SAE run
trains one SAE per hook, so every reader of a run (analysis, probing, steering, the browser) must
open the store of the SAE's own hook, and a single-hook root needs no hook at all.
"""

from __future__ import annotations

from pathlib import Path

from saekit.artifacts import read_json
from saekit.store.reader import ActivationStore
from saekit.store.writer import CACHE_INDEX


def cached_hooks(root: str | Path) -> list[str]:
    """The hooks a cache root holds stores for ([] for a bare store folder or a missing root)."""
    index = Path(root) / CACHE_INDEX
    return list(read_json(index)["stores"]) if index.exists() else []


def store_for_hook(root: str | Path, hook: str | None) -> ActivationStore:
    """The store of `hook` when the root caches several hooks, else the root's only store."""
    hooks = cached_hooks(root)
    return ActivationStore(root, hook=hook if len(hooks) > 1 and hook else None)
