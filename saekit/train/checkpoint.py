"""Checkpoints of a training run: everything needed to continue bit-for-bit, nothing pickled.

Layout of `run_dir/checkpoints/`:

    step-00001000/
      sae_cfg.json              the SAE config (config_dict(): architecture + fields)
      sae_state.safetensors     the *training* SAE's `state_dict()` (unfolded): parameters and persistent
                                buffers; with nothing to fold, byte for byte what final_sae/ needs
      sae_buffers.safetensors   its training-only buffers (dead-latent counters, input_scale); format 1
                                checkpoints kept these in sae_state.safetensors and are still read
      optimizer.safetensors     Adam per-parameter state: `exp_avg/<param>`, `exp_avg_sq/<param>`, `step/<param>`
      optimizer.json            Adam param-group hyper-parameters and the parameter order
      rng.safetensors           `torch_cpu` (uint8), `cuda/<i>`, `numpy_mt19937` generator states
      trainer.json              TrainState, scheduler state, data position, data fingerprint, resolved
                                train config, python/numpy RNG scalars, format version
      best_sae.safetensors      only when the run selects its best checkpoint on validation FVU: the
                                training-form SAE tensors of the best evaluation so far (TrainState.best_step)
      saekit_manifest.json      sha256 of every file above, written last inside the folder
    latest                      name of the newest complete checkpoint, written after the folder rename

A checkpoint folder is built as a `.step-....tmp` sibling and renamed into place (artifacts.atomic_dir),
so a kill at any point leaves either no new folder or a complete one; `latest` is only advanced after.
The weights are stored unfolded (training form) so that resume is exact; `load_checkpoint_sae` returns
the folded inference copy that works on raw activations.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saekit.artifacts import (
    MANIFEST,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_chunks,
    clean_stale_tmp,
    dumps_json,
    inside,
    load_tensors,
    read_json,
    verify_manifest,
    write_tensors,
)
from saekit.artifacts import write_manifest as _write_manifest
from saekit.errors import CorruptArtifactError, MissingCheckpointError, ResumeMismatchError
from saekit.layout import CHECKPOINTS
from saekit.sae.base import SAEConfig, SparseAutoencoder

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: the SAE's state_dict and its training-only buffers in two files (1: one file)
READS_FORMATS = (1, 2)
LATEST = "latest"
SAE_CFG, SAE_STATE, SAE_BUFFERS = "sae_cfg.json", "sae_state.safetensors", "sae_buffers.safetensors"
OPT_TENSORS, OPT_JSON = "optimizer.safetensors", "optimizer.json"
RNG_TENSORS, TRAINER_JSON = "rng.safetensors", "trainer.json"
BEST_TENSORS = "best_sae.safetensors"
FILES = [SAE_CFG, SAE_STATE, SAE_BUFFERS, OPT_TENSORS, OPT_JSON, RNG_TENSORS, TRAINER_JSON]
# SAE config fields that are metadata: they may differ between a checkpoint and the resuming run.
_SAE_METADATA = {"device", "model_name", "hook_name", "hook_layer", "context_size", "dataset_path", "seed",
                 "normalize_activations"}


@dataclass
class TrainState:
    """The trainer's own counters (the rest of the run's state lives in the SAE, Adam and the data source)."""

    step: int = 0  # optimizer steps completed (skipped non-finite steps count: they consumed a batch)
    tokens: int = 0  # activation rows consumed by training steps
    nonfinite_skipped: int = 0  # batches skipped under nonfinite='skip'
    consecutive_nonfinite: int = 0
    input_scale: float | None = None  # normalisation scale (None: no normalisation)
    lr: float = 0.0  # learning rate of the last step
    best_step: int | None = None  # step of the lowest validation FVU so far (runs that select their best)
    best_val_fvu: float | None = None
    evals_since_best: int = 0  # evaluations without a new best (early stopping)
    stopped_early: bool = False  # the run ended before total_steps on early stopping


@dataclass
class Checkpoint:
    """A checkpoint read back from disk (already checked against its manifest)."""

    path: Path
    sae_config: dict
    sae_tensors: dict[str, Tensor]
    optimizer_tensors: dict[str, Tensor]
    optimizer_meta: dict
    rng_tensors: dict[str, Tensor]
    trainer: dict
    best_tensors: dict[str, Tensor] | None = None  # the best-validation SAE (runs that select their best)
    state: TrainState = field(init=False)

    def __post_init__(self) -> None:
        self.state = TrainState(**self.trainer["state"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives (whether or not it was written yet)."""
    return Path(run_dir) / CHECKPOINTS / checkpoint_name(step)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete-looking checkpoint folders (step-*, no temp siblings), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / MANIFEST).exists())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names; if the pointer is missing or names a damaged folder, the newest
    folder whose manifest verifies. None when the run has no complete checkpoint."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.exists():
        name = pointer.read_text().strip()
        if not name.startswith("step-") or os.sep in name:  # the pointer names a sibling folder, nothing else
            raise CorruptArtifactError(f"{pointer}: expected the name of a step-NNNNNNNN folder beside it, "
                                       f"found {name!r}")
        cand = inside(root, name, str(pointer))
        try:
            if (cand / MANIFEST).exists():
                verify_manifest(cand)
                return cand
        except CorruptArtifactError as e:
            log.warning("checkpoint named by %s is damaged (%s); looking for an older one", pointer, e)
    for cand in reversed(list_checkpoints(run_dir)):
        try:
            verify_manifest(cand)
            return cand
        except CorruptArtifactError as e:
            log.warning("skipping damaged checkpoint %s (%s)", cand, e)
    return None


