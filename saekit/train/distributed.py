"""Training and caching across processes with torch.distributed (gloo on CPU, nccl on GPU).

    torchrun --nproc_per_node 2 -m saekit train runs/my/config.yaml
    torchrun --nproc_per_node 4 -m saekit cache configs/smollm2_hf.yaml

Training is data parallel and DDP-equivalent: every rank holds the whole SAE, reads the rows
`rank::world_size` of every global batch, and after backward the gradients are summed over ranks
with each rank's weighted by its share of the global batch (n_rank / n_global). Every saekit loss
is a mean over rows plus row-independent terms, so the result is the one-process gradient of the
global batch, also when the global batch does not split evenly.

What else must be global, and how it is made so (`StepSync.reduce_buffers`). The SAE declares it
(`SparseAutoencoder.stat_buffers`, `edits_weights_locally`); nothing here names an architecture:
* dead-latent counters ('fired_any', e.g. `tokens_since_fired`): a latent fired if it fired on any
  rank; otherwise its counter grows by the global number of rows. AuxK then picks the same dead
  latents everywhere.
* minimum statistics ('min', e.g. the BatchTopK inference threshold, an EMA of the smallest kept
  activation): all-reduced with MIN,
  which is exactly the EMA of the global minimum. The *selection* itself stays per rank: each rank
  keeps the k·n_rank largest activations of its own slice (BatchTopK over a batch of n_rank rows),
  which is what other distributed SAE trainers do; a global top-(k·B) would need the whole [B, d_sae]
  pre-activation matrix gathered. Equal to one process for plain top-k, not for BatchTopK.
* per-batch means ('mean', e.g. the MDL-SAE's batch L0 that its λ / threshold controller steers on):
  each rank's mean times its rows, summed, over the global rows; the controller then takes the same
  step on every rank, the one a one-process run of the global batch takes.
* architectures that edit weights from local data after the step (MP's dead-atom revival): the
  parameters and buffers are broadcast from rank 0 after every step, so ranks never drift apart
  (rank 0's revival wins; such runs equal a one-process run only while no atom is revived).
* the warm-up batches (normalisation scale, data-dependent init) are gathered, so every rank
  initialises from the same global rows a one-process run reads.

Why only sync primitives live here: the stages that run a config under torchrun (`train_run`,
`cache_distributed`) are run-layer work in `saekit.run.stages`; the trainer only needs the sync.

Checkpoints and the final SAE are written by rank 0 only; the data position in a checkpoint is the
global one, so a run can resume with a different world size. A dataset whose size does not divide
by the world size is fine: global batches are cut first and then split, so every rank makes the
same number of steps (a global batch smaller than the world size is refused).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from saekit.errors import ConfigError
from saekit.sae.base import SparseAutoencoder

log = logging.getLogger(__name__)


class StepSync:
    """One process: every reduction is the identity. `DistributedSync` overrides them."""

    rank, world_size, is_main = 0, 1, True

    def check_batches(self, batches: Any, batch_size: int) -> None:
        found = getattr(batches, "world_size", 1)
        if found != self.world_size:
            raise ConfigError(f"the batch source is sliced for world_size={found} but this process group has "
                              f"world_size={self.world_size}; build it with rank=, world_size= of the group")

    def step_flags(self, n_rows: int, bad: bool) -> tuple[int, bool]:
        """(global rows of this step, whether any rank saw a non-finite row)."""
        return n_rows, bad

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def gather_rows(self, x_ND: Tensor) -> Tensor:
        """The global batch this rank's slice came from (rank r holds rows r::world_size)."""
        return x_ND

    def average_gradients(self, sae: SparseAutoencoder, n_local: int, n_global: int) -> None: ...

    def reduce_buffers(self, sae: SparseAutoencoder, before: dict[str, Tensor], n_local: int, n_global: int) -> None:
        ...

    def after_optimizer_step(self, sae: SparseAutoencoder) -> None: ...

    def broadcast_module(self, module: torch.nn.Module) -> None: ...

    def barrier(self) -> None: ...


