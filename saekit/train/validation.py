"""Validation during training: held-out reconstruction measured while the SAE trains.

Why: an SAE trained for many passes over a small corpus memorises it. The training loss keeps
falling while the held-out reconstruction gets worse, and nothing in the training loss shows it.
Every `eval_every` steps the trainer measures FVU, L0 and the dead fraction on a fixed sample of
held-out rows (no gradients, the same rows for the whole run) and logs them next to the training
metrics; the optional best-checkpoint selection and early stopping read the same numbers.

This module knows tensors and batch sources only: the run layer decides which rows are held out.

    val = ValidationSet.from_any(heldout_ND, max_rows=4096)   # a tensor, a batch source or batches
    metrics = val.measure(sae, input_scale)                    # {"val_fvu", "val_l0", ...}
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.artifacts import atomic_write_png
from saekit.errors import ConfigError, ShapeMismatchError
from saekit.sae.base import SparseAutoencoder, inference_mode

log = logging.getLogger(__name__)

GAP_RATIO, GAP_ABS = 1.5, 0.05  # default thresholds of the generalisation-gap warning
REMEDY = "more documents, fewer epochs (steps), or a smaller width (d_sae)"


# -- the fixed validation sample --------------------------------------------------------------------
@dataclass
class ValidationSet:
    """A fixed sample of held-out rows `[N, d_in]` (float32, CPU), measured in chunks of `chunk_rows`."""

    x_ND: Tensor
    chunk_rows: int = 4096

    @property
    def fingerprint(self) -> str:
        """Names the sample, so a resumed run that selects checkpoints can check it sees the same rows."""
        head = self.x_ND[:4096].contiguous().numpy().tobytes()
        return hashlib.sha256(head + str(tuple(self.x_ND.shape)).encode()).hexdigest()[:16]

    @classmethod
    def from_any(cls, source: Any, max_rows: int, d_in: int) -> "ValidationSet":
        """From a tensor `[N, d_in]` (evenly spaced rows when it has more than `max_rows`), a batch
        source (`next_batch()` read until `max_rows` rows), or an iterable / zero-argument function of
        tensors or `(acts, ...)` tuples (read until `max_rows` rows)."""
        if isinstance(source, Tensor):
            x_ND = evenly_spaced(source.reshape(-1, source.shape[-1]), max_rows)
        elif callable(getattr(source, "next_batch", None)):
            x_ND = _take(iter(source.next_batch, None), max_rows)
        elif callable(source) or isinstance(source, Iterable):
            x_ND = _take(iter(source() if callable(source) else source), max_rows)
        else:
            raise ConfigError(f"val_batches: expected a tensor [N, d_in], a batch source or an iterable of "
                              f"tensors, found {type(source).__name__}")
        if x_ND.ndim != 2 or x_ND.shape[1] != d_in:
            raise ShapeMismatchError(f"val_batches: expected rows [N, d_in={d_in}], found {tuple(x_ND.shape)}")
        if x_ND.shape[0] < 2:
            raise ConfigError(f"val_batches: expected at least 2 validation rows, found {x_ND.shape[0]}")
        if not torch.isfinite(x_ND).all():
            raise ConfigError("val_batches: the validation rows hold NaN or inf values")
        return cls(x_ND.detach().float().cpu().contiguous())

    @torch.no_grad()
    def measure(self, sae: SparseAutoencoder, input_scale: float | None) -> dict[str, float]:
        """FVU (around the sample's mean), mean L0 and the fraction of latents that fire on none of
        the rows, with the SAE in inference mode; the SAE's mode and every buffer are left as they were."""
        p = next(sae.parameters())
        sse, fired_F, l0_sum = 0.0, torch.zeros(sae.cfg.d_sae, dtype=torch.bool), 0.0
        with inference_mode(sae):
            for x_ND in self.x_ND.split(self.chunk_rows):
                x_ND = x_ND.to(device=p.device, dtype=p.dtype)
                x_ND = x_ND * input_scale if input_scale is not None else x_ND
                out = sae(x_ND)
                sse += float((out.recon.double() - x_ND.double()).pow(2).sum())
                code = out.code.reshape(-1)
                active = code.values != 0
                l0_sum += float(active.sum())
                fired_F[code.indices[active].unique().cpu()] = True
        scale = input_scale if input_scale is not None else 1.0
        x_ND = self.x_ND.double() * scale
        total = float((x_ND - x_ND.mean(0)).pow(2).sum())
        n = self.x_ND.shape[0]
        return {"val_fvu": sse / total if total > 0 else math.nan, "val_l0": l0_sum / n,
                "val_dead_fraction": float((~fired_F).double().mean()), "val_rows": n}


def evenly_spaced(x_ND: Any, max_rows: int) -> Any:
    """At most `max_rows` rows spread evenly over `x_ND` (all of them when it has fewer): a fixed
    sample that covers every document of a held-out set ordered by document."""
    n = len(x_ND)
    if max_rows <= 0 or n <= max_rows:
        return x_ND[:]
    idx = torch.linspace(0, n - 1, max_rows).round().long()
    return x_ND[idx]


def _take(items: Iterable, max_rows: int) -> Tensor:
    parts, seen = [], 0
    for item in items:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor):
            raise ConfigError(f"val_batches: expected batches of tensors, found {type(x).__name__}")
        x = x.reshape(-1, x.shape[-1])[: max_rows - seen]
        parts.append(x)
        seen += x.shape[0]
        if seen >= max_rows:
            break
    if not parts:
        raise ConfigError("val_batches: the validation source yielded no rows")
    return torch.cat(parts)


