"""The planted-dictionary recovery run shared by the promise-7 tests (tests/test_arch_recovery.py,
tests/test_mdl_recovery.py): one setup, so their measured thresholds describe the same experiment."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saekit.data.synthetic import planted_features
from saekit.eval.ground_truth import max_cosine_per_atom
from saekit.store.batches import TensorBatches
from saekit.train import TrainConfig, train


@dataclass
class Recovery:
    best_G: torch.Tensor  # per planted atom, the best cosine over the trained decoder rows
    chance_G: torch.Tensor  # the same for the untrained rows (the control)
    W_FD: torch.Tensor  # the trained decoder rows
    D_GD: torch.Tensor  # the planted atoms
    l0: float  # eval-mode L0 on 4,096 of the rows

    def summary(self) -> str:
        return (f"mean {self.best_G.mean():.3f}, above 0.9: {(self.best_G > 0.9).float().mean():.3f}, "
                f"chance {self.chance_G.mean():.3f}, L0 {self.l0:.2f}")


def recover(sae, run_dir, data_seed: int = 0) -> Recovery:
    """Train `sae` (d_in 16, d_sae 64) on 32,768 rows of 32 planted unit atoms in 16 dimensions, ~3 active a row,
    2,000 steps of 256 rows at lr 3e-3, and match its decoder rows against the atoms."""
    data = planted_features(32768, 16, 32, avg_active=3, seed=data_seed)
    chance_G = max_cosine_per_atom(sae.W_dec.detach(), data.D_FD)
    cfg = TrainConfig.from_dict(dict(total_steps=2000, batch_size=256, lr=3e-3, checkpoint_every=0,
                                     progress_bar=False, log_every=2000))
    res = train(sae, TensorBatches(data.x_ND, 256, seed=0), cfg, run_dir)
    W_FD = res.sae.W_dec.detach()
    with torch.no_grad():
        l0 = float(res.sae.eval().encode(data.x_ND[:4096]).l0().float().mean())
    return Recovery(max_cosine_per_atom(W_FD, data.D_FD), chance_G, W_FD, data.D_FD, l0)
