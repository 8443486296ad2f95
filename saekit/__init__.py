"""saekit: sparse autoencoders for language-model activations and text embeddings.

    import saekit
    store = saekit.ActivationStore("runs/quickstart-smollm2/store")       # cached activations
    sae = saekit.load_sae("runs/quickstart-smollm2/train")                # cfg.json + safetensors
    code = sae.encode(store[:8])                                          # SparseCode(indices, values)
    report = saekit.evaluate(sae, [store[:4096]])                         # FVU, L0, dead %, ...
"""

from __future__ import annotations

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
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    """Import lazily so `import saekit` stays fast and light (the CLI and the app import parts)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'saekit' has no attribute '{name}'")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
