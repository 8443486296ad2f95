"""Sparse retrieval from an embedding SAE's codes: an inverted index over the latents.

    index = SparseIndex.from_store(sae, store)                 # encode every document once
    hits = index.search(sae.encode(query_1D))                  # [(row, score)], best first
    hits = index.search(code, top_n=10, rerank=100)            # re-rank 100 candidates with dense cosines
    result = index.steered_search(sae, query_D, [FeatureEdit(7, "add", alpha=0.5)])

Why an inverted index: a top-k code touches k of d_sae latents, so the score of a document against a
query, `<z_query, z_doc>`, only needs the postings (documents where a latent fires) of the query's k
active latents. With d_sae latents each firing on about N·k/d_sae documents, a query costs about
2·k²·N/d_sae multiply-adds instead of the 2·N·d of a dense matrix-vector search (plus the query's own
encoding, 2·d·d_sae for an encoder-matrix SAE). The postings are one CSR matrix `[d_sae, N]` (row f:
documents where latent f fires, with its value); a query gathers the postings of its active latents in
one vectorised step and scatter-adds the products into a score vector. No Python loop per latent.

The ranking is exactly the sparse dot product's (tests compare it with the brute-force dense-code
product). `truncate(k)` keeps each document's k largest values (the top-k code of a top-k SAE at a
smaller k), which gives the FLOPs/quality sweep of `pareto_sweep` without retraining.
This module sits at the analysis layer: it imports the SAE and the store, never eval or run.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saekit.analysis.steering import FeatureEdit, edit_dense_code
from saekit.errors import ConfigError, ShapeMismatchError
from saekit.sae.base import SparseAutoencoder, SparseCode, inference_mode


def _unit(M_ND: Tensor) -> Tensor:
    return M_ND / M_ND.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def truncate_code(indices_NK: Tensor, values_NK: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's k largest values (and their latents); rows with fewer active latents keep theirs."""
    if k <= 0:
        raise ConfigError(f"truncate_code: expected k >= 1, found {k}")
    if k >= values_NK.shape[-1]:
        return indices_NK, values_NK
    top_NK = values_NK.topk(k, dim=-1)
    return indices_NK.gather(-1, top_NK.indices), top_NK.values