# -- the training side of the curve -----------------------------------------------------------------
class TrainWindow:
    """FVU of the training batches since the last evaluation (pooled: Σ squared error / Σ variance
    around each batch's mean), so the logged training curve is as smooth as the validation one."""

    def __init__(self) -> None:
        self.sse, self.total, self.steps = 0.0, 0.0, 0

    @torch.no_grad()
    def add(self, x_BD: Tensor, recon_BD: Tensor) -> None:
        x, r = x_BD.detach().double(), recon_BD.detach().double()
        self.sse += float((x - r).pow(2).sum())
        self.total += float((x - x.mean(0)).pow(2).sum())
        self.steps += 1

    def take(self) -> dict[str, float]:
        """The window's FVU (NaN when empty), then an empty window."""
        out = {"train_fvu": self.sse / self.total if self.total > 0 else math.nan}
        self.sse, self.total, self.steps = 0.0, 0.0, 0
        return out


# -- the generalisation gap ---------------------------------------------------------------------------
def generalisation_gap(train_fvu: float, heldout_fvu: float, ratio: float = GAP_RATIO,
                       absolute: float = GAP_ABS) -> dict[str, Any]:
    """Training and held-out FVU side by side, the gap, and a warning naming the likely remedy when
    held-out FVU exceeds both `ratio` x training FVU and training FVU + `absolute`."""
    gap = heldout_fvu - train_fvu
    rel = heldout_fvu / train_fvu if train_fvu > 0 else math.inf
    overfit = math.isfinite(gap) and heldout_fvu > ratio * train_fvu and gap > absolute
    warning = (f"held-out FVU {heldout_fvu:.4g} is {rel:.2f}x the training FVU {train_fvu:.4g} (gap "
               f"+{gap:.4g}; warn above {ratio}x and +{absolute}): the SAE fits its training rows far better than unseen ones; "
               f"likely remedy: {REMEDY}") if overfit else None
    return {"train_fvu": train_fvu, "heldout_fvu": heldout_fvu, "gap": gap, "ratio": rel,
            "threshold_ratio": ratio, "threshold_abs": absolute, "warning": warning}


# -- epochs -------------------------------------------------------------------------------------------
def rows_per_epoch(batches: Any) -> int | None:
    """Rows in one pass over the training data, when the batch source can tell: its `rows_per_epoch`,
    the length of its rows (`x_ND`), or those of the source a shared view reads."""
    for src in (batches, getattr(getattr(batches, "shared", None), "source", None)):
        if src is None:
            continue
        n = getattr(src, "rows_per_epoch", None)
        if n is None and hasattr(src, "x_ND"):
            n = len(src.x_ND)
        if n:
            return int(n)
    return None


def epochs_warning(planned_rows: int, n_rows: int | None, limit: float) -> str | None:
    """The warning for a run that will pass over its training rows more than `limit` times."""
    if not n_rows or limit <= 0 or planned_rows / n_rows <= limit:
        return None
    return (f"this run will make {planned_rows / n_rows:.1f} passes over its {n_rows} training rows (more than "
            f"max_epochs_warning={limit:g}); an SAE trained this long on so few rows tends to memorise them: "
            f"watch val_fvu in metrics.jsonl, or give it {REMEDY}")


# -- the curve ----------------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict]:
    """The JSON lines of a metrics.jsonl file (lines that do not parse are skipped)."""
    path = Path(path)
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_validation_curve(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Training FVU (per logged batch and per evaluation window) and validation FVU against the step,
    as a PNG; None when there is nothing to plot or matplotlib is not installed."""
    rows = read_metrics(metrics_path)
    val = [r for r in rows if r.get("val_fvu") is not None]
    if not val:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed: %s not drawn", out_path)
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    _line(ax, rows, "fvu", "train FVU (batch)", alpha=0.35)
    _line(ax, val, "train_fvu", "train FVU (window)")
    _line(ax, val, "val_fvu", "validation FVU", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("FVU")
    ax.set_yscale("log")
    ax.set_title("training vs validation reconstruction")
    ax.legend(fontsize=8)
    return atomic_write_png(fig, out_path)


def _line(ax, rows: list[dict], key: str, label: str, **kw) -> None:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] > 0]
    if pts:
        ax.plot(*zip(*pts), label=label, **kw)


ValSource = Tensor | Iterable | Callable[[], Iterable] | Any
