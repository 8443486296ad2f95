"""Hierarchical planted features: parents with conditionally orthogonal children.

Why: Costa et al. 2025 ("From Flat to Hierarchical") argue that hierarchical concepts induce
*conditionally orthogonal* features -- a child is active only when its parent is, and what it adds
to the parent is orthogonal to the parent and to its siblings -- and that one-shot linear encoders
struggle with them while matching pursuit does not. This generator plants such a hierarchy with
known directions so tests and demos can measure which SAE recovers it.

Construction (all directions unit norm):

    parent p_i                      random in d_in
    offset u_ij                     orthonormal within parent i and orthogonal to p_i
    child  c_ij = cos * p_i + sin * u_ij      (cos = `child_parent_cos`)

so `<c_ij, p_i> = cos` and `<c_ij - cos p_i, c_ik - cos p_i> = 0` for j != k. With `cos = 0` the
children are the offsets themselves, orthogonal to their parent and to each other: the geometry of
the paper's toy tree (its children are orthogonal to the parent and fire, one at a time, only with
it). With `cos > 0` a child direction also carries part of its parent's. `sibling_cos = s > 0` makes the
offsets of one parent share a direction, pairwise cosine s (the paper's "intra-level correlation"
knob): the children are then no longer orthogonal given the parent.
A child fires only when its parent fires: a firing parent contributes `a * p_i` and, with
probability `p_child`, exactly one of its children adds `b * c_ij`. With
`parent_in_child_rows=False` a child replaces its parent's term instead (the parent concept is then
expressed only through the child direction).
Magnitudes are uniform in [0.5, 1.5]. Rows are exactly `codes_NF @ D_FD` (plus optional noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.data.synthetic import random_dictionary
from saekit.errors import ConfigError


@dataclass
class HierarchicalData:
    """Rows and the planted hierarchy.

    x_ND: the rows. parents_PD / children_CD: true directions (children flattened parent-major,
    `C = n_parents * children_per_parent`). offsets_CD: each child's component orthogonal to its
    parent (unit). child_parent_C: parent index of each child. parent_codes_NP / child_codes_NC:
    coefficients with `x = parent_codes @ parents + child_codes @ children` (+ noise).
    parent_fires_NP: whether the parent concept is present (alone or through a child).
    """

    x_ND: Tensor
    parents_PD: Tensor
    children_CD: Tensor
    offsets_CD: Tensor
    child_parent_C: Tensor
    parent_codes_NP: Tensor
    child_codes_NC: Tensor
    parent_fires_NP: Tensor

    @property
    def D_FD(self) -> Tensor:
        """All true directions, parents first: `[P + C, d_in]`."""
        return torch.cat([self.parents_PD, self.children_CD])

    @property
    def codes_NF(self) -> Tensor:
        """All true codes in the order of `D_FD`."""
        return torch.cat([self.parent_codes_NP, self.child_codes_NC], dim=-1)


def conditionally_orthogonal_children(parents_PD: Tensor, children_per_parent: int, child_parent_cos: float,
                                      generator: torch.Generator, sibling_cos: float = 0.0) -> tuple[Tensor, Tensor]:
    """Children `[P, C, D]` and their unit offsets `[P, C, D]`, orthogonal to the parent; the offsets of
    one parent are orthonormal, or with `sibling_cos = s > 0` share a unit direction m_i so that
    `offset_ij = sqrt(s) m_i + sqrt(1 - s) u_ij` has cosine exactly s with each sibling's."""
    P, D = parents_PD.shape
    n_dirs = children_per_parent + (sibling_cos > 0)
    if n_dirs > D - 1:
        raise ConfigError(f"hierarchical data: children_per_parent must be <= d_in - {1 + (sibling_cos > 0)} = "
                          f"{D - 1 - (sibling_cos > 0)} to be orthogonal given the parent, found {children_per_parent}")
    raw_PCD = torch.randn(P, n_dirs, D, generator=generator, dtype=torch.float64)
    raw_PCD = raw_PCD - (raw_PCD @ parents_PD[:, :, None]) * parents_PD[:, None, :]
    dirs_PCD = torch.linalg.qr(raw_PCD.transpose(1, 2)).Q.transpose(1, 2)  # orthonormal rows per parent
    offsets_PCD = dirs_PCD
    if sibling_cos > 0:
        offsets_PCD = sibling_cos ** 0.5 * dirs_PCD[:, :1] + (1 - sibling_cos) ** 0.5 * dirs_PCD[:, 1:]
    sin = (1.0 - child_parent_cos ** 2) ** 0.5
    children_PCD = child_parent_cos * parents_PD[:, None, :] + sin * offsets_PCD
    return children_PCD, offsets_PCD