@dataclass
class SparseIndex:
    """Postings of every latent: `postings` is a CSR tensor `[d_sae, n_docs]` (row f: the documents
    where latent f fires, with its value). `dense_unit_ND` (optional) holds the documents' unit-norm
    dense vectors for re-ranking."""

    postings: Tensor
    dense_unit_ND: Tensor | None = None

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, indices_NK: Tensor, values_NK: Tensor, d_sae: int,
                   dense_ND: Tensor | None = None, normalize: bool = False) -> "SparseIndex":
        """The index of N documents' codes (zero values are inactive slots and are left out). With
        `normalize` each document's code is scaled to unit norm, so scores rank by cosine of codes."""
        if indices_NK.shape != values_NK.shape or indices_NK.dim() != 2:
            raise ShapeMismatchError(f"SparseIndex: expected indices and values [N, k] of one shape, found "
                                     f"{tuple(indices_NK.shape)} and {tuple(values_NK.shape)}")
        n = indices_NK.shape[0]
        if normalize:
            values_NK = values_NK / values_NK.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if dense_ND is not None and dense_ND.shape[0] != n:
            raise ShapeMismatchError(f"SparseIndex: expected {n} dense rows for re-ranking, found {dense_ND.shape[0]}")
        doc_M = torch.arange(n).repeat_interleave(indices_NK.shape[1])
        lat_M, val_M = indices_NK.reshape(-1).long(), values_NK.reshape(-1)
        keep = val_M != 0
        lat_M, val_M, doc_M = lat_M[keep], val_M[keep], doc_M[keep]
        order = torch.argsort(lat_M * n + doc_M)  # by latent, then document
        crow = torch.zeros(d_sae + 1, dtype=torch.long)
        crow[1:] = torch.bincount(lat_M, minlength=d_sae).cumsum(0)
        with warnings.catch_warnings():  # "CSR support is in beta": the four calls used here are stable
            warnings.simplefilter("ignore", UserWarning)
            postings = torch.sparse_csr_tensor(crow, doc_M[order], val_M[order], size=(d_sae, n),
                                               check_invariants=True)
        return cls(postings, None if dense_ND is None else _unit(dense_ND.float()))

    @classmethod
    def from_store(cls, sae: SparseAutoencoder, store, chunk_rows: int = 8192, keep_dense: bool = True,
                   k: int | None = None, normalize: bool = True) -> "SparseIndex":
        """Encode every row of an (embedding) store with the SAE and index the codes."""
        if store.d_in != sae.cfg.d_in:
            raise ShapeMismatchError(f"SparseIndex.from_store: expected a store with d_in={sae.cfg.d_in} "
                                     f"(the SAE's), found {store.d_in}")
        idx, val, dense = [], [], []
        with inference_mode(sae):
            for _, x_ND in tqdm(store.iter_chunks(chunk_rows), total=math.ceil(len(store) / chunk_rows),
                                desc="encoding for the index", leave=False):
                code = sae.encode(x_ND)
                i, v = code.indices, code.values
                if k is not None:
                    i, v = truncate_code(i, v, k)
                idx.append(i.cpu())
                val.append(v.float().cpu())
                dense.append(x_ND) if keep_dense else None
        return cls.from_codes(torch.cat(idx), torch.cat(val), sae.cfg.d_sae, torch.cat(dense) if keep_dense else None,
                              normalize=normalize)

    # -- shape -----------------------------------------------------------------------------------
    @property
    def d_sae(self) -> int:
        return int(self.postings.shape[0])

    @property
    def n_docs(self) -> int:
        return int(self.postings.shape[1])

    @property
    def nnz(self) -> int:
        return int(self.postings.values().numel())

    def truncate(self, k: int, normalize: bool = True) -> "SparseIndex":
        """The index of each document's k largest code values (re-normalised to unit norm by default)."""
        i, v = self.codes()
        ti, tv = truncate_code(i, v, k)
        out = SparseIndex.from_codes(ti, tv, self.d_sae, normalize=normalize)
        out.dense_unit_ND = self.dense_unit_ND
        return out

    def codes(self) -> tuple[Tensor, Tensor]:
        """The indexed codes back as `(indices [N, k], values [N, k])` (padded with zeros)."""
        csc = self.postings.to_sparse_coo().coalesce()
        lat, doc = csc.indices()
        vals = csc.values()
        n = self.n_docs
        counts = torch.bincount(doc, minlength=n)
        k = max(1, int(counts.max())) if counts.numel() else 1
        order = torch.argsort(doc * self.d_sae + lat)
        doc, lat, vals = doc[order], lat[order], vals[order]
        slot = torch.arange(doc.numel()) - (counts.cumsum(0) - counts)[doc]
        idx_NK = torch.zeros(n, k, dtype=torch.long)
        val_NK = torch.zeros(n, k, dtype=vals.dtype)
        idx_NK[doc, slot], val_NK[doc, slot] = lat, vals
        return idx_NK, val_NK

    # -- querying ----------------------------------------------------------------------------------
    def gather(self, q_indices_K: Tensor, q_values_K: Tensor) -> tuple[Tensor, Tensor]:
        """(documents [P], products [P]) of the query's active latents' postings, P postings in all."""
        crow, col, val = self.postings.crow_indices(), self.postings.col_indices(), self.postings.values()
        active = q_values_K != 0
        lat_A, qv_A = q_indices_K[active].long(), q_values_K[active].to(val.dtype)
        start_A, len_A = crow[lat_A], crow[lat_A + 1] - crow[lat_A]
        total = int(len_A.sum())
        owner_P = torch.repeat_interleave(torch.arange(lat_A.numel()), len_A, output_size=total)
        offset_P = torch.arange(total) - (len_A.cumsum(0) - len_A)[owner_P]
        pos_P = start_A[owner_P] + offset_P
        return col[pos_P], val[pos_P] * qv_A[owner_P]

    def scores(self, q_indices_K: Tensor, q_values_K: Tensor) -> tuple[Tensor, int]:
        """(score per document [N], postings touched): the sparse dot product with every document."""
        doc_P, prod_P = self.gather(q_indices_K.reshape(-1), q_values_K.reshape(-1))
        return torch.zeros(self.n_docs, dtype=prod_P.dtype).index_add_(0, doc_P, prod_P), int(doc_P.numel())

    def search(self, code: SparseCode | tuple[Tensor, Tensor], top_n: int = 10, rerank: int = 0,
               query_D: Tensor | None = None, exclude: int | None = None) -> list[tuple[int, float]]:
        """The top_n documents by sparse dot product; with `rerank` > 0, the best `rerank` candidates
        are re-ordered by cosine with the dense query `query_D` (needs the index's dense vectors).
        `exclude` leaves one document out (a query that is itself indexed)."""
        i, v = (code.indices, code.values) if isinstance(code, SparseCode) else code
        s_N, _ = self.scores(i, v)
        if exclude is not None:
            s_N[exclude] = -math.inf
        if rerank:
            return self._rerank(s_N, rerank, top_n, query_D, exclude)
        top = s_N.topk(min(top_n, self.n_docs))
        return [(int(r), float(s)) for s, r in zip(top.values, top.indices)]

    def _rerank(self, s_N: Tensor, rerank: int, top_n: int, query_D: Tensor | None,
                exclude: int | None) -> list[tuple[int, float]]:
        if self.dense_unit_ND is None or query_D is None:
            raise ConfigError("SparseIndex.search: re-ranking needs the index's dense vectors and the dense query "
                              "(build with keep_dense=True, pass query_D=)")
        cand = s_N.topk(min(max(rerank, top_n), self.n_docs)).indices
        if exclude is not None:
            cand = cand[cand != exclude]
        cos = self.dense_unit_ND[cand] @ _unit(query_D.reshape(-1).float())
        top = cos.topk(min(top_n, cos.numel()))
        return [(int(cand[r]), float(s)) for s, r in zip(top.values, top.indices)]

    @torch.no_grad()
    def steered_search(self, sae: SparseAutoencoder, query_D: Tensor, edits: Sequence[FeatureEdit],
                       top_n: int = 10) -> dict:
        """The query's code edited (`add`: code[f] += alpha; clamp/ablate: set) and searched on the index:
        {"before", "after": [(row, score)], "entered", "left": rows that entered/left the top n}."""
        edits = [e if isinstance(e, FeatureEdit) else FeatureEdit(**e) for e in edits]
        bad = [e.feature for e in edits if e.feature >= self.d_sae]
        if bad:
            raise ConfigError(f"steered_search: expected features < d_sae={self.d_sae}, found {bad}")
        with inference_mode(sae):
            z_F = sae.encode(query_D.reshape(1, -1).float())
            z_F = z_F.dense()[0].cpu()
        z_edit_F = edit_dense_code(z_F, edits)
        before = self.search(_nonzero(z_F), top_n)
        after = self.search(_nonzero(z_edit_F), top_n)
        b, a = {r for r, _ in before}, {r for r, _ in after}
        return {"before": before, "after": after, "entered": [r for r, _ in after if r not in b],
                "left": [r for r, _ in before if r not in a]}