class DistributedSync(StepSync):
    """The reductions over the default torch.distributed process group."""

    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")

    def check_batches(self, batches: Any, batch_size: int) -> None:
        super().check_batches(batches, batch_size)
        if getattr(batches, "rank", self.rank) != self.rank:
            raise ConfigError(f"the batch source is sliced for rank {batches.rank}, this process is rank {self.rank}")
        if batch_size < self.world_size:
            raise ConfigError(f"batch_size={batch_size} is smaller than world_size={self.world_size}: some ranks "
                              "would get empty batches")

    def _all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        dev = t.device
        t = t.to(self.device)
        dist.all_reduce(t, op=op)
        return t.to(dev)

    def step_flags(self, n_rows: int, bad: bool) -> tuple[int, bool]:
        t = self._all_reduce(torch.tensor([n_rows, int(bad)], dtype=torch.int64))
        return int(t[0]), bool(t[1])

    def any(self, flag: bool) -> bool:
        return bool(self._all_reduce(torch.tensor([int(bool(flag))], dtype=torch.int64))[0])

    def gather_rows(self, x_ND: Tensor) -> Tensor:
        n = torch.tensor([x_ND.shape[0]], dtype=torch.int64)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n.to(self.device))
        sizes = [int(s) for s in sizes]
        pad = x_ND.new_zeros(max(sizes), *x_ND.shape[1:])
        pad[: x_ND.shape[0]] = x_ND
        parts = [torch.empty_like(pad, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(parts, pad.to(self.device))
        out = x_ND.new_empty(sum(sizes), *x_ND.shape[1:])
        for r, (part, size) in enumerate(zip(parts, sizes)):
            out[r:: self.world_size] = part[:size].to(x_ND.device)
        return out

    @torch.no_grad()
    def average_gradients(self, sae: SparseAutoencoder, n_local: int, n_global: int) -> None:
        """grad = sum_r (n_r / n) * grad_r in one flat all-reduce. A parameter without a gradient on
        every rank keeps None (Adam then leaves it alone, as in one process)."""
        params = list(sae.parameters())
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        buf = torch.cat([*flat, has]).to(self.device)
        if n_local != n_global:
            buf[: buf.numel() - len(params)].mul_(n_local / n_global)
        buf = self._all_reduce(buf)
        any_grad = buf[buf.numel() - len(params):] > 0
        offset = 0
        for p, keep in zip(params, any_grad.tolist()):
            g = buf[offset: offset + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype)
            offset += p.numel()
            p.grad = g if keep else None

    @torch.no_grad()
    def reduce_buffers(self, sae: SparseAutoencoder, before: dict[str, Tensor], n_local: int, n_global: int) -> None:
        """Make the training statistics the forward just updated global, as the SAE declares them
        in `stat_buffers` (see the module docstring). Every rank holds the same buffers, so every
        rank makes the same all-reduces in the same order."""
        buffers = dict(sae.named_buffers())
        for name, how in sae.stat_buffers.items():
            buf = buffers.get(name)
            if buf is None:
                continue
            if how == "fired_any":
                fired_any = self._all_reduce((buf == 0).to(torch.int32), dist.ReduceOp.MAX).bool()
                grown = before[name] + n_global if name in before else buf - n_local + n_global
                buf.copy_(torch.where(fired_any, torch.zeros_like(buf), grown))
            elif how == "min":
                buf.copy_(self._all_reduce(buf.clone(), dist.ReduceOp.MIN))
            elif how == "mean":  # this rank's mean over its n_local rows -> the global batch's mean
                buf.copy_(self._all_reduce(buf.double() * n_local).div_(n_global).to(buf.dtype))
            else:
                raise ConfigError(f"{sae.architecture}: stat_buffers['{name}'] = {how!r}; expected 'fired_any', "
                                  "'min' or 'mean'")

    def after_optimizer_step(self, sae: SparseAutoencoder) -> None:
        if sae.edits_weights_locally:
            self.broadcast_module(sae)

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers everywhere (DDP does the same at construction)."""
        for t in [*module.parameters(), *module.buffers()]:
            moved = t.data.to(self.device)
            dist.broadcast(moved, src=0)
            if moved is not t.data:
                t.data.copy_(moved)

    def barrier(self) -> None:
        dist.barrier()


def current_sync() -> StepSync:
    """The sync for this process: distributed when a process group with >1 ranks is initialised."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedSync()
    return StepSync()


# -- process groups ------------------------------------------------------------------------------
def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (0, 0, 1 when not launched by it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_process_group(backend: str = "auto", timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise the default group from torchrun's env:// variables; returns (rank, world_size).

    backend 'auto' is nccl when CUDA is available, else gloo. Does nothing for world_size 1."""
    rank, local_rank, world = env_world()
    if world <= 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
