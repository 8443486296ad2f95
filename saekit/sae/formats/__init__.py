"""Other tools' SAE files in and out: SAELens, sparsify, dictionary_learning, Gemma Scope.

    detect(path)                 -> "saekit" | "saelens" | "sparsify" | "sparsify_root" | "dictionary_learning"
                                    | "gemmascope", decided by the files found
    load_foreign(path)           -> a saekit SAE computing exactly what the other tool computes
    load_many(sparsify_root)     -> {hookpoint: SAE}, sparsify's `load_many`
    save_sae(sae, path, format="saekit" | "saelens" | "sparsify")

Readers keep every key the SAE does not need on `sae.metadata` (a `SAEMetadata`), honour the keys that
change the computation when saekit can reproduce them exactly, and refuse the rest with a ConfigError
naming the key (see each module's docstring for its format's keys).

How a saekit folder is told from a SAELens folder (both are cfg.json + sae_weights.safetensors): saekit
writes a sha256 manifest next to them; without one, a cfg.json whose keys are all fields of the saekit
architecture it names is saekit's, anything else is read as SAELens's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from saekit.artifacts import MANIFEST, read_json
from saekit.errors import ConfigError, CorruptArtifactError
from saekit.sae.base import NORMALIZE_KEY, SparseAutoencoder
from saekit.sae.formats import dictionary_learning, gemmascope, saelens, sparsify
from saekit.sae.formats.common import SAEMetadata
from saekit.sae.registry import architectures, get_class
from saekit.sae.registry import save_sae as save_saekit

__all__ = ["FORMATS", "SAEMetadata", "detect", "foreign_format", "load_foreign", "load_many", "save_sae"]
FORMATS = ("saekit", "saelens", "sparsify")  # writable formats
READERS = {"saelens": saelens.read, "sparsify": sparsify.read, "dictionary_learning": dictionary_learning.read,
           "gemmascope": gemmascope.read}


def detect(path: str | Path) -> str:
    """The format of an SAE file or folder, from the files it holds."""
    path = Path(path)
    if gemmascope.is_gemmascope(path):
        return "gemmascope"
    if dictionary_learning.is_dictionary_learning(path):
        return "dictionary_learning"
    if sparsify.is_sparsify(path):
        return "sparsify"
    if saelens.is_saelens(path):
        return "saekit" if _is_saekit(path) else "saelens"
    if sparsify.hookpoints(path):
        return "sparsify_root"
    raise CorruptArtifactError(
        f"{path}: expected an SAE folder: saekit or SAELens (cfg.json + sae_weights.safetensors), sparsify "
        f"(cfg.json + sae.safetensors, or one such folder per hookpoint), dictionary_learning (ae.pt + "
        f"config.json) or Gemma Scope (params.npz); found "
        f"{sorted(p.name for p in path.iterdir()) if path.is_dir() else 'no such folder'}")


def foreign_format(path: str | Path) -> str | None:
    """The format of another tool's SAE at `path`; None for a saekit folder or nothing recognised (the saekit
    loader then reports what is missing)."""
    try:
        fmt = detect(path)
    except CorruptArtifactError:
        return None
    return None if fmt == "saekit" else fmt


def _is_saekit(path: Path) -> bool:
    if (path / MANIFEST).is_file():
        return True
    cfg = read_json(path / saelens.CFG_FILE)
    name = cfg.get("architecture")
    if name not in architectures():
        return False
    fields = {f.name for f in dataclasses.fields(get_class(name).config_class)}
    return set(cfg) - {"architecture", NORMALIZE_KEY} <= fields


def load_foreign(path: str | Path, device: str | torch.device = "cpu", strict: bool = True) -> SparseAutoencoder:
    """Load another tool's SAE; `strict=False` keeps keys no rule knows as metadata instead of refusing."""
    path = Path(path)
    fmt = detect(path)
    if fmt == "sparsify_root":
        points = sparsify.hookpoints(path)
        if len(points) != 1:
            raise ConfigError(f"{path}: a sparsify folder with {len(points)} hookpoints {points}; expected one "
                              f"SAE: pass {path}/<hookpoint> or use saekit.sae.formats.load_many")
        return sparsify.read(path / points[0], device, strict)
    if fmt == "saekit":
        raise ConfigError(f"{path}: a saekit folder; load it with saekit.load_sae")
    return READERS[fmt](path, device, strict)


def load_many(path: str | Path, device: str | torch.device = "cpu", strict: bool = True
              ) -> dict[str, SparseAutoencoder]:
    """Every hookpoint's SAE under a sparsify root, by hookpoint name (sparsify's `load_many`)."""
    path = Path(path)
    points = sparsify.hookpoints(path)
    if not points:
        raise CorruptArtifactError(f"{path}: expected sub-folders with cfg.json + sae.safetensors (one per "
                                   f"hookpoint), found none")
    return {p: sparsify.read(path / p, device, strict) for p in points}


def save_sae(sae: SparseAutoencoder, path: str | Path, format: str = "saekit", fold: bool = True) -> Path:  # noqa: A002
    """Write `sae` as a saekit, SAELens or sparsify folder; input normalisation is folded into the weights
    (foreign formats always fold: they have no place for a training-time input scale)."""
    path = Path(path)
    if format == "saekit":
        return save_saekit(sae, path, fold=fold)
    if format == "saelens":
        return saelens.write(sae, path)
    if format == "sparsify":
        return sparsify.write(sae, path)
    raise ConfigError(f"save_sae: expected format one of {list(FORMATS)}, found '{format}'")