def _nonzero(z_F: Tensor) -> tuple[Tensor, Tensor]:
    idx = z_F.nonzero().reshape(-1)
    return idx, z_F[idx]


# -- quality against exact dense search ------------------------------------------------------------


def recall_ndcg(found: Sequence[int], truth: Sequence[int]) -> tuple[float, float]:
    """recall@n (share of the exact top n found) and nDCG@n with the exact top n as relevant (binary)."""
    truth_set = set(truth)
    n = len(truth)
    hits = [1.0 if r in truth_set else 0.0 for r in found[:n]]
    dcg = sum(h / math.log2(i + 2) for i, h in enumerate(hits))
    ideal = sum(1.0 / math.log2(i + 2) for i in range(n))
    return sum(hits) / n, dcg / ideal


def dense_top(corpus_unit_ND: Tensor, query_D: Tensor, top_n: int, exclude: int | None = None) -> list[int]:
    """The exact top_n documents by cosine (one matrix-vector product)."""
    s_N = corpus_unit_ND @ _unit(query_D.reshape(-1))
    if exclude is not None:
        s_N[exclude] = -math.inf
    return s_N.topk(top_n).indices.tolist()


@dataclass
class SweepPoint:
    """One (k, re-rank) setting: per-query recall and nDCG, FLOPs and seconds per query. The seconds are
    the index search alone (query codes computed beforehand) and the dense reference's matrix-vector
    search; scripts/bench_retrieval.py times the whole path, query encoding included."""

    k: int
    rerank: int
    recall_Q: list[float]
    ndcg_Q: list[float]
    flops_per_query: float
    seconds_per_query: float
    dense_seconds_per_query: float

    def summary(self) -> dict:
        q = len(self.recall_Q)
        return {"k": self.k, "rerank": self.rerank, "queries": q, "recall@10": sum(self.recall_Q) / q,
                "ndcg@10": sum(self.ndcg_Q) / q, "flops_per_query": self.flops_per_query,
                "seconds_per_query": self.seconds_per_query, "dense_seconds_per_query": self.dense_seconds_per_query}


