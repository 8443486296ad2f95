"""Prefix levels and refinements of a nested (matryoshka) SAE, for the browser's hierarchy view.

A matryoshka SAE orders its latents general-first: level 0 are the first `w_1` latents, level 1 the next
`w_2 - w_1`, and so on. A later-level latent *refines* an earlier one when it adds detail to the same
direction: its decoder row is close to the general latent's (cosine >= `min_cos`). Co-firing (how often
the general latent fires when the specific one does) is attached by the caller from the co-firing table,
so a refinement can be read as "fires inside, points the same way".
"""

from __future__ import annotations

from torch import Tensor

from saekit.errors import ShapeMismatchError


def sae_levels(sae) -> Tensor | None:
    """Each latent's prefix level `[d_sae]` when the SAE is nested (it has `prefix_levels()`), else None."""
    fn = getattr(sae, "prefix_levels", None)
    return fn() if callable(fn) else None


def refinements(W_dec_FD: Tensor, level_F: Tensor, n: int = 8, min_cos: float = 0.3,
                block: int = 1024) -> dict[int, list[tuple[int, float]]]:
    """For each latent below the last level: up to `n` latents of later levels with the highest decoder
    cosine (>= min_cos), as (latent, cosine), best first. Latents without any are left out."""
    if W_dec_FD.shape[0] != level_F.shape[0]:
        raise ShapeMismatchError(f"refinements: expected one level per decoder row ({W_dec_FD.shape[0]}), "
                                 f"found {level_F.shape[0]}")
    W = W_dec_FD.float() / W_dec_FD.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    general = (level_F < level_F.max()).nonzero().flatten()
    out: dict[int, list[tuple[int, float]]] = {}
    for s in range(0, general.numel(), block):
        rows = general[s: s + block]
        cos_BF = W[rows] @ W.T
        cos_BF[level_F[None, :] <= level_F[rows][:, None]] = -2.0  # only later levels refine
        vals, idx = cos_BF.topk(min(n, W.shape[0]), dim=1)
        for r, v_row, i_row in zip(rows.tolist(), vals.tolist(), idx.tolist()):
            kept = [(int(i), round(float(v), 4)) for v, i in zip(v_row, i_row) if v >= min_cos]
            if kept:
                out[r] = kept
    return out
