"""Architectures register by name; loading picks the class from cfg.json's `architecture`.

Files: `cfg.json` + `sae_weights.safetensors` (SAELens-compatible keys) + a sha256 manifest.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pkgutil
from pathlib import Path
from typing import Any

import torch

from saekit.artifacts import (MANIFEST, ST_DTYPES, atomic_dir, atomic_write_json, load_tensors, read_json,
                              to_strict_json, write_manifest, write_tensors)
from saekit.errors import (ConfigError, CorruptArtifactError, DtypeMismatchError, MissingArtifactError,
                           ShapeMismatchError, nearest)
from saekit.sae.base import NORMALIZE_KEY, SAEConfig, SparseAutoencoder

log = logging.getLogger(__name__)
_REGISTRY: dict[str, type[SparseAutoencoder]] = {}
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
METADATA_FILE = "metadata.json"
"""Where a saekit folder keeps the metadata record of an SAE first read from another tool's files (its
format, where it came from, the keys saekit did not need), so converting to saekit loses none of it."""


def register(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
    """Class decorator: make an architecture loadable by its `architecture` name."""
    if not cls.architecture:
        raise ValueError(f"{cls.__name__} has no architecture name")
    _REGISTRY[cls.architecture] = cls
    return cls


_discovered = False


def _ensure_builtins() -> None:
    """Import every module of `saekit.sae` once, which registers the architectures defined there.

    Discovery, not a list: an architecture is one file in `saekit/sae/` with a `@register`ed class.
    Sub-packages (the kernels) are skipped; importing `base` or `registry` again is a no-op. Lazy
    (first lookup) because the architecture modules import this one. An import error is an error."""
    global _discovered
    if _discovered:
        return
    import saekit.sae as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    _discovered = True


def architectures() -> list[str]:
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_class(name: str) -> type[SparseAutoencoder]:
    _ensure_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown architecture '{name}' (did you mean {nearest(name, _REGISTRY, 1)}?); "
                          f"registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def make_config(data: dict[str, Any], strict: bool = True) -> SAEConfig:
    """Build the architecture's own config class from a dict with an `architecture` key."""
    if not isinstance(data, dict):
        raise ConfigError(f"SAE config: expected a mapping with an 'architecture' key, found {type(data).__name__}")
    data = dict(data)
    name = data.pop("architecture", None)
    if name is None:
        raise ConfigError("SAE config: missing required key 'architecture'")
    norm = data.pop(NORMALIZE_KEY, "none")
    if norm != "none":
        raise ConfigError(f"sae[{name}].{NORMALIZE_KEY}: expected 'none' (or no key), found '{norm}'. Input "
                          f"normalisation is the trainer's: set train.{NORMALIZE_KEY}; the trainer folds its scale "
                          f"into the saved weights, so a saekit SAE always takes raw activations")
    return get_class(name).config_class.from_dict(data, strict=strict, where=f"sae[{name}]")


def create(data: dict[str, Any] | SAEConfig, architecture: str | None = None) -> SparseAutoencoder:
    if isinstance(data, SAEConfig):
        cls = get_class(architecture) if architecture else _class_for_config(data)
        return cls(data)
    cfg = make_config(data)
    return get_class(data["architecture"])(cfg)


def _class_for_config(cfg: SAEConfig) -> type[SparseAutoencoder]:
    _ensure_builtins()
    for cls in _REGISTRY.values():
        if type(cfg) is cls.config_class:
            return cls
    raise ConfigError(f"no registered architecture uses config class {type(cfg).__name__}")


def save_sae(sae: SparseAutoencoder, path: str | Path, fold: bool = True, format: str = "saekit",  # noqa: A002
             weights_from: tuple[Path, str] | None = None) -> Path:
    """Write `cfg.json` + `sae_weights.safetensors` atomically; normalisation folded by default.
    `format="saelens" | "sparsify"` writes files those tools load (see saekit.sae.formats).

    The weights are written straight from the tensors' memory and hashed once, while written; the
    manifest takes that digest. `weights_from=(file, sha256)`: a safetensors file already on disk that
    holds exactly this SAE's `state_dict()` (the trainer's final checkpoint), hard-linked instead of
    written again; it is written as usual when its tensor names and shapes disagree or the file system
    refuses the link."""
    if format != "saekit":
        from saekit.sae import formats

        return formats.save_sae(sae, path, format=format)
    path = Path(path)
    scale = getattr(sae, "input_scale", None)
    if not fold and scale is not None and float(scale) != 1.0:
        raise ConfigError(f"save_sae(fold=False): the SAE has a training input scale {float(scale):.6g}; cfg.json "
                          f"cannot record it (saved SAEs take raw activations): save with fold=True")
    folds = fold and sae.supports_folding and scale is not None and float(scale) != 1.0
    model = sae.folded_copy() if folds else sae  # without a scale to fold, a copy holds the same tensors
    meta = getattr(sae, "metadata", None)
    with atomic_dir(path) as tmp:
        hashes = {CFG_FILE: atomic_write_json(tmp / CFG_FILE, model.config_dict())}
        state = dict(model.state_dict())
        linked = weights_from is not None and _link_weights(weights_from[0], tmp / WEIGHTS_FILE, state)
        hashes[WEIGHTS_FILE] = weights_from[1] if linked else write_tensors(tmp / WEIGHTS_FILE, state)
        if meta is not None:
            hashes[METADATA_FILE] = atomic_write_json(tmp / METADATA_FILE, to_strict_json(meta.to_dict()))
        write_manifest(tmp, list(hashes), hashes=hashes)
    return path