def encoder_flops(sae: SparseAutoencoder) -> int:
    """Multiply-adds x2 of encoding one query: an encoder-matrix SAE's `x @ W_enc`."""
    return 2 * sae.cfg.d_in * sae.cfg.d_sae


@torch.no_grad()
def pareto_sweep(index: SparseIndex, sae: SparseAutoencoder, query_rows: Sequence[int], ks: Sequence[int],
                 reranks: Sequence[int] = (0,), top_n: int = 10) -> list[SweepPoint]:
    """Recall@top_n / nDCG@top_n of the sparse index against exact dense cosine search, for each k
    (documents and query truncated to their k largest values) and re-rank depth; queries are indexed
    documents themselves (left out of both rankings). FLOPs per query: the query's encoding, 2 per
    posting touched, and 2·d per re-ranked candidate; the dense reference costs 2·N·d."""
    if index.dense_unit_ND is None:
        raise ConfigError("pareto_sweep: the index needs its dense vectors (keep_dense=True)")
    corpus = index.dense_unit_ND
    rows = list(query_rows)
    q_ND = corpus[rows]
    with inference_mode(sae):
        code = sae.encode(q_ND)
    qi, qv = code.indices.cpu(), code.values.float().cpu()
    truth, t_dense = _dense_truth(corpus, rows, top_n)
    out = []
    for k in ks:
        sub = index.truncate(k)
        ti, tv = truncate_code(qi, qv, k)
        for rr in reranks:
            out.append(_sweep_point(sub, sae, rows, ti, tv, q_ND, truth, t_dense, k, rr, top_n))
    return out


def _dense_truth(corpus: Tensor, rows: list[int], top_n: int) -> tuple[list[list[int]], float]:
    t0 = time.perf_counter()
    truth = [dense_top(corpus, corpus[r], top_n, exclude=r) for r in rows]
    return truth, (time.perf_counter() - t0) / max(1, len(rows))


def _sweep_point(sub: SparseIndex, sae, rows, ti, tv, q_ND, truth, t_dense, k, rr, top_n) -> SweepPoint:
    t0 = time.perf_counter()
    found = [sub.search((ti[j], tv[j]), top_n, rerank=rr, query_D=q_ND[j], exclude=r) for j, r in enumerate(rows)]
    secs = (time.perf_counter() - t0) / max(1, len(rows))
    crow = sub.postings.crow_indices()
    postings = int(((crow[ti + 1] - crow[ti]) * (tv != 0)).sum())
    rec, nd = zip(*[recall_ndcg([h for h, _ in hits], truth[j]) for j, hits in enumerate(found)])
    d = q_ND.shape[1]
    flops = encoder_flops(sae) + 2 * postings / max(1, len(rows)) + (2 * d * rr if rr else 0)
    return SweepPoint(k, rr, list(rec), list(nd), flops, secs, t_dense)