def _parent_fires(n: int, P: int, parents_per_row: int | None, p_parent: float, g: torch.Generator) -> Tensor:
    """Which parents fire per row: exactly `parents_per_row` of them, or each with `p_parent`."""
    if parents_per_row is not None:
        if not 0 <= parents_per_row <= P:
            raise ConfigError(f"hierarchical data: parents_per_row must be in [0, {P}], found {parents_per_row}")
        order = torch.rand(n, P, generator=g, dtype=torch.float64).argsort(-1)
        return torch.zeros(n, P, dtype=torch.bool).scatter_(1, order[:, :parents_per_row], True)
    return torch.rand(n, P, generator=g, dtype=torch.float64) < p_parent


def hierarchical_features(n: int, d_in: int, n_parents: int, children_per_parent: int, *,
                          parents_per_row: int | None = None, p_parent: float = 0.1, p_child: float = 0.8,
                          child_parent_cos: float = 0.8, sibling_cos: float = 0.0, parent_in_child_rows: bool = True,
                          noise: float = 0.0, seed: int = 0, dtype=torch.float32) -> HierarchicalData:
    """Generate `n` rows from a planted two-level hierarchy (see the module docstring)."""
    if not 0.0 <= child_parent_cos < 1.0:
        raise ConfigError(f"hierarchical data: child_parent_cos must be in [0, 1), found {child_parent_cos}")
    if not 0.0 <= sibling_cos < 1.0:
        raise ConfigError(f"hierarchical data: sibling_cos must be in [0, 1), found {sibling_cos}")
    g = torch.Generator().manual_seed(seed)
    P, K = n_parents, children_per_parent
    parents_PD = random_dictionary(P, d_in, g, torch.float64)
    children_PKD, offsets_PKD = conditionally_orthogonal_children(parents_PD, K, child_parent_cos, g, sibling_cos)
    fires_NP = _parent_fires(n, P, parents_per_row, p_parent, g)
    a_NP = (0.5 + torch.rand(n, P, generator=g, dtype=torch.float64)) * fires_NP
    has_child_NP = fires_NP & (torch.rand(n, P, generator=g, dtype=torch.float64) < p_child)
    which_NP = torch.randint(0, max(K, 1), (n, P), generator=g)
    b_NP = (0.5 + torch.rand(n, P, generator=g, dtype=torch.float64)) * has_child_NP
    child_NPK = torch.zeros(n, P, K, dtype=torch.float64)
    if K:
        child_NPK.scatter_(2, which_NP[..., None], b_NP[..., None])
    if not parent_in_child_rows:
        a_NP = a_NP * ~has_child_NP
    children_CD, child_codes_NC = children_PKD.reshape(P * K, d_in), child_NPK.reshape(n, P * K)
    x_ND = a_NP @ parents_PD + child_codes_NC @ children_CD
    if noise > 0:
        x_ND = x_ND + noise * torch.randn(x_ND.shape, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(dtype)
    return HierarchicalData(cast(x_ND), cast(parents_PD), cast(children_CD), cast(offsets_PKD.reshape(P * K, d_in)),
                            torch.arange(P).repeat_interleave(K), cast(a_NP), cast(child_codes_NC), fires_NP)


def hedged_parent_cosines(data: HierarchicalData) -> Tensor:
    """For each parent, `[P]`: the cosine between its direction and the one direction that best reconstructs
    its family's part of the rows (`a p_i + b c_ij` over the rows where parent i fires; top right singular vector).

    Why: a latent that must reconstruct a parent's rows without its children -- the first prefix of a
    matryoshka SAE -- is pulled towards the children it always comes with ("feature hedging", Chanin et al.
    2025). This is the most such a latent can reach by reconstruction alone: with 16 orthogonal children and
    `p_child = 1`, about 0.973, not 1. A recovery bar must sit below it."""
    cos = []
    for i in range(data.parents_PD.shape[0]):
        rows = data.parent_fires_NP[:, i]
        kids = data.child_parent_C == i
        fam_RD = data.parent_codes_NP[rows, i:i + 1].double() * data.parents_PD[i].double() \
            + data.child_codes_NC[rows][:, kids].double() @ data.children_CD[kids].double()
        if fam_RD.shape[0] == 0:
            cos.append(torch.tensor(float("nan"), dtype=torch.float64))
            continue
        v_D = torch.linalg.svd(fam_RD, full_matrices=False).Vh[0]
        cos.append((v_D @ data.parents_PD[i].double()).abs())
    return torch.stack(cos)
