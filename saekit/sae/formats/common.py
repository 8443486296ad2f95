"""What every reader shares: the metadata record, building a saekit SAE from a config and tensors, and
refusing keys that would change the computation.

Why a metadata record: files from other tools carry keys the SAE does not need to compute (the model's
`from_pretrained` kwargs, how activations were reshaped, training details). Dropping them silently loses
information a user needs to apply the SAE correctly; rejecting them makes every such file unloadable. So
they are kept, verbatim, on `sae.metadata`. Keys that change the computation are either honoured
exactly (mapped or folded into the weights) or refused with a ConfigError naming the key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saekit.errors import ConfigError, CorruptArtifactError
from saekit.sae.base import SparseAutoencoder
from saekit.sae.registry import check_state, get_class

log = logging.getLogger(__name__)


@dataclass
class SAEMetadata:
    """Where a foreign SAE came from and every key saekit did not need to compute with it."""

    format: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "source": self.source, "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "metadata") -> "SAEMetadata":
        """The record as `to_dict` wrote it (a saekit folder's metadata.json); other keys are an error."""
        if not isinstance(data, dict) or set(data) != {"format", "source", "extra"}:
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise CorruptArtifactError(f"{where}: expected an SAE metadata record with keys ['extra', 'format', "
                                       f"'source'], found {found}")
        return cls(str(data["format"]), str(data["source"]), dict(data["extra"] or {}))


def refuse(fmt: str, key: str, found: Any, expected: str, source: str | Path) -> ConfigError:
    """The error for a key that changes the computation in a way saekit cannot reproduce."""
    return ConfigError(f"{source}: {fmt} key '{key}' = {found!r} changes the computation and saekit cannot honour "
                       f"it (expected {expected}); refusing to load rather than compute something else")


def unknown_keys(fmt: str, keys: dict[str, Any], source: str | Path, strict: bool) -> dict[str, Any]:
    """Keys no reader rule knows: refused (strict) because saekit cannot tell whether they change the
    computation; kept as metadata with a warning when strict=False."""
    if keys and strict:
        name = sorted(keys)[0]
        raise ConfigError(f"{source}: unknown {fmt} key '{name}' = {keys[name]!r} (unknown keys: {sorted(keys)}); "
                          f"saekit cannot tell whether it changes the computation. If it does not, load with "
                          f"strict=False to keep it as metadata")
    for name in sorted(keys):
        log.warning("%s: unknown %s key '%s' kept as metadata (strict=False)", source, fmt, name)
    return dict(keys)


def build(architecture: str, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], meta: SAEMetadata,
          device: str | torch.device = "cpu") -> SparseAutoencoder:
    """A saekit SAE with exactly these tensors: shapes and dtypes are checked, nothing is cast."""
    cls = get_class(architecture)
    config = cls.config_class.from_dict(cfg | {"device": "cpu"}, where=f"{meta.format}->{architecture}")
    sae = cls(config)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    check_state(sae, tensors, source=meta.source)
    sae.load_state_dict(tensors, strict=True)
    sae.metadata = meta
    return sae.to(device).eval()


def dtype_name(t: torch.Tensor) -> str:
    names = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if t.dtype not in names:
        raise ConfigError(f"expected floating-point weights ({sorted(names.values())}), found {t.dtype}")
    return names[t.dtype]
