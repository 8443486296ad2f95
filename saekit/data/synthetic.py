"""Planted-feature synthetic activations (Toy-Models-of-Superposition style).

Why: a known dictionary lets tests and benchmarks check that an SAE *recovers* the features it
should, not just that its loss goes down. Each row is a sparse non-negative combination of
`n_features` unit-norm directions in `d_in` dimensions, usually with n_features > d_in
(superposition).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PlantedData:
    """Rows `x_ND`, the true dictionary `D_FD` (unit rows) and the true codes `codes_NF`."""

    x_ND: Tensor
    D_FD: Tensor
    codes_NF: Tensor


def random_dictionary(n_features: int, d_in: int, generator: torch.Generator, dtype=torch.float32) -> Tensor:
    """`n_features` random unit-norm directions `[F, D]`."""
    D_FD = torch.randn(n_features, d_in, generator=generator, dtype=torch.float64)
    return (D_FD / D_FD.norm(dim=-1, keepdim=True)).to(dtype)


def sample_codes(n: int, n_features: int, p_active: float | Tensor, generator: torch.Generator,
                 dtype=torch.float32) -> Tensor:
    """Sparse non-negative codes: each feature fires independently with probability `p_active`
    (a scalar or one per feature) with magnitude uniform in [0.5, 1.5]."""
    p = torch.as_tensor(p_active, dtype=torch.float64).expand(n_features)
    fires_NF = torch.rand(n, n_features, generator=generator, dtype=torch.float64) < p
    mags_NF = 0.5 + torch.rand(n, n_features, generator=generator, dtype=torch.float64)
    return (fires_NF * mags_NF).to(dtype)


def planted_features(n: int, d_in: int, n_features: int, p_active: float | None = None, avg_active: float = 8.0,
                     seed: int = 0, dtype=torch.float32, noise: float = 0.0, zipf: float = 0.0) -> PlantedData:
    """Generate `n` rows from a random dictionary of `n_features` atoms.

    `avg_active` sets the expected number of active features per row (or give `p_active`).
    `zipf > 0` makes firing frequencies fall off as rank^-zipf (normalised to the same mean),
    as real SAE latent densities do.
    """
    g = torch.Generator().manual_seed(seed)
    D_FD = random_dictionary(n_features, d_in, g, torch.float64)
    if p_active is None:
        p_active = avg_active / n_features
    p_F = torch.full((n_features,), float(p_active), dtype=torch.float64)
    if zipf > 0:
        w = torch.arange(1, n_features + 1, dtype=torch.float64).pow(-zipf)
        p_F = (w / w.mean() * p_active).clamp(max=1.0)
    codes_NF = sample_codes(n, n_features, p_F, g, torch.float64)
    x_ND = codes_NF @ D_FD
    if noise > 0:
        x_ND = x_ND + noise * torch.randn(x_ND.shape, generator=g, dtype=torch.float64)
    return PlantedData(x_ND.to(dtype), D_FD.to(dtype), codes_NF.to(dtype))
