"""The MDL controller under torch.distributed (issue 24): every rank steers on the global batch's L0.

Two gloo processes each see half of every global batch; their own batch L0s differ, so a controller fed
the local value would move each rank's thresholds differently. The SAE declares its `batch_stat` as a
'mean' stat buffer, and the trainer's sync makes it the global batch's row-weighted mean before the
controller steps.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saekit.artifacts import load_tensors, save_tensors
from saekit.data.synthetic import planted_features
from saekit.sae.mdl import MDLConfig, MDLSAE
from saekit.store.batches import TensorBatches
from saekit.train import Callback, TrainConfig, train

STEPS, BATCH = 12, 64


class Record(Callback):
    """Each step's controller input (after the sync) and one threshold (after the controller)."""

    def __init__(self):
        self.stats, self.thresholds = [], []

    def on_step_end(self, run, info):
        self.stats.append(float(run.sae.batch_stat))
        self.thresholds.append(float(run.sae.log_threshold.detach()[0]))


def _setup():
    x = planted_features(1024, 16, 32, avg_active=3, seed=0).x_ND
    sae = MDLSAE(MDLConfig(d_in=16, d_sae=32, target_l0=3.0, controller_rate=0.1, seed=0))
    cfg = TrainConfig(total_steps=STEPS, batch_size=BATCH, lr=3e-3, checkpoint_every=0, progress_bar=False,
                      log_every=STEPS, deterministic=False)
    return x, sae, cfg


def _worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        x, sae, cfg = _setup()
        rec = Record()
        batches = TensorBatches(x, BATCH, seed=1, rank=rank, world_size=world)
        train(sae, batches, cfg, Path(root) / "ddp", callbacks=[rec])
        save_tensors(Path(root) / f"rank{rank}.safetensors",
                     {"stats": torch.tensor(rec.stats, dtype=torch.float64),
                      "thresholds": torch.tensor(rec.thresholds, dtype=torch.float64),
                      "log_threshold": sae.log_threshold.detach()})
    finally:
        dist.destroy_process_group()


def test_ranks_steer_on_the_global_batch_l0(tmp_path, one_thread):
    ctx = mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers still running after 120 s (hang)")
    r0, r1 = (load_tensors(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    # one process, the same global batches: its first step starts from the same weights, so its batch L0
    # is exactly what both ranks must have steered on
    x, sae, cfg = _setup()
    rec = Record()
    train(sae, TensorBatches(x, BATCH, seed=1), cfg, tmp_path / "one", callbacks=[rec])
    assert r0["stats"][0].item() == pytest.approx(rec.stats[0], rel=1e-6)
    assert r0["thresholds"][0].item() == pytest.approx(rec.thresholds[0], rel=1e-6, abs=1e-7)
    # every step the ranks measured the same (global) statistic and so hold the same thresholds
    assert torch.equal(r0["stats"], r1["stats"]) and torch.equal(r0["log_threshold"], r1["log_threshold"])
    assert len(set(r0["stats"].tolist())) > 1  # the statistic did change over the steps