# -- writing ------------------------------------------------------------------------------------
def _rng_state() -> tuple[dict[str, Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_mt19937"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, gauss = random.getstate()
    meta = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(py_state), "gauss_next": gauss}}
    return tensors, meta


def _optimizer_state(sae: SparseAutoencoder, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    names = [n for n, _ in sae.named_parameters()]
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"{key}/{names[idx]}"] = value
            else:
                scalars.setdefault(names[idx], {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in sd["param_groups"]]
    meta = {"type": type(opt).__name__, "param_names": names, "param_groups": groups, "scalars": scalars}
    return tensors, meta


# -- the checkpoint's file writers: each file is hashed once, while it is written --------------------
def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """`artifacts.write_tensors` (straight from the tensors' memory, hashed once while written); a name of
    its own here so tests can fail the checkpoint's tensor writes one by one."""
    return write_tensors(path, tensors, metadata)


def _write_json(path: Path, obj: Any) -> str:
    """`atomic_write_json`'s bytes, returning their sha256."""
    return atomic_write_chunks(path, [(dumps_json(obj) + "\n").encode()])


def write_manifest(folder: Path, files: list[str], extra: dict | None = None,
                   hashes: dict[str, str] | None = None) -> None:
    """`artifacts.write_manifest` with the hashes taken while the files were written; written last."""
    _write_manifest(folder, files, extra, hashes)


def sae_tensor_files(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The SAE's tensors as a checkpoint stores them: `sae.state_dict()` (exactly what `save_sae` writes
    for an SAE with nothing to fold, so the final checkpoint's file can become `final_sae/`'s weights
    without being written twice) and the training-only buffers it leaves out (dead-latent counters,
    the input scale)."""
    own = dict(itertools.chain(sae.named_parameters(), sae.named_buffers()))
    state = {n: t.detach() for n, t in sae.state_dict().items() if n in own}
    return state, {n: t.detach() for n, t in own.items() if n not in state}


def save_checkpoint(run_dir: str | Path, state: TrainState, sae: SparseAutoencoder, opt: torch.optim.Optimizer,
                    batches: Any, train_config: dict, keep: int = 3, best: dict[str, Tensor] | None = None,
                    extra: dict | None = None) -> Path:
    """Write `run_dir/checkpoints/step-NNNNNNNN/` atomically, then advance `latest`, then prune.

    `best` (the best-validation SAE tensors of a run that selects its best) is written beside the
    current weights, so a resumed run exports the same one; `extra` goes into trainer.json.

    An OSError (disk full) propagates; the half-built folder is removed and `latest` still names the
    previous complete checkpoint.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(state.step)
    sae_tensors, sae_buffers = sae_tensor_files(sae)
    opt_tensors, opt_meta = _optimizer_state(sae, opt)
    rng_tensors, rng_meta = _rng_state()
    trainer = {
        "format_version": CHECKPOINT_FORMAT,
        "state": asdict(state),
        "scheduler": {"step": state.step, "lr": state.lr},
        "data_position": batches.state_dict(),
        "data_fingerprint": batches.fingerprint,
        "train_config": train_config,
        "buffers": [n for n, _ in sae.named_buffers()],
        "rng": rng_meta,
        **(extra or {}),
    }
    files = FILES + ([BEST_TENSORS] if best is not None else [])
    tensor_files = {SAE_STATE: sae_tensors, SAE_BUFFERS: sae_buffers, OPT_TENSORS: opt_tensors,
                    RNG_TENSORS: rng_tensors, **({BEST_TENSORS: best} if best is not None else {})}
    with atomic_dir(final) as tmp:
        # the tensor files are written (hashed, fsynced) two at a time: hashing and writing release the
        # GIL, so the optimizer file (the largest) overlaps the others; the pool is joined, and any error
        # raised, before the folder is renamed into place
        with ThreadPoolExecutor(2, thread_name_prefix="saekit-ckpt") as pool:
            futures = {name: pool.submit(save_tensors, tmp / name, t) for name, t in tensor_files.items()}
            hashes = {SAE_CFG: _write_json(tmp / SAE_CFG, sae.config_dict()),
                      OPT_JSON: _write_json(tmp / OPT_JSON, opt_meta),
                      TRAINER_JSON: _write_json(tmp / TRAINER_JSON, trainer)}
        hashes.update({name: f.result() for name, f in futures.items()})
        write_manifest(tmp, files, {"kind": "saekit-train-checkpoint", "step": state.step}, hashes)
    atomic_write_bytes(root / LATEST, (final.name + "\n").encode())
    _prune(root, keep, final)
    clean_stale_tmp(root)
    log.info("checkpoint written: %s", final)
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    ckpts = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in ckpts[:-keep] if keep > 0 else []:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


# -- reading and restoring -------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder (or a run folder: its latest checkpoint), verifying every checksum."""
    path = Path(path)
    if not (path / MANIFEST).exists() and (path / CHECKPOINTS).is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise MissingCheckpointError(f"{path}: the run folder has no complete checkpoint in {path / CHECKPOINTS}")
        path = found
    if not (path / MANIFEST).exists():
        raise MissingCheckpointError(f"{path}: not a checkpoint folder (no {MANIFEST})")
    files = verify_manifest(path)["files"]
    trainer = read_json(path / TRAINER_JSON)
    if trainer.get("format_version") not in READS_FORMATS:
        raise CorruptArtifactError(f"{path / TRAINER_JSON}: checkpoint format {trainer.get('format_version')}, "
                                   f"this saekit reads formats {list(READS_FORMATS)}")
    sae_tensors = load_tensors(path / SAE_STATE, files[SAE_STATE])
    if SAE_BUFFERS in files:  # format 2 (format 1 kept every SAE tensor in SAE_STATE)
        sae_tensors.update(load_tensors(path / SAE_BUFFERS, files[SAE_BUFFERS]))
    return Checkpoint(path=path, sae_config=read_json(path / SAE_CFG), sae_tensors=sae_tensors,
                      optimizer_tensors=load_tensors(path / OPT_TENSORS, files[OPT_TENSORS]),
                      optimizer_meta=read_json(path / OPT_JSON),
                      rng_tensors=load_tensors(path / RNG_TENSORS, files[RNG_TENSORS]), trainer=trainer,
                      best_tensors=load_tensors(path / BEST_TENSORS, files[BEST_TENSORS]) if BEST_TENSORS in files
                      else None)


def check_compatible(ckpt: Checkpoint, sae: SparseAutoencoder, train_config: dict, fingerprint: str,
                     resume_keys: tuple[str, ...], defaults: dict | None = None) -> None:
    """Raise ResumeMismatchError listing every difference that would make the resumed run a different run.
    `defaults` stands in for train-config keys a checkpoint does not hold (written before they existed)."""
    problems = []
    saved_sae, cur_sae = ckpt.sae_config, sae.config_dict()
    base_fields = set(SAEConfig.__dataclass_fields__)
    keys = {"architecture", "d_in", "d_sae", "dtype"} | (set(saved_sae) | set(cur_sae)) - base_fields
    for k in sorted(keys - _SAE_METADATA):
        if saved_sae.get(k) != cur_sae.get(k):
            problems.append(f"sae.{k}: checkpoint {saved_sae.get(k)!r}, current {cur_sae.get(k)!r}")
    saved_train = {**(defaults or {}), **ckpt.trainer["train_config"]}
    for k in resume_keys:
        if saved_train.get(k) != train_config.get(k):
            problems.append(f"train.{k}: checkpoint {saved_train.get(k)!r}, current {train_config.get(k)!r}")
    if ckpt.trainer["data_fingerprint"] != fingerprint:
        problems.append(f"data fingerprint: checkpoint {ckpt.trainer['data_fingerprint']!r}, current {fingerprint!r}")
    if problems:
        raise ResumeMismatchError(f"cannot resume from {ckpt.path}: the current run differs from the one that "
                                  "wrote the checkpoint:\n  " + "\n  ".join(problems))


def load_sae_state(sae: SparseAutoencoder, tensors: dict[str, Tensor], input_scale: float | None, source: str) -> None:
    """Copy a checkpoint's parameters and buffers (training-only ones included) into `sae`, exactly."""
    if input_scale is not None:
        sae.set_input_scale(input_scale)
    targets = dict(sae.named_parameters())
    targets.update(dict(sae.named_buffers()))
    missing, extra = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or extra:
        raise ResumeMismatchError(f"{source}: tensors do not match the SAE (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, t in targets.items():
            src = tensors[name]
            if src.shape != t.shape or src.dtype != t.dtype:
                raise ResumeMismatchError(f"{source}: tensor '{name}' is {tuple(src.shape)} {src.dtype} in the "
                                          f"checkpoint, {tuple(t.shape)} {t.dtype} in the SAE")
            t.copy_(src)


def restore(ckpt: Checkpoint, sae: SparseAutoencoder, opt: torch.optim.Optimizer, batches: Any) -> TrainState:
    """Load SAE, optimizer, data position and RNG states from `ckpt`; returns the TrainState."""
    state = ckpt.state
    load_sae_state(sae, ckpt.sae_tensors, state.input_scale, str(ckpt.path / SAE_STATE))
    names = [n for n, _ in sae.named_parameters()]
    meta = ckpt.optimizer_meta
    if meta["param_names"] != names:
        raise ResumeMismatchError(f"{ckpt.path / OPT_JSON}: optimizer parameters {meta['param_names']}, "
                                  f"SAE parameters {names}")
    per_param: dict[int, dict[str, Any]] = {}
    for key, t in ckpt.optimizer_tensors.items():
        kind, pname = key.split("/", 1)
        per_param.setdefault(names.index(pname), {})[kind] = t
    for pname, extra in meta.get("scalars", {}).items():
        per_param.setdefault(names.index(pname), {}).update(extra)
    groups = []
    for g, cur in zip(meta["param_groups"], opt.state_dict()["param_groups"]):
        g = {k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
        g["params"] = cur["params"]
        groups.append(g)
    opt.load_state_dict({"state": per_param, "param_groups": groups})
    batches.load_state_dict(ckpt.trainer["data_position"])
    _set_rng(ckpt.rng_tensors, ckpt.trainer["rng"])
    return state


def _set_rng(tensors: dict[str, Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k.split("/")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["numpy_mt19937"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def load_checkpoint_sae(path: str | Path, fold: bool = True, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """An inference SAE from a checkpoint (or a run folder's latest checkpoint).

    With `fold=True` (default) the training-time input normalisation is folded into the weights, so
    the result works on raw activations exactly like the saved `final_sae/`.
    """
    from saekit.sae.registry import create

    ckpt = read_checkpoint(path)
    sae = create(ckpt.sae_config)
    load_sae_state(sae, ckpt.sae_tensors, ckpt.state.input_scale, str(ckpt.path / SAE_STATE))
    if fold and sae.supports_folding:
        sae = sae.folded_copy()
    sae.eval()
    return sae.to(device)
