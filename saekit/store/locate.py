"""Which store of a cache root an SAE reads: the one of its hook when the root caches several.

Why: a run caches one store per hook under one root (`CACHE_INDEX` lists them); a multi-SAE run
trains one SAE per hook, so every reader of a run (analysis, probing, steering, the browser) must
open the store of the SAE's own hook, and a single-hook root needs no hook at all.
"""

from __future__ import annotations

from pathlib import Path

from saekit.artifacts import read_json
from saekit.sources.hooks import hook_site
from saekit.store.reader import ActivationStore
from saekit.store.writer import CACHE_INDEX


def cached_hooks(root: str | Path) -> list[str]:
    """The hooks a cache root holds stores for ([] for a bare store folder or a missing root)."""
    index = Path(root) / CACHE_INDEX
    return list(read_json(index)["stores"]) if index.exists() else []


def store_for_hook(root: str | Path, hook: str | None) -> ActivationStore:
    """The store of `hook` when the root caches several hooks, else the root's only store. A hook named in
    another convention (an SAE from another tool: `blocks.1.hook_resid_post` for a cached `model.layers.1`)
    finds the store of the same (layer, site)."""
    hooks = cached_hooks(root)
    if len(hooks) > 1 and hook and hook not in hooks:
        hook = same_activation(hook, hooks) or hook
    return ActivationStore(root, hook=hook if len(hooks) > 1 and hook else None)


def same_activation(hook: str, hooks: list[str]) -> str | None:
    """The one of `hooks` naming the same (layer, site) as `hook`, or None."""
    site = hook_site(hook)
    matches = [h for h in hooks if site is not None and hook_site(h) == site]
    return matches[0] if len(matches) == 1 else None
