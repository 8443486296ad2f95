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
from saekit.eval.bootstrap import Bootstrap

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


def recall_per_query(orig_ND: Tensor, recon_ND: Tensor, k: int = 10,
                     max_elements: int = DEFAULT_MAX_ELEMENTS) -> Tensor:
    """|NN_k(original) ∩ NN_k(reconstruction)| / k for each query row, `[N]` float64."""
    if orig_ND.shape[0] != recon_ND.shape[0] or orig_ND.ndim != 2 or recon_ND.ndim != 2:
        raise ShapeMismatchError(f"recall_at_k: expected two [N, *] tensors with one row count, "
                                 f"found {tuple(orig_ND.shape)} and {tuple(recon_ND.shape)}")
    nn_a = nearest_neighbours(orig_ND, k, max_elements)
    nn_b = nearest_neighbours(recon_ND, k, max_elements)
    parts = []
    step = max(1, max_elements // (k * k))
    for s in range(0, nn_a.shape[0], step):
        a, b = nn_a[s: s + step], nn_b[s: s + step]
        parts.append((a[:, :, None] == b[:, None, :]).any(-1).sum(-1).double() / k)
    return torch.cat(parts)


def recall_at_k(orig_ND: Tensor, recon_ND: Tensor, k: int = 10, max_elements: int = DEFAULT_MAX_ELEMENTS) -> float:
    """Mean over documents of |NN_k(original) ∩ NN_k(reconstruction)| / k."""
    return float(recall_per_query(orig_ND, recon_ND, k, max_elements).mean())


def retrieval_metrics(orig_ND: Tensor, recon_ND: Tensor, k: int = 10,
                      max_elements: int = DEFAULT_MAX_ELEMENTS, units_N: Tensor | None = None,
                      resamples: int = 0, seed: int = 0) -> dict:
    """`recall_at_k` (k clipped to N-1, reported as `k`) and the mean cosine between each embedding and
    its reconstruction. With `resamples`, a `ci95` of recall@k bootstrapped over the query documents
    (`units_N` groups queries of one document; each row its own unit otherwise). The interval is
    conditional on the corpus searched: it says how much the figure depends on which queries were asked."""
    n = orig_ND.shape[0]
    k_eff = min(k, n - 1)
    cos = (_unit(orig_ND).double() * _unit(recon_ND).double()).sum(-1)
    per_q = recall_per_query(orig_ND, recon_ND, k_eff, max_elements) if k_eff >= 1 else None
    out = {
        "n_docs": int(n),
        "k": int(k_eff),
        "recall_at_k": float(per_q.mean()) if per_q is not None else None,
        "cosine_mean": float(cos.mean()) if n else None,
    }
    if per_q is not None and resamples > 0 and n >= 2:
        units = torch.arange(n) if units_N is None else torch.unique(units_N, return_inverse=True)[1]
        g = int(units.max()) + 1
        hits_G = torch.zeros(g, dtype=torch.float64).index_add_(0, units, per_q)
        n_G = torch.zeros(g, dtype=torch.float64).index_add_(0, units, torch.ones(n, dtype=torch.float64))
        boot = Bootstrap(g, resamples, seed)
        out["ci95"] = {"recall_at_k": boot.ratio_ci(hits_G, n_G)}
    return out


def ndcg_per_query(orig_ND: Tensor, recon_ND: Tensor, k: int = 10,
                   max_elements: int = DEFAULT_MAX_ELEMENTS) -> Tensor:
    """nDCG@k of the reconstruction's ranking, `[N]`: a neighbour found at rank i (0-based) earns
    1/log2(i+2) when it is among the original embedding's k nearest; divided by the ideal sum. Unlike
    recall@k it rewards finding the true neighbours early."""
    if orig_ND.shape[0] != recon_ND.shape[0] or orig_ND.ndim != 2 or recon_ND.ndim != 2:
        raise ShapeMismatchError(f"ndcg_at_k: expected two [N, *] tensors with one row count, "
                                 f"found {tuple(orig_ND.shape)} and {tuple(recon_ND.shape)}")
    nn_a = nearest_neighbours(orig_ND, k, max_elements)
    nn_b = nearest_neighbours(recon_ND, k, max_elements)
    disc_K = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2)
    rel_NK = (nn_b[:, :, None] == nn_a[:, None, :]).any(-1).double()
    return (rel_NK * disc_K).sum(-1) / disc_K.sum()


def ndcg_at_k(orig_ND: Tensor, recon_ND: Tensor, k: int = 10) -> float:
    """Mean over documents of `ndcg_per_query` (1.0 when the ranking's first k are the true k, in any order)."""
    return float(ndcg_per_query(orig_ND, recon_ND, k).mean())
