"""saekit: sparse autoencoders for language-model activations and text embeddings.

    import saekit
    store = saekit.ActivationStore("runs/quickstart-smollm2/store")       # cached activations
    sae = saekit.load_sae("runs/quickstart-smollm2/train")                # cfg.json + safetensors
    code = sae.encode(store[:8])                                          # SparseCode(indices, values)
    report = saekit.evaluate(sae, [store[:4096]])                         # FVU, L0, dead %, ...
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_LAZY = {
    "load_sae": ("saekit.sae.registry", "load_sae"),
    "save_sae": ("saekit.sae.registry", "save_sae"),
    "create_sae": ("saekit.sae.registry", "create"),
    "architectures": ("saekit.sae.registry", "architectures"),
    "train": ("saekit.train", "train"),
    "TrainConfig": ("saekit.train", "TrainConfig"),
    "cache": ("saekit.store.writer", "cache_activations"),
    "ActivationStore": ("saekit.store.reader", "ActivationStore"),
    "evaluate": ("saekit.eval.report", "evaluate_sae"),
    "preflight": ("saekit.eval.preflight", "preflight"),
    "load_run_config": ("saekit.run.config", "load_run_config"),
    "run_all": ("saekit.run.stages", "run_all"),
    "RunFolder": ("saekit.layout", "RunFolder"),
    "steering_sweep": ("saekit.analysis.steering_sweep", "steering_sweep"),
    "contrastive_search": ("saekit.analysis.contrastive", "contrastive_search"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def _target(name: str):
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)


class _CallableModule(types.ModuleType):
    """A sub-package that shares its name with a public function (`saekit.train`, `saekit.run`).

    Why: importing `saekit.train.loop` (or anything that does) binds the sub-package as the
    attribute `saekit.train`, hiding the function of that name, so `saekit.train(...)` would fail
    or work depending on what was imported first. Making the sub-package callable, forwarding
    to the public function, keeps both `saekit.train(sae, ...)` and `import saekit.train.loop`
    working in any order."""

    def __call__(self, *args, **kwargs):
        return _target(self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    """The `saekit` module itself: makes a sub-package bound under a public name callable."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}" \
                and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    """Import lazily so `import saekit` stays fast and light (the CLI and the app import parts)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'saekit' has no attribute '{name}'")
    value = _target(name)
    # importing the target may have bound a (now callable) sub-package of the same name: keep
    # that one, so `saekit.train` is one object whatever was accessed first
    return globals().get(name, value)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
