"""The training loop: Adam on `sae.loss`, with warm-up/decay, checkpoints, resume and fault handling.

    result = train(sae, batches, TrainConfig(total_steps=10_000, batch_size=4096), "runs/my-sae")
    result = train(sae, batches, cfg, "runs/my-sae", resume=True)   # continue from the latest checkpoint

A fresh run seeds torch/numpy/python RNGs with `cfg.seed`, reads the first batches to estimate the
input-normalisation scale and for `sae.init_from_data`, then trains. Every step: check the batch is
finite, forward, loss, backward, `sae.before_optimizer_step()`, check the gradient is finite, clip,
`optimizer.step()`, `sae.after_optimizer_step()`. SIGINT/SIGTERM stop after the current step with a
complete checkpoint and raise `TrainingInterrupted` (a SystemExit, code 130 / 143).

With `val_batches` (held-out rows: a tensor, a batch source or batches) the trainer measures
validation FVU, L0 and dead fraction on a fixed sample every `cfg.eval_every` steps (see
saekit.train.validation); `cfg.select_best` / `cfg.early_stop_patience` export the best-validation
checkpoint instead of the last. When `train()` ends, the `sae` passed in works on raw activations
exactly like the saved `final_sae/` (the input normalisation is folded into it in place; a resume
restores the training form from the checkpoint).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

import numpy as np
import torch
from torch import Tensor

from saekit.artifacts import MANIFEST, atomic_write_json, read_json
from saekit.errors import (
    ConfigError,
    MissingCheckpointError,
    NonFiniteError,
    ResumeMismatchError,
    ShapeMismatchError,
)
from saekit.layout import FINAL_SAE, METRICS, TRAIN_SUMMARY, VAL_CURVE
from saekit.sae.base import SparseAutoencoder
from saekit.sae.registry import save_sae
from saekit.store.batches import BatchSource
import saekit.train.checkpoint as ckpt_io
from saekit.train.callbacks import Callback, MetricsLogger, ProgressBar, TrainRun, ValidationCurve
from saekit.train.environment import StopSignals, deterministic
from saekit.train.config import RESUME_KEYS, SELECTION_KEYS, TrainConfig
from saekit.train.step import batch_bad_rows, describe_bad, train_step
from saekit.train.validation import TrainWindow, ValidationSet, epochs_warning, rows_per_epoch

if TYPE_CHECKING:
    from saekit.train.distributed import StepSync

log = logging.getLogger(__name__)


class TrainingInterrupted(SystemExit):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; exit code 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(128 + signum)
        self.signum, self.checkpoint = signum, checkpoint


@dataclass
class TrainResult:
    sae: SparseAutoencoder  # the exported SAE, in place and in eval mode: works on raw activations like final_sae/
    state: ckpt_io.TrainState
    run_dir: Path
    final_sae: Path  # run_dir/final_sae, the folded inference copy
    start_step: int  # 0 for a fresh run, the checkpoint's step when resumed
    steps_run: int  # steps this call executed
    epochs: float | None = None  # passes over the training data (None when the source does not say)
    exported_step: int | None = None  # the step final_sae/ holds (the best one when the run selects it)
    validation: dict | None = None  # the last validation measurement (val_fvu, val_l0, ...)


def train(sae: SparseAutoencoder, batches: BatchSource, cfg: TrainConfig, run_dir: str | Path,
          callbacks: list[Callback] | None = None, resume: bool | Literal["auto"] = False,
          sync: "StepSync | None" = None, val_batches: Any = None) -> TrainResult:
    """Train `sae` on `batches`; write checkpoints, metrics.jsonl, config.json and final_sae/ under `run_dir`.

    resume=True continues from the latest checkpoint (MissingCheckpointError if there is none,
    ResumeMismatchError if it was made by an incompatible run); "auto" resumes when a checkpoint exists.
    Under torch.distributed (world size > 1) the gradients and the SAE's training statistics are
    reduced over ranks (see saekit.train.distributed) and only rank 0 writes; `batches` must then be
    the rank's slice of every global batch (`rank=`, `world_size=`).

    `val_batches` (held-out rows never trained on: a tensor `[N, d_in]`, a batch source, or an
    iterable of tensors) is sampled once into a fixed set of `cfg.val_rows` rows and measured every
    `cfg.eval_every` steps. Afterwards `sae` holds the exported weights with the normalisation
    folded in: it encodes raw activations exactly as `load_sae(result.final_sae)` does.
    """
    trainer = Trainer(sae, batches, cfg, run_dir, callbacks, resume, sync, val_batches)
    with trainer.environment() as stop:
        try:
            trainer.start()
            while not trainer.done:
                trainer.step(lambda: stop.signum)
            return trainer.finish()
        finally:
            trainer.close()


class Trainer:
    """One SAE's training as explicit steps, so several SAEs can be stepped in lockstep on shared
    batches (saekit.train.multi). `train()` is start → step until done → finish."""

    def __init__(self, sae: SparseAutoencoder, batches: BatchSource, cfg: TrainConfig, run_dir: str | Path,
                 callbacks: list[Callback] | None = None, resume: bool | Literal["auto"] = False,
                 sync: "StepSync | None" = None, val_batches: Any = None):
        from saekit.train.distributed import current_sync

        _check_kinds(sae, batches, cfg)
        self.sae, self.batches, self.run_dir = sae, batches, Path(run_dir)
        self.cfg = cfg = cfg.resolved(sae.cfg.d_sae)
        self.sync = sync or current_sync()
        _check_inputs(sae, batches, cfg)
        self.sync.check_batches(batches, cfg.batch_size)
        self.found = ckpt_io.latest_checkpoint(self.run_dir)
        if resume is True and self.found is None:
            raise MissingCheckpointError(f"resume requested but {self.run_dir / ckpt_io.CHECKPOINTS} holds no "
                                         "complete checkpoint")
        if resume is False and self.found is not None:
            raise ConfigError(f"{self.run_dir} already holds checkpoints (latest {self.found.name}); pass resume=True "
                              "to continue that run or choose a new run_dir")
        params = [p for _, p in sae.named_parameters()]
        # fused Adam: one pass over each parameter instead of ~10 elementwise kernels (same maths)
        fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
        self.opt = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
        self.validation = _validation_set(val_batches, sae, cfg)
        own = [MetricsLogger(self.run_dir / METRICS, cfg.log_every), ProgressBar(cfg.progress_bar)]
        if self.validation is not None:
            own.append(ValidationCurve(self.run_dir / METRICS, self.run_dir / VAL_CURVE))
        self.callbacks = [*(own if self.sync.is_main else []), *(callbacks or [])]
        self.on_cpu = all(p.device.type == "cpu" for p in params)
        self.stop_requested = False
        self.run: TrainRun | None = None
        self.window = TrainWindow()
        self.best: dict[str, Tensor] | None = None  # training-form tensors of the best evaluation
        self.last_validation: dict | None = None
        self.folded = False
        self.keep_grads = True  # see train_step; saekit.train.multi turns it off
        self.last_checkpoint: Path | None = None  # written by this process (rank 0), the newest

    @contextlib.contextmanager
    def environment(self) -> Iterator["StopSignals"]:
        """Deterministic kernels and the SIGINT/SIGTERM handler, for the whole training."""
        with deterministic(self.cfg.deterministic, warn_only=not self.on_cpu), StopSignals() as stop:
            yield stop

    def start(self) -> None:
        """Resume from the latest checkpoint or initialise a fresh run; tell the callbacks."""
        sae, cfg = self.sae, self.cfg
        if self.found is not None:
            ckpt = ckpt_io.read_checkpoint(self.found)
            self._check_resume(ckpt)
            state = ckpt_io.restore(ckpt, sae, self.opt, self.batches)
            self.best = ckpt.best_tensors if cfg.selects_best else None
            log.info("resuming %s from %s (step %d of %d)", self.run_dir, self.found.name, state.step, cfg.total_steps)
        else:
            state = _fresh_start(sae, self.batches, cfg, self.run_dir, self.sync)
        self.folded = False
        self.sync.broadcast_module(sae)
        self.run = TrainRun(sae, self.opt, self.batches, cfg, self.run_dir, state, state.step, self.validation,
                            rows_per_epoch(self.batches))
        warning = epochs_warning(cfg.total_steps * cfg.batch_size, self.run.rows_per_epoch, cfg.max_epochs_warning)
        if warning:
            log.warning("%s: %s", self.run_dir, warning)
        for cb in self.callbacks:
            cb.on_train_start(self.run)
        sae.train()

    def _check_resume(self, ckpt: ckpt_io.Checkpoint) -> None:
        """The checkpoint was written by this run: the resume keys agree, and when the run selects
        its best checkpoint also the evaluation settings and the validation sample."""
        cfg = self.cfg
        keys = RESUME_KEYS + (SELECTION_KEYS if cfg.selects_best else ())
        defaults = {k: TrainConfig.__dataclass_fields__[k].default for k in SELECTION_KEYS}
        ckpt_io.check_compatible(ckpt, self.sae, cfg.to_dict(), self.batches.fingerprint, keys, defaults)
        saved = ckpt.trainer.get("val_fingerprint")
        if cfg.selects_best and saved != self.validation.fingerprint:
            raise ResumeMismatchError(f"cannot resume from {ckpt.path}: the run selects its best checkpoint on "
                                      f"validation FVU, but the validation sample differs (checkpoint {saved!r}, "
                                      f"current {self.validation.fingerprint!r})")

    @property
    def done(self) -> bool:
        return self.run.state.step >= self.cfg.total_steps or self.run.state.stopped_early

    def step(self, stop_signal: Callable[[], int] = lambda: 0, raise_on_stop: bool = True) -> Path | None:
        """One training step, its callbacks, and a checkpoint when due or when a stop was requested
        (`stop_signal()` returns the number of a received signal, 0 if none; any rank's counts).
        Then raises TrainingInterrupted unless `raise_on_stop=False` (the caller stops; see
        `stop_requested`). Returns the checkpoint written, if any."""
        run, cfg = self.run, self.cfg
        info = train_step(self.sae, self.opt, self.batches, run.state, cfg, self.sync, self.keep_grads)
        info.epochs = run.epochs
        if self.validation is not None and info.out is not None and info.x_BD is not None:
            self.window.add(info.x_BD, info.out.recon)
        if self.validation is not None and cfg.eval_every and (
                info.step % cfg.eval_every == 0 or info.step == cfg.total_steps):
            info.val = self.validate(info.step)
        for cb in self.callbacks:
            cb.on_step_end(run, info)
        local_stop = stop_signal()
        self.stop_requested = self.sync.any(local_stop != 0)
        step = run.state.step
        path = None
        if ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or self.stop_requested
                or step == cfg.total_steps or run.state.stopped_early):
            path = self.checkpoint()
        if self.stop_requested and raise_on_stop:
            signum = local_stop or signal.SIGTERM
            log.warning("signal %d: stopped at step %d with checkpoint %s", signum, step, path)
            raise TrainingInterrupted(signum, path)
        return path

    def validate(self, step: int) -> dict:
        """Measure the fixed held-out sample; track the best evaluation and early stopping."""
        state, cfg = self.run.state, self.cfg
        val = {**self.validation.measure(self.sae, state.input_scale), **self.window.take()}
        if self.run.epochs is not None:
            val["epochs"] = self.run.epochs
        self.last_validation = val
        if cfg.selects_best:
            fvu_ = val["val_fvu"]
            if state.best_val_fvu is None or fvu_ < state.best_val_fvu:
                state.best_step, state.best_val_fvu, state.evals_since_best = step, fvu_, 0
                self.best = _training_tensors(self.sae)
            else:
                state.evals_since_best += 1
            val["best_step"] = state.best_step
            if cfg.early_stop_patience and state.evals_since_best >= cfg.early_stop_patience and step < cfg.total_steps:
                state.stopped_early = True
                log.warning("early stopping at step %d: %d evaluations without a better validation FVU than %.4g "
                            "(step %d)", step, state.evals_since_best, state.best_val_fvu, state.best_step)
        return val

    def checkpoint(self) -> Path:
        """Rank 0 writes the checkpoint; every rank waits for it (a resume on any rank then finds it)."""
        path = ckpt_io.checkpoint_dir(self.run_dir, self.run.state.step)
        if self.sync.is_main:
            extra = {"val_fingerprint": self.validation.fingerprint} if self.validation is not None else {}
            path = ckpt_io.save_checkpoint(self.run_dir, self.run.state, self.sae, self.opt, self.batches,
                                           self.cfg.to_dict(), self.cfg.keep_checkpoints,
                                           best=self.best if self.cfg.selects_best else None, extra=extra)
            self.last_checkpoint = path
        self.sync.barrier()
        for cb in self.callbacks:
            cb.on_checkpoint(self.run, path)
        return path

    def finish(self) -> TrainResult:
        """Put the exported weights (the best evaluation's when the run selects it) into the SAE,
        fold the normalisation into it in place, save final_sae/ and summary.json (rank 0; every
        rank waits for it) and tell the callbacks."""
        state, final = self.run.state, self.run_dir / FINAL_SAE
        exported = state.step
        if self.cfg.selects_best and self.best is not None:
            ckpt_io.load_sae_state(self.sae, self.best, state.input_scale, f"best evaluation (step {state.best_step})")
            exported = state.best_step
            log.info("exporting the best validation checkpoint: step %d (val_fvu %.4g)", exported, state.best_val_fvu)
        self.fold()
        if self.sync.is_main:
            final = save_sae(self.sae, final, weights_from=self._checkpoint_weights(exported))
            atomic_write_json(self.run_dir / TRAIN_SUMMARY, self._summary(exported))
        self.sync.barrier()
        for cb in self.callbacks:
            cb.on_train_end(self.run)
        return TrainResult(self.sae, state, self.run_dir, final, self.run.start_step, state.step - self.run.start_step,
                           self.run.epochs, exported, self.last_validation)

    def _summary(self, exported: int) -> dict:
        state = self.run.state
        return {"steps": state.step, "total_steps": self.cfg.total_steps, "tokens": state.tokens,
                "rows_per_epoch": self.run.rows_per_epoch, "epochs": self.run.epochs,
                "stopped_early": state.stopped_early, "selects_best": self.cfg.selects_best,
                "exported_step": exported, "best_step": state.best_step, "best_val_fvu": state.best_val_fvu,
                "last_validation": self.last_validation, "nonfinite_skipped": state.nonfinite_skipped,
                "val_rows": int(self.validation.x_ND.shape[0]) if self.validation is not None else 0}

    def _checkpoint_weights(self, exported: int) -> tuple[Path, str] | None:
        """The final checkpoint's `state_dict()` file and its sha256 when final_sae/ needs exactly those
        tensors (they were saved at the exported step, and there is no input scale to fold), so
        `save_sae` links the file instead of serialising and hashing the weights a second time."""
        path, state = self.last_checkpoint, self.run.state
        if path is None or exported != state.step or state.input_scale is not None \
                or path.name != ckpt_io.checkpoint_name(state.step):
            return None
        sha = read_json(path / MANIFEST).get("files", {}).get(ckpt_io.SAE_STATE)
        return (path / ckpt_io.SAE_STATE, sha) if sha else None

    def fold(self) -> None:
        """Fold the training input normalisation into the SAE in place (once) and put it in eval
        mode, so the object the caller holds works on raw activations exactly like the saved copy;
        a resume restores the training form from the checkpoint."""
        if not self.folded:
            fold_in_place(self.sae)
            self.sae.eval()  # like load_sae's copy: inference behaviour, no training statistics updated
            self.folded = True

    def close(self) -> None:
        """Tell the callbacks; an interrupted run also leaves its SAE folded (raw-activation space)
        and, like every finished one, without gradients (`keep_grads` kept the last step's)."""
        self.opt.zero_grad(set_to_none=True)
        if self.run is not None:
            self.fold()
        for cb in self.callbacks:
            if self.run is not None:
                cb.close(self.run)


def fold_in_place(sae: SparseAutoencoder) -> None:
    """Rewrite `sae`'s weights so that it works on raw activations (what `sae.folded_copy()` holds)
    and drop its `input_scale`: no half-state where the object silently expects normalised inputs."""
    if getattr(sae, "input_scale", None) is None:
        return
    folded = sae.folded_copy()
    keep = set(folded.state_dict())
    with torch.no_grad():
        mine = dict(itertools.chain(sae.named_parameters(), sae.named_buffers()))
        for name, t in itertools.chain(folded.named_parameters(), folded.named_buffers()):
            if name != "input_scale" and name in keep and name in mine:
                mine[name].copy_(t)
    del sae.input_scale


def _training_tensors(sae: SparseAutoencoder) -> dict[str, Tensor]:
    """Copies of every parameter and buffer (training form), as a checkpoint holds them."""
    return {n: t.detach().clone() for n, t in itertools.chain(sae.named_parameters(), sae.named_buffers())}


def _validation_set(val_batches: Any, sae: SparseAutoencoder, cfg: TrainConfig) -> ValidationSet | None:
    if cfg.selects_best and (val_batches is None or cfg.eval_every == 0):
        raise ConfigError("select_best / early_stop_patience choose a checkpoint on validation FVU: expected "
                          "val_batches (held-out rows) and eval_every >= 1, found "
                          f"val_batches={'None' if val_batches is None else 'given'}, eval_every={cfg.eval_every}")
    if val_batches is None or cfg.eval_every == 0:
        return None
    return ValidationSet.from_any(val_batches, cfg.val_rows, sae.cfg.d_in)


def _check_inputs(sae: SparseAutoencoder, batches: BatchSource, cfg: TrainConfig) -> None:
    if getattr(batches, "d_in", sae.cfg.d_in) != sae.cfg.d_in:
        raise ShapeMismatchError(f"batch source has d_in={batches.d_in}, the SAE expects d_in={sae.cfg.d_in}")
    if getattr(batches, "batch_size", cfg.batch_size) != cfg.batch_size:
        raise ConfigError(f"TrainConfig.batch_size={cfg.batch_size} but the batch source yields "
                          f"batch_size={batches.batch_size}")
    if cfg.normalize_activations != "none" and not sae.supports_folding:
        raise ConfigError(f"normalize_activations='{cfg.normalize_activations}' needs an architecture that can fold "
                          f"the scale into its weights; '{sae.architecture}' cannot")


def _fresh_start(sae: SparseAutoencoder, batches: BatchSource, cfg: TrainConfig, run_dir: Path,
                 sync: "StepSync") -> ckpt_io.TrainState:
    """Seed RNGs, estimate the normalisation scale and initialise from the first batches, record the config.

    Distributed: every rank reassembles the first *global* batches, so the scale and the
    data-dependent init are those of a one-process run."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    state = ckpt_io.TrainState()
    n = max(cfg.init_batches, cfg.norm_batches if cfg.normalize_activations != "none" else 0)
    first = []
    for i in range(n):
        x = sync.gather_rows(batches.next_batch())
        bad = batch_bad_rows(x)
        if bad and cfg.nonfinite == "raise":
            raise NonFiniteError(f"non-finite activations in warm-up batch {i} (read before step 1), rows {bad}"
                                 + (describe_bad(batches, bad) if sync.world_size == 1 else ""))  # gathered rows
        first.append(x[torch.isfinite(x).all(-1)] if bad else x)
    scale = 1.0
    if cfg.normalize_activations != "none":
        mean_sq = torch.cat(first).double().pow(2).sum(-1).mean().item()
        scale = math.sqrt(sae.cfg.d_in / mean_sq) if mean_sq > 0 else 1.0
        state.input_scale = scale
        sae.set_input_scale(scale)
        log.info("input normalisation scale %.6g (mean squared norm %.6g)", scale, mean_sq)
    p = next(sae.parameters())
    sae.init_from_data(_init_rows(first[: cfg.init_batches], scale).to(device=p.device, dtype=p.dtype))
    if sync.is_main:
        atomic_write_json(run_dir / "config.json", {"train": cfg.to_dict(), "sae": sae.config_dict(),
                                                    "data_fingerprint": batches.fingerprint,
                                                    "input_scale": state.input_scale, "world_size": sync.world_size})
    return state


def _init_rows(batches: list[Tensor], scale: float) -> Tensor:
    """The rows `init_from_data` sees: the warm-up batches times the scale, computed in float64 (then
    rounded to the SAE's dtype). A scale of 1 leaves every value as read, so the batches are passed
    as they are (no float64 round trip: the same values, without four copies of the batch)."""
    rows = torch.cat(batches) if len(batches) > 1 else batches[0]
    return rows if scale == 1.0 else rows.double() * scale


def _check_kinds(sae, batches, cfg) -> None:
    """The public `train()` names what it was given instead of an AttributeError deep in the loop."""
    if not callable(getattr(batches, "next_batch", None)):
        raise ConfigError(f"train: expected a batch source with next_batch() (e.g. store.batches(batch_size)), "
                          f"found {type(batches).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"train: expected a TrainConfig (TrainConfig(...) or TrainConfig.from_dict(d)), "
                          f"found {type(cfg).__name__}")