def _link_weights(src: Path, dst: Path, state: dict[str, torch.Tensor]) -> bool:
    """Hard-link `src` to `dst` when its header lists exactly `state`'s tensors (names, dtypes, shapes).
    Files are only ever replaced, never changed in place, so the two names can share one inode."""
    try:
        with open(src, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.pop("__metadata__", None)
        same = set(header) == set(state) and all(
            header[n]["shape"] == list(t.shape) and header[n]["dtype"] == ST_DTYPES.get(t.dtype)
            for n, t in state.items())
        if same:
            os.link(src, dst)
        return same
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.debug("%s not linked to %s (%s): writing it", src, dst, e)
        return False


def load_sae(path: str | Path, device: str | torch.device = "cpu", strict: bool = True,
             verify: bool = True) -> SparseAutoencoder:
    """Load an SAE folder; checksums, shapes and dtypes are checked against cfg.json.

    A saekit folder must carry its sha256 manifest: without it, altered tensors would load silently
    (docs/RELIABILITY.md 11). `verify=False` is the named escape hatch for a folder you trust (then
    re-save it). Other tools' folders have no manifest and are read by `saekit.sae.formats`."""
    path = Path(path)
    if (path / "final_sae").is_dir() and not (path / CFG_FILE).exists():
        path = path / "final_sae"  # a training run folder
    from saekit.sae import formats  # other tools' files (SAELens, sparsify, dictionary_learning, Gemma Scope)

    if formats.foreign_format(path):
        return formats.load_foreign(path, device=device, strict=strict)
    cfg_path = path / CFG_FILE
    if not cfg_path.exists():
        _raise_no_sae(path)
    files = _manifest_files(path) if verify else {}
    if CFG_FILE in files:
        from saekit.artifacts import sha256_file

        if sha256_file(cfg_path) != files[CFG_FILE]:
            raise CorruptArtifactError(f"{cfg_path}: sha256 mismatch with {MANIFEST}; the file was altered")
    cfg_dict = read_json(cfg_path)
    if cfg_dict.get(NORMALIZE_KEY) == "expected_average_only_in":
        cfg_dict[NORMALIZE_KEY] = "none"  # older saekit folders: the scale was folded, inputs are raw (as in SAELens)
    sae = create(cfg_dict) if strict else get_class(cfg_dict["architecture"])(make_config(cfg_dict, strict=False))
    tensors = load_tensors(path / WEIGHTS_FILE, files.get(WEIGHTS_FILE))
    check_state(sae, tensors, source=str(path / WEIGHTS_FILE))
    sae.load_state_dict(tensors, strict=True)
    _attach_metadata(sae, path, files)
    return sae.to(device)


def _raise_no_sae(path: Path) -> None:
    """No cfg.json: nothing there (a typo, a run never trained: no files, at most sub-folders) is
    MissingArtifactError; files that are not an SAE (weights without their cfg.json) are damaged."""
    expected = f"expected an SAE folder ({CFG_FILE} + {WEIGHTS_FILE})"
    files = sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    if files:
        raise CorruptArtifactError(f"{path}: {expected}, found {files}")
    found = "no such folder" if not path.exists() else "a file" if not path.is_dir() else "a folder without them"
    raise MissingArtifactError(f"{path}: {expected}, found {found}", fix="saekit train CONFIG")


def _attach_metadata(sae: SparseAutoencoder, path: Path, files: dict[str, str]) -> None:
    """`sae.metadata` from the folder's metadata.json (an SAE converted from another tool's files)."""
    file = path / METADATA_FILE
    if not file.is_file():
        return
    from saekit.artifacts import sha256_file
    from saekit.sae.formats.common import SAEMetadata

    if METADATA_FILE in files and sha256_file(file) != files[METADATA_FILE]:
        raise CorruptArtifactError(f"{file}: sha256 mismatch with {MANIFEST}; the file was altered")
    sae.metadata = SAEMetadata.from_dict(read_json(file), where=str(file))


def _manifest_files(path: Path) -> dict[str, str]:
    """The sha256 of cfg.json and the weights from a saekit folder's manifest; a missing manifest or
    entry is refused, since the tensors could then not be verified."""
    mpath = path / MANIFEST
    resave = (f"if you trust these files, re-save them with checksums: "
              f"saekit.save_sae(saekit.load_sae('{path}', verify=False), '{path}')")
    if not mpath.is_file():
        raise CorruptArtifactError(f"{path}: no {MANIFEST}; a saekit SAE folder (its {CFG_FILE} names saekit "
                                   f"architecture fields) needs it to verify {CFG_FILE} and {WEIGHTS_FILE}; {resave}")
    files = read_json(mpath).get("files", {})
    missing = [f for f in (CFG_FILE, WEIGHTS_FILE) if f not in files]
    if missing:
        raise CorruptArtifactError(f"{mpath}: expected sha256 entries for {[CFG_FILE, WEIGHTS_FILE]}, "
                                   f"missing {missing}; {resave}")
    return files


def check_state(sae: SparseAutoencoder, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise naming the tensor when weights disagree with the config; nothing is cast silently."""
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ShapeMismatchError(f"{source}: tensors do not match the architecture "
                                 f"'{sae.architecture}' (missing {missing}, unexpected {extra})")
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ShapeMismatchError(f"{source}: tensor '{name}' expected shape {tuple(want.shape)} "
                                     f"from cfg.json, found {tuple(got.shape)}")
        if got.dtype != want.dtype:
            raise DtypeMismatchError(f"{source}: tensor '{name}' expected dtype {want.dtype} "
                                     f"from cfg.json, found {got.dtype}")
