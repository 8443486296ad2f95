"""One optimiser step of the trainer, and what it does when the numbers stop being finite.

`train_step` draws a batch, checks it (one sum; the row scan only when the sum is not finite), runs the
forward and loss under the configured precision, the backward, gradient sync across ranks, clipping and
the optimiser. A non-finite batch, loss or gradient either raises or skips the step (`nonfinite_step`), and
names the rows. Split from `loop.py`, whose `Trainer` owns the run around these steps.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saekit.errors import (
    NonFiniteError,
)
from saekit.sae.base import SparseAutoencoder
from saekit.sae.kernels import grad_sumsq
from saekit.store.batches import BatchSource
import saekit.train.checkpoint as ckpt_io
from saekit.train.callbacks import StepInfo
from saekit.train.config import TrainConfig
from saekit.train.precision import autocast_for
from saekit.train.schedules import lr_at

if TYPE_CHECKING:
    from saekit.train.distributed import StepSync

log = logging.getLogger(__name__)


def train_step(sae: SparseAutoencoder, opt: torch.optim.Optimizer, batches: BatchSource,
                state: ckpt_io.TrainState, cfg: TrainConfig, sync: "StepSync", keep_grads: bool = False) -> StepInfo:
    """One optimizer step; a non-finite batch, loss or gradient raises or is skipped (cfg.nonfinite).

    Every decision that ends or skips a step is taken on values reduced over ranks (a bad row on
    one rank skips the step everywhere), so ranks never disagree and wait on each other forever.

    `keep_grads`: leave this step's gradients on the parameters until the next step frees them just
    before its backward (they are never accumulated: `zero_grad(set_to_none=True)` runs first). The
    allocator then hands the new gradients the memory the old ones had; freed at the end of the step,
    that memory went to the next forward's tensors and the new gradients page-faulted fresh pages
    (~4 ms per 16 MB gradient on the benchmark, ~3 % of a CPU step). Off when several SAEs step in
    turn (saekit.train.multi), where every SAE would hold its gradients at once."""
    batch_BD = batches.next_batch()
    step, lr = state.step + 1, lr_at(state.step, cfg.lr, cfg.total_steps, cfg.warmup_steps, cfg.decay,
                                     cfg.decay_fraction)
    bad = batch_bad_rows(batch_BD)
    n_global, any_bad = sync.step_flags(batch_BD.shape[0], bool(bad))
    state.tokens += n_global
    info = StepInfo(step, batch_BD, None, None, None, lr, None)
    if any_bad:
        where = (f"rows {bad}" + describe_bad(batches, bad)) if bad else "rows on another rank"
        return nonfinite_step(sae, opt, state, cfg, info, {}, f"non-finite activations in {where}")
    p = next(sae.parameters())
    x_BD = batch_BD.to(device=p.device, dtype=p.dtype)
    if state.input_scale is not None:
        x_BD = x_BD * state.input_scale
    buffers = {n: b.clone() for n, b in sae.named_buffers()}  # restored if the step is skipped
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast_for(cfg.precision, p.device):
        out = sae(x_BD)
        loss = sae.loss(x_BD, out)
    sync.reduce_buffers(sae, buffers, x_BD.shape[0], n_global)
    info.x_BD, info.out, info.loss = x_BD, out, loss
    if sync.any(not torch.isfinite(loss.total).all()):
        bad = bad_rows((out.recon.detach() - x_BD).pow(2).sum(-1, keepdim=True))
        return nonfinite_step(sae, opt, state, cfg, info, buffers, f"non-finite loss (rows {bad} of the reconstruction)")
    opt.zero_grad(set_to_none=True)
    with grad_sumsq.collecting():  # the kernels' sums of squares, for a norm without another pass (grad_norm)
        loss.total.backward()
        sync.average_gradients(sae, x_BD.shape[0], n_global)
        if sync.world_size > 1:
            grad_sumsq.forget()  # averaged across ranks: the sums taken in backward no longer hold
        sae.before_optimizer_step()
        norm = grad_norm([q.grad for q in sae.parameters() if q.grad is not None])
    info.grad_norm = float(norm)
    if not math.isfinite(info.grad_norm):
        return nonfinite_step(sae, opt, state, cfg, info, buffers, "non-finite gradient")
    if cfg.grad_clip is not None:
        clip_(sae, cfg.grad_clip, norm)
    opt.step()
    sae.after_optimizer_step()
    sync.after_optimizer_step(sae)
    if not keep_grads:
        opt.zero_grad(set_to_none=True)
    state.step, state.lr, state.consecutive_nonfinite = step, lr, 0
    return info


def grad_norm(grads: list[Tensor]) -> Tensor:
    """The global 2-norm of the final gradients (float32 scalar tensor), what `torch.nn.utils.get_total_norm`
    returns, up to the order of the float32 summation: where a native kernel wrote a gradient (or its last
    edit) it summed the squares on the way (`saekit.sae.kernels.grad_sumsq`, per tile/row in float32 lanes,
    then in double), and those sums are used instead of reading ~32 MB of gradients again (~4 ms of a CPU
    step on the benchmark shape); the others are summed by torch. Without any such sum it is exactly
    `get_total_norm`. A NaN or inf in any element makes the norm non-finite either way."""
    known = [grad_sumsq.lookup(g) for g in grads]
    if all(ss is None for ss in known):
        return torch.nn.utils.get_total_norm(grads)
    total = sum(ss if ss is not None else _sumsq(g) for g, ss in zip(grads, known))
    return torch.tensor(math.sqrt(total) if total >= 0 else math.nan, dtype=torch.float32, device=grads[0].device)


def _sumsq(g: Tensor) -> float:
    """Sum of squares of one (small: the biases') gradient: a BLAS dot, ~20x cheaper than `get_total_norm`'s
    foreach/stack/norm calls on such tensors."""
    if g.dtype in (torch.float32, torch.float64) and g.is_contiguous():
        flat = g.view(-1)
        return float(torch.dot(flat, flat))
    return float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2


def clip_(sae: SparseAutoencoder, max_norm: float, norm: Tensor) -> None:
    """`clip_grads_with_norm_`, skipped when its coefficient clamps to 1 (the usual case): the same
    gradients bit for bit, without a multiply-by-one pass over every gradient each step (~5 % of a
    CPU step on the benchmark shape). The coefficient is computed exactly as torch computes it."""
    coef = max_norm / (norm + 1e-6)
    if float(coef) < 1.0:
        torch.nn.utils.clip_grads_with_norm_(list(sae.parameters()), max_norm, norm)


def nonfinite_step(sae, opt, state, cfg, info: StepInfo, buffers: dict[str, Tensor], what: str) -> StepInfo:
    if cfg.nonfinite == "raise":
        raise NonFiniteError(f"training step {info.step}: {what}")
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in sae.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    state.step, state.lr = info.step, info.lr
    state.nonfinite_skipped += 1
    state.consecutive_nonfinite += 1
    log.warning("training step %d skipped: %s (%d skipped in total)", info.step, what, state.nonfinite_skipped)
    if state.consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
        raise NonFiniteError(f"training step {info.step}: {state.consecutive_nonfinite} consecutive non-finite steps "
                             f"(max_consecutive_nonfinite={cfg.max_consecutive_nonfinite}); last: {what}. "
                             "The last good checkpoint is left as it was.")
    info.skipped, info.reason = True, what
    return info


def batch_bad_rows(x_BD: Tensor) -> list[int]:
    """Non-finite rows of a training batch. A sum over the batch is one vectorised pass and is
    finite whenever every element is (barring overflow, which then takes the exact path); the
    elementwise `isfinite` row scan (five passes over the batch, ~10 % of a CPU step) runs only then."""
    if torch.isfinite(x_BD.sum()):
        return []
    return bad_rows(x_BD)


def bad_rows(x_BD: Tensor, limit: int = 20) -> list[int]:
    return (~torch.isfinite(x_BD)).any(-1).nonzero().flatten()[:limit].tolist()


def describe_bad(batches: BatchSource, rows: list[int]) -> str:
    """Optional: sources that can trace rows back to documents implement `describe_rows(rows) -> str`."""
    fn = getattr(batches, "describe_rows", None)
    return f" ({fn(rows)})" if callable(fn) else ""
