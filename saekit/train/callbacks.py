"""Training callbacks: what the loop tells the outside world, kept out of the loop itself.

A callback subclasses `Callback` and overrides any of its hooks. The loop calls them in order;
`close` is always called, also when training raises.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saekit.artifacts import atomic_write_bytes, dumps_json
from saekit.sae.base import ForwardOutput, LossOutput, SparseAutoencoder
from saekit.store.batches import BatchSource
from saekit.train.checkpoint import TrainState
from saekit.train.config import TrainConfig
from saekit.train.validation import ValidationSet

log = logging.getLogger(__name__)


@dataclass
class StepInfo:
    """One training step as callbacks see it."""

    step: int  # 1-based number of this step (== run.state.step after it)
    batch_BD: Tensor  # the rows as read from the batch source
    x_BD: Tensor | None  # the rows the SAE saw (normalised); None for a skipped non-finite batch
    out: ForwardOutput | None
    loss: LossOutput | None
    lr: float
    grad_norm: float | None
    skipped: bool = False
    reason: str = ""
    epochs: float | None = None  # passes over the training data after this step (None: size unknown)
    val: dict | None = None  # validation measurement of this step (val_fvu, val_l0, ...), on evaluation steps


@dataclass
class TrainRun:
    """What callbacks see: the live objects of the run."""

    sae: SparseAutoencoder
    optimizer: torch.optim.Optimizer
    batches: BatchSource
    cfg: TrainConfig  # resolved: total_steps and lr filled in
    run_dir: Path
    state: TrainState
    start_step: int
    validation: ValidationSet | None = None  # the fixed held-out sample, when the run has one
    rows_per_epoch: int | None = None  # rows of one pass over the training data, when the source tells

    @property
    def epochs(self) -> float | None:
        """Passes over the training data so far (None when the batch source does not say its size)."""
        return self.state.tokens / self.rows_per_epoch if self.rows_per_epoch else None



class Callback:
    """No-op hooks; override what you need."""

    def on_train_start(self, run: TrainRun) -> None: ...

    def on_step_end(self, run: TrainRun, info: StepInfo) -> None: ...

    def on_checkpoint(self, run: TrainRun, path: Path) -> None: ...

    def on_train_end(self, run: TrainRun) -> None: ...

    def close(self, run: TrainRun) -> None: ...


def fvu(x_BD: Tensor, recon_BD: Tensor) -> float:
    """Fraction of variance unexplained, around the batch mean: sum|x - x_hat|^2 / sum|x - mean(x)|^2.

    In float64, through one reused `[B, D]` buffer (the same values as the plain expression, which
    allocated six float64 copies of the batch on every logged step)."""
    x = x_BD.detach().double()
    d = torch.sub(x, x.mean(0))
    total = d.pow_(2).sum()
    sse = torch.sub(x, recon_BD.detach(), out=d).pow_(2).sum()
    return float(sse / total) if total > 0 else float("nan")


class MetricsLogger(Callback):
    """Appends one strict-JSON line every `every` steps to `path` (normally run_dir/metrics.jsonl).

    Fields: step, tokens, epochs, loss and its parts, fvu, l0, dead_fraction, tokens_per_s, lr, grad_norm,
    nonfinite_skipped; on evaluation steps (which always get a line) also val_fvu, val_l0,
    val_dead_fraction, val_rows and train_fvu (the training batches' FVU since the previous
    evaluation), and best_step when the run selects its best checkpoint. The dead fraction is the SAE's own (`sae.dead_fraction()`) when it has one,
    else the fraction of latents that did not fire during the last `dead_window_tokens` rows seen
    since this process started. On resume, lines past the resumed step are dropped first.
    """

    def __init__(self, path: str | Path, every: int = 100, dead_window_tokens: int = 10_000_000):
        self.path, self.every, self.window = Path(path), every, dead_window_tokens
        self._since_fired: Tensor | None = None
        self._count_firing: bool | None = None
        self._f = None

    def on_train_start(self, run: TrainRun) -> None:
        if self.path.exists():  # drop lines past the resumed step (and a line a kill cut short)
            atomic_write_bytes(self.path, "".join(ln + "\n" for ln in self.path.read_text().splitlines()
                                                  if _step_of(ln) is not None and _step_of(ln) <= run.start_step).encode())
        self._f = open(self.path, "a")
        self._t, self._tokens = time.perf_counter(), run.state.tokens

    def on_step_end(self, run: TrainRun, info: StepInfo) -> None:
        if self._count_firing is None:  # asked once: whether an SAE keeps its own statistic follows from its
            self._count_firing = run.sae.dead_fraction() is None  # config (each step it cost ~0.3 ms on the benchmark)
        if info.out is not None and self._count_firing:
            self._track_firing(info.out, run.sae.cfg.d_sae)
        if info.step % self.every == 0 or info.step == run.cfg.total_steps or info.val is not None:
            self._write(run, info)

    @torch.no_grad()
    def _track_firing(self, out: ForwardOutput, d_sae: int) -> None:
        code = out.code.reshape(-1)
        if self._since_fired is None:
            self._since_fired = torch.zeros(d_sae, dtype=torch.long)
        self._since_fired += code.indices.shape[0]
        fired = code.indices[code.values != 0].unique().cpu()
        self._since_fired[fired] = 0

    def _dead_fraction(self, run: TrainRun) -> float | None:
        own = run.sae.dead_fraction()
        if own is not None:
            return float(own)
        if self._since_fired is None:
            return None
        return float((self._since_fired >= self.window).float().mean())

    @torch.no_grad()
    def _write(self, run: TrainRun, info: StepInfo) -> None:
        now = time.perf_counter()
        rec: dict[str, Any] = {"step": info.step, "tokens": run.state.tokens}
        if info.epochs is not None:
            rec["epochs"] = info.epochs
        if info.loss is not None and info.out is not None and info.x_BD is not None:
            rec["loss"] = float(info.loss.total.detach())
            rec.update({k: float(v) for k, v in info.loss.parts.items() if k not in rec})
            rec["fvu"] = fvu(info.x_BD, info.out.recon.detach())
            rec["l0"] = float(info.out.code.l0().float().mean())
        rec["dead_fraction"] = self._dead_fraction(run)
        rec["tokens_per_s"] = (run.state.tokens - self._tokens) / max(now - self._t, 1e-9)
        rec["lr"] = info.lr
        rec["grad_norm"] = info.grad_norm
        rec["nonfinite_skipped"] = run.state.nonfinite_skipped
        if info.skipped:
            rec["skipped"] = info.reason
        if info.val is not None:
            rec.update({k: v for k, v in info.val.items() if k not in rec})
        self._t, self._tokens = now, run.state.tokens
        self._f.write(dumps_json(rec, indent=None) + "\n")
        self._f.flush()
        log.debug("step %d: %s", info.step, rec)

    def close(self, run: TrainRun) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class ProgressBar(Callback):
    """A tqdm bar over the training steps, showing the latest loss, learning rate and, once measured,
    the latest validation FVU and the epochs so far."""

    def __init__(self, enabled: bool = True, every: int = 10):
        self.enabled, self.every = enabled, every
        self._bar = None
        self._val: dict[str, str] = {}

    def on_train_start(self, run: TrainRun) -> None:
        # redrawn at most once a second: a redraw costs ~1.6 ms, and at tqdm's 0.1 s every step was one
        self._bar = tqdm(total=run.cfg.total_steps, initial=run.start_step, desc="train", unit="step",
                         disable=not self.enabled, dynamic_ncols=True, mininterval=1.0)

    def on_step_end(self, run: TrainRun, info: StepInfo) -> None:
        self._bar.update(1)
        if info.val is not None:
            self._val = {"val_fvu": f"{info.val['val_fvu']:.4g}"}
            if info.epochs is not None:
                self._val["epochs"] = f"{info.epochs:.1f}"
        if (info.step % self.every == 0 or info.val is not None) and info.loss is not None:
            self._bar.set_postfix(loss=f"{float(info.loss.total.detach()):.4g}", lr=f"{info.lr:.2e}", **self._val,
                                  refresh=False)

    def close(self, run: TrainRun) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ValidationCurve(Callback):
    """Draws the training-vs-validation FVU plot from metrics.jsonl when training ends or stops.
    Why not at every checkpoint: a matplotlib figure costs about a second; the live numbers are in
    metrics.jsonl (and the browser's evaluation page draws them from there)."""

    def __init__(self, metrics_path: str | Path, out_path: str | Path):
        self.metrics_path, self.out_path = Path(metrics_path), Path(out_path)

    def close(self, run: TrainRun) -> None:
        from saekit.train.validation import plot_validation_curve

        try:
            plot_validation_curve(self.metrics_path, self.out_path)
        except (OSError, ValueError) as e:  # a plot must never turn a finished run into a failure
            log.warning("%s not drawn: %s", self.out_path, e)
