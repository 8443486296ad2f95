"""Feature absorption on a run's own labels (the SAEBench "absorption" idea, without its spelling task).

A broad concept is *absorbed* when the latent that stands for it stays silent on some of its positive
examples because a more specific latent took over: the "airline" latent misses "@united I hope so too"
while a "@united" latent fires. Measured from a sparse code and binary labels:

1. the concept's **best latent**: the one whose firing predicts the label with the highest F1;
2. **specific latents**: other latents whose firings are (almost) all positive (precision >= `min_precision`,
   at least `min_support` firings) - latents that imply the concept;
3. **absorption rate** = share of positive rows where the best latent is silent and a specific latent fires.

A flat SAE that split the concept into narrow latents has a high rate; an SAE with a general latent
that fires whenever the concept is present has a low one. `best_miss_rate` (the best latent silent,
whatever else fires) bounds it from above. All functions are pure (tensors in, numbers out); the
per-row indicators come back so callers can put a document-bootstrap interval on the rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.errors import ShapeMismatchError


@dataclass
class Absorption:
    """One concept's absorption. `absorbed_N` / `missed_N`: per-row indicators (False off the positives)."""

    best_latent: int
    best_f1: float
    best_recall: float
    best_miss_rate: float
    absorption_rate: float
    specific_latents: list[int]
    absorbed_N: Tensor
    missed_N: Tensor

    def to_dict(self) -> dict:
        return {"best_latent": self.best_latent, "best_f1": self.best_f1, "best_recall": self.best_recall,
                "best_miss_rate": self.best_miss_rate, "absorption_rate": self.absorption_rate,
                "n_specific_latents": len(self.specific_latents), "specific_latents": self.specific_latents[:20]}


def latent_label_counts(idx_NK: Tensor, vals_NK: Tensor, y_N: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """Per latent: rows where it fires `[d_sae]`, and positive rows where it fires `[d_sae]`."""
    if idx_NK.shape != vals_NK.shape or idx_NK.shape[0] != y_N.shape[0]:
        raise ShapeMismatchError(f"absorption: expected indices/values [N, k] and labels [N], found "
                                 f"{tuple(idx_NK.shape)}, {tuple(vals_NK.shape)}, {tuple(y_N.shape)}")
    on_NK = vals_NK > 0
    fired_F = torch.bincount(idx_NK[on_NK], minlength=d_sae)
    pos_NK = on_NK & y_N.bool()[:, None]
    return fired_F, torch.bincount(idx_NK[pos_NK], minlength=d_sae)


def latent_f1(fired_F: Tensor, pos_fired_F: Tensor, n_pos: int) -> Tensor:
    """F1 of "the latent fires" as a predictor of the label, per latent (0 where it never fires)."""
    precision = pos_fired_F / fired_F.clamp_min(1)
    recall = pos_fired_F / max(n_pos, 1)
    return torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                       torch.zeros_like(precision, dtype=torch.float64)).double()


def fires_any(idx_NK: Tensor, vals_NK: Tensor, latent_mask_F: Tensor) -> Tensor:
    """Rows `[N]` where at least one latent of the mask fires."""
    return ((vals_NK > 0) & latent_mask_F[idx_NK]).any(-1)


def absorption(idx_NK: Tensor, vals_NK: Tensor, y_N: Tensor, d_sae: int, *, min_precision: float = 0.9,
               min_support: int = 5, candidates_F: Tensor | None = None) -> Absorption:
    """The concept's absorption (module docstring). `candidates_F` (bool) restricts which latents may be the
    concept's best latent (e.g. a matryoshka SAE's first prefix); every latent may be a specific one."""
    y_N = y_N.bool()
    n_pos = int(y_N.sum())
    fired_F, pos_F = latent_label_counts(idx_NK, vals_NK, y_N, d_sae)
    f1_F = latent_f1(fired_F, pos_F, n_pos)
    if candidates_F is not None:
        f1_F = torch.where(candidates_F, f1_F, torch.full_like(f1_F, -1.0))
    best = int(f1_F.argmax())
    specific_F = (pos_F >= min_precision * fired_F) & (fired_F >= min_support)
    specific_F[best] = False
    best_mask = torch.zeros(d_sae, dtype=torch.bool, device=idx_NK.device)
    best_mask[best] = True
    missed_N = y_N & ~fires_any(idx_NK, vals_NK, best_mask)
    absorbed_N = missed_N & fires_any(idx_NK, vals_NK, specific_F)
    share = (lambda m: float(m.sum()) / max(n_pos, 1))
    return Absorption(best, float(f1_F[best]), float(pos_F[best]) / max(n_pos, 1), share(missed_N),
                      share(absorbed_N), specific_F.nonzero().flatten().tolist(), absorbed_N, missed_N)
