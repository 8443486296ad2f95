"""Ground-truth recovery on planted-feature data (see `saekit.data.synthetic`).

Given the true dictionary `D_true_GD` (G atoms) and the SAE's decoder `W_dec_FD` (F latents):

- **recovery** (mean max cosine): for each true atom, the largest cosine with any learned
  decoder row, averaged over true atoms; plus the fraction of atoms whose best cosine exceeds
  `threshold` (0.9 by default).
- **MCC** (mean correlation coefficient, as SynthSAEBench reports it): a one-to-one matching of
  true atoms to latents maximising the total |cos| (Hungarian algorithm,
  `scipy.optimize.linear_sum_assignment`), averaged over the min(G, F) matched pairs.

The max-cosine pass is chunked over true atoms; the Hungarian matching needs the full G × F
|cos| matrix in memory.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from saekit.errors import ShapeMismatchError


def _unit_rows(M: Tensor, eps: float = 1e-12) -> Tensor:
    M = M.detach().double()
    return M / M.norm(dim=-1, keepdim=True).clamp_min(eps)


def _check(W_dec_FD: Tensor, D_true_GD: Tensor) -> None:
    if W_dec_FD.ndim != 2 or D_true_GD.ndim != 2 or W_dec_FD.shape[1] != D_true_GD.shape[1]:
        raise ShapeMismatchError(f"ground truth: expected W_dec [F, d] and D_true [G, d] with the same d, "
                                 f"found {tuple(W_dec_FD.shape)} and {tuple(D_true_GD.shape)}")


def cosine_matrix(D_true_GD: Tensor, W_dec_FD: Tensor) -> Tensor:
    """Cosine between every true atom and every decoder row, `[G, F]` float64."""
    _check(W_dec_FD, D_true_GD)
    return _unit_rows(D_true_GD) @ _unit_rows(W_dec_FD).T


def max_cosine_per_atom(W_dec_FD: Tensor, D_true_GD: Tensor, chunk: int = 1024) -> Tensor:
    """For each true atom, the largest (signed) cosine with any decoder row, `[G]` float64."""
    _check(W_dec_FD, D_true_GD)
    W = _unit_rows(W_dec_FD)
    D = _unit_rows(D_true_GD)
    return torch.cat([(D[i: i + chunk] @ W.T).max(dim=1).values for i in range(0, D.shape[0], chunk)])


def mcc(W_dec_FD: Tensor, D_true_GD: Tensor) -> float:
    """Hungarian-matched mean |cos| between true atoms and decoder rows."""
    abs_cos = cosine_matrix(D_true_GD, W_dec_FD).abs().cpu().numpy()
    rows, cols = linear_sum_assignment(abs_cos, maximize=True)
    return float(np.mean(abs_cos[rows, cols]))


def ground_truth_metrics(W_dec_FD: Tensor, D_true_GD: Tensor, threshold: float = 0.9,
                         hungarian: bool = True) -> dict:
    """Recovery, fraction recovered above `threshold`, and (optionally) Hungarian MCC."""
    best_G = max_cosine_per_atom(W_dec_FD, D_true_GD)
    out = {
        "n_true_atoms": int(D_true_GD.shape[0]),
        "n_latents": int(W_dec_FD.shape[0]),
        "mean_max_cosine": float(best_G.mean()),
        "threshold": threshold,
        "fraction_recovered": float((best_G > threshold).double().mean()),
    }
    if hungarian:
        out["mcc"] = mcc(W_dec_FD, D_true_GD)
    return out
