"""Retrieval fidelity of an embedding SAE: do reconstructed embeddings find the same neighbours?

For each document, its `k` nearest neighbours by cosine (excluding itself) are found once with
the original embeddings and once with the reconstructions (reconstructed query against
reconstructed corpus); recall@k is the overlap of the two sets divided by k, averaged over
documents. It is 1.0 when the reconstruction equals the input (the two computations are then
identical, ties included).

Memory stays bounded: queries are processed in chunks so that at most about `max_elements`
similarities exist at once, whatever the corpus size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.errors import ShapeMismatchError

DEFAULT_MAX_ELEMENTS = 1 << 24  # similarities held at once (~64 MB in float32)


def _unit(M_ND: Tensor, eps: float = 1e-12) -> Tensor:
    M_ND = M_ND.detach().float()
    return M_ND / M_ND.norm(dim=-1, keepdim=True).clamp_min(eps)


def nearest_neighbours(emb_ND: Tensor, k: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Tensor:
    """Indices `[N, k]` of each row's k most cosine-similar other rows (self excluded)."""
    n = emb_ND.shape[0]
    if not 1 <= k <= n - 1:
        raise ShapeMismatchError(f"nearest_neighbours: expected 1 <= k <= N-1, found k={k} with N={n}")
    E = _unit(emb_ND)
    chunk = max(1, max_elements // max(n, 1))
    out = []
    for s in range(0, n, chunk):
        sims = E[s: s + chunk] @ E.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + s] = -float("inf")
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out)


def recall_at_k(orig_ND: Tensor, recon_ND: Tensor, k: int = 10, max_elements: int = DEFAULT_MAX_ELEMENTS) -> float:
    """Mean over documents of |NN_k(original) ∩ NN_k(reconstruction)| / k."""
    if orig_ND.shape != recon_ND.shape or orig_ND.ndim != 2:
        raise ShapeMismatchError(f"recall_at_k: expected two [N, d] tensors of one shape, "
                                 f"found {tuple(orig_ND.shape)} and {tuple(recon_ND.shape)}")
    nn_a = nearest_neighbours(orig_ND, k, max_elements)
    nn_b = nearest_neighbours(recon_ND, k, max_elements)
    hits = torch.zeros((), dtype=torch.float64)
    step = max(1, max_elements // (k * k))
    for s in range(0, nn_a.shape[0], step):
        a, b = nn_a[s: s + step], nn_b[s: s + step]
        hits += (a[:, :, None] == b[:, None, :]).any(-1).sum()
    return float(hits / (nn_a.shape[0] * k))


def retrieval_metrics(orig_ND: Tensor, recon_ND: Tensor, k: int = 10,
                      max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict:
    """`recall_at_k` (k clipped to N-1, reported as `k`) and the mean cosine between each embedding and its reconstruction."""
    n = orig_ND.shape[0]
    k_eff = min(k, n - 1)
    cos = (_unit(orig_ND).double() * _unit(recon_ND).double()).sum(-1)
    return {
        "n_docs": int(n),
        "k": int(k_eff),
        "recall_at_k": recall_at_k(orig_ND, recon_ND, k_eff, max_elements) if k_eff >= 1 else None,
        "cosine_mean": float(cos.mean()) if n else None,
    }
