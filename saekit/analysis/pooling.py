"""One example per document: pooling a store's token rows into document rows for probing.

Why: a document label is a property of the document, not of each token; probing tokens against their
document's label asks most rows for a signal they do not carry (SAEBench pools too). Split from
`probing.py`; pure functions over dense arrays or scipy sparse matrices.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from saekit.errors import ConfigError

POOLINGS = ("mean", "max", "last", "token")


def document_units(doc_ids_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique doc ids `[G]`, the unit index of each row `[N]`)."""
    return np.unique(doc_ids_N, return_inverse=True)


def pool_features(X, unit_N: np.ndarray, pos_N: np.ndarray, pooling: str):
    """One row per document: the mean, max or last-token row of its rows (`[G, F]`; sparse stays sparse).

    Why: a document label is a property of the document, not of each token; probing tokens against
    their document's label asks most rows for a signal they do not carry (SAEBench pools too)."""
    g = int(unit_N.max()) + 1 if len(unit_N) else 0
    n = len(unit_N)
    if pooling == "mean":
        counts = np.bincount(unit_N, minlength=g).astype(np.float64)
        P = sp.csr_matrix((1.0 / counts[unit_N], (unit_N, np.arange(n))), shape=(g, n))
        out = P @ X
        return out.tocsr() if sp.issparse(out) else np.asarray(out, dtype=np.float32)
    if pooling == "last":
        order = np.lexsort((pos_N, unit_N))  # by unit, then position: the last of each unit is its last token
        last = order[np.r_[np.flatnonzero(np.diff(unit_N[order])), n - 1]]
        return X[last]
    if pooling == "max":
        return _max_pool_sparse(X, unit_N, g) if sp.issparse(X) else _max_pool_dense(X, unit_N, g)
    raise ConfigError(f"probe: unknown pooling '{pooling}'; expected one of {POOLINGS}")


def _max_pool_dense(X_NF: np.ndarray, unit_N: np.ndarray, g: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(X_NF, dtype=np.float32))
    out = torch.full((g, t.shape[1]), -float("inf"))
    idx = torch.from_numpy(unit_N).long()[:, None].expand_as(t)
    return out.scatter_reduce(0, idx, t, reduce="amax").numpy()


def _max_pool_sparse(X, unit_N: np.ndarray, g: int) -> sp.csr_matrix:
    """Max over each document's rows of a sparse matrix; the implicit zeros take part."""
    coo = X.tocoo()
    f = X.shape[1]
    keys = unit_N[coo.row].astype(np.int64) * f + coo.col
    uniq, inv = np.unique(keys, return_inverse=True)
    vals = np.full(len(uniq), -np.inf)
    np.maximum.at(vals, inv, coo.data)
    firing = np.bincount(inv, minlength=len(uniq))
    rows_per_unit = np.bincount(unit_N, minlength=g)
    u, c = uniq // f, uniq % f
    vals = np.where(firing < rows_per_unit[u], np.maximum(vals, 0.0), vals)
    return sp.csr_matrix((vals, (u, c)), shape=(g, f))


def sample_documents(doc_ids_N: np.ndarray, max_rows: int | None, seed: int) -> np.ndarray:
    """Rows of whole documents (seeded order) until `max_rows` rows are reached; all rows when None."""
    if max_rows is not None and max_rows < 0:
        raise ConfigError(f"probe: expected max_rows >= 0 (0 or None = all rows), found {max_rows}")
    n = len(doc_ids_N)
    if not max_rows or max_rows >= n:
        return np.arange(n)
    uniq, inv, counts = np.unique(doc_ids_N, return_inverse=True, return_counts=True)
    perm = np.random.default_rng(seed).permutation(len(uniq))
    take = perm[: int(np.searchsorted(np.cumsum(counts[perm]), max_rows)) + 1]
    return np.flatnonzero(np.isin(inv, take))
