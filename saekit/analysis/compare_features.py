"""Cross-run feature comparison: which latents of SAE A have a twin in SAE B, and how alike the two
feature spaces are ("SAEs reveal universal feature spaces across LLMs", Lan et al.).

    a, b = Side(sae_a, store_a, "l9"), Side(sae_b, store_b, "l15")
    result = compare_features(a, b)                 # alignment, matching, share matched, SVCCA, CKA
    result.summary()["share_matched"], result.pairs[:10]

Why this shape:
* The two runs must see the same inputs. Stores cut by the same tokenizer are aligned row by row on
  (doc_id, position) ("token" level); different tokenisers or modalities (an LLM store vs an embedding
  store) are compared per document, each side's codes mean-pooled over the document's rows
  ("document" level). Documents are matched by doc_id and their texts must agree.
* Latents are matched by the Pearson correlation of their activations over the aligned rows:
  a one-to-one assignment (Hungarian, `scipy.optimize.linear_sum_assignment`; mutual nearest
  neighbours when scipy is missing). A latent that never fires on the aligned rows has no match.
* Matched spaces are compared with SVCCA and linear CKA. Both are invariant to rotations, so the
  baseline is the same statistic after shuffling B's rows against A's (alignment destroyed): a
  similarity is only meaningful well above it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saekit.errors import ConfigError, SaekitError
from saekit.sae.base import SparseAutoencoder, inference_mode

log = logging.getLogger(__name__)


@dataclass
class Side:
    """One run of the comparison: its SAE, the store of the SAE's hook, a label for tables."""

    sae: SparseAutoencoder
    store: object
    label: str


# -- alignment ---------------------------------------------------------------------------------------


def same_tokenisation(store_a, store_b) -> bool:
    """Whether rows can be matched on (doc_id, position): both token-level stores from one tokenizer."""
    if store_a.kind == "embedding" or store_b.kind == "embedding":
        return False
    sa, sb = store_a.manifest.source, store_b.manifest.source
    ha, hb = sa.get("tokenizer_hash"), sb.get("tokenizer_hash")
    same_tok = ha == hb if ha and hb else sa.get("model") == sb.get("model")
    return bool(same_tok and sa.get("prepend_bos") == sb.get("prepend_bos"))


def _keep_rows(store, exclude_outliers: bool) -> np.ndarray:
    keep = np.ones(len(store), dtype=bool)
    if exclude_outliers and store.kind != "embedding":
        keep &= ~store.outlier_mask().numpy()
    return keep


def token_alignment(store_a, store_b, exclude_outliers: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(rows of A, rows of B) holding the same (doc_id, position), in one order."""
    def keys(store):
        doc, pos = store.meta("doc_id").numpy().astype(np.int64), store.meta("pos").numpy().astype(np.int64)
        k = doc * (1 << 20) + pos
        k[~_keep_rows(store, exclude_outliers)] = -1  # never shared: outliers of either side drop out
        return k
    ka, kb = keys(store_a), keys(store_b)
    _, ra, rb = np.intersect1d(ka[ka >= 0], kb[kb >= 0], assume_unique=True, return_indices=True)
    return np.flatnonzero(ka >= 0)[ra], np.flatnonzero(kb >= 0)[rb]


def shared_documents(store_a, store_b) -> np.ndarray:
    """doc_ids both stores hold, refused (ConfigError) when a shared doc_id has different texts."""
    da, db = store_a.docs, store_b.docs
    shared = np.array(sorted(set(da) & set(db)), dtype=np.int64)
    differ = [d for d in shared[:2000] if da[int(d)].get("text") != db[int(d)].get("text")]
    if differ:
        raise ConfigError(f"compare: expected stores over the same documents, found doc_id {differ[0]} with "
                          f"different texts ({len(differ)} of the first {min(len(shared), 2000)} shared ids differ)")
    return shared


# -- codes on the aligned rows --------------------------------------------------------------------------


def token_codes(side: Side, rows: np.ndarray, chunk: int = 8192) -> Tensor:
    """Dense codes `[M, d_sae]` of the given store rows, in their order."""
    out = torch.zeros(len(rows), side.sae.cfg.d_sae)
    with inference_mode(side.sae):
        for lo in tqdm(range(0, len(rows), chunk), desc=f"encoding {side.label}", leave=False):
            x_ND = side.store.gather("acts", rows[lo:lo + chunk])
            out[lo:lo + chunk] = side.sae.encode(x_ND).dense().float().cpu()
    return out


def pooled_codes(side: Side, doc_ids: np.ndarray, exclude_outliers: bool = True, chunk: int = 8192) -> Tensor:
    """Mean code over each document's rows, `[len(doc_ids), d_sae]` (a document-level store: its one row)."""
    doc_N = side.store.meta("doc_id").numpy().astype(np.int64)
    slot_of = {int(d): i for i, d in enumerate(doc_ids)}
    slot_N = np.array([slot_of.get(int(d), -1) for d in doc_N])
    rows = np.flatnonzero((slot_N >= 0) & _keep_rows(side.store, exclude_outliers))
    sums = torch.zeros(len(doc_ids), side.sae.cfg.d_sae)
    counts = torch.zeros(len(doc_ids))
    with inference_mode(side.sae):
        for lo in tqdm(range(0, len(rows), chunk), desc=f"encoding {side.label}", leave=False):
            r = rows[lo:lo + chunk]
            slot = torch.from_numpy(slot_N[r])
            sums.index_add_(0, slot, side.sae.encode(side.store.gather("acts", r)).dense().float().cpu())
            counts.index_add_(0, slot, torch.ones(len(r)))
    return sums / counts.clamp_min(1)[:, None]


# -- statistics ---------------------------------------------------------------------------------------


def correlation_matrix(Za_MF: Tensor, Zb_MG: Tensor) -> Tensor:
    """Pearson correlation of every A latent with every B latent over the M aligned rows, `[F, G]`;
    0 for a latent that is constant (never fires) on them."""
    def standardise(Z):
        Zc = Z.double() - Z.double().mean(0)
        sd = Zc.norm(dim=0)
        return Zc / torch.where(sd > 0, sd, torch.ones_like(sd))
    return (standardise(Za_MF).T @ standardise(Zb_MG)).float()


def match_latents(C_FG: Tensor, alive_a: Tensor, alive_b: Tensor, method: str = "hungarian") -> tuple[Tensor, Tensor]:
    """One-to-one pairs (a_P, b_P) of live latents maximising total correlation ("hungarian"), or the
    mutual nearest neighbours ("mnn", also the fallback without scipy)."""
    ia, ib = alive_a.nonzero().reshape(-1), alive_b.nonzero().reshape(-1)
    if ia.numel() == 0 or ib.numel() == 0:
        raise SaekitError("compare: expected latents that fire on the aligned rows in both SAEs, found none")
    sub = C_FG[ia][:, ib]
    if method == "hungarian":
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError:
            log.warning("scipy is not installed: matching latents by mutual nearest neighbours instead")
            method = "mnn"
    if method == "hungarian":
        ra, rb = linear_sum_assignment(sub.double().numpy(), maximize=True)
        ra, rb = torch.from_numpy(ra), torch.from_numpy(rb)
    elif method == "mnn":
        best_b, best_a = sub.argmax(1), sub.argmax(0)
        ra = (best_a[best_b] == torch.arange(sub.shape[0])).nonzero().reshape(-1)
        rb = best_b[ra]
    else:
        raise ConfigError(f"compare: expected method 'hungarian' or 'mnn', found {method!r}")
    return ia[ra], ib[rb]


def _centre(X: Tensor) -> Tensor:
    X = X.float()
    return X - X.mean(0)


def linear_cka(X_MA: Tensor, Y_MB: Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019): ||Xcᵀ Yc||²_F / (||Xcᵀ Xc||_F ||Ycᵀ Yc||_F), 1 for spaces that
    differ by a rotation and isotropic scaling."""
    Xc, Yc = _centre(X_MA), _centre(Y_MB)
    return _cka_from(Xc, Yc, (Xc.T @ Xc).norm(), (Yc.T @ Yc).norm())


def _cka_from(Xc: Tensor, Yc: Tensor, nx: Tensor, ny: Tensor) -> float:
    den = float(nx * ny)
    return float((Xc.T @ Yc).norm() ** 2) / den if den > 0 else 0.0


def top_subspace(X: Tensor, keep_var: float = 0.99, max_dims: int = 256) -> Tensor:
    """Orthonormal basis `[M, r]` of the centred rows' top singular directions holding `keep_var` of the
    variance (at most `max_dims`). Through the eigenvectors of the small Gram matrix `Xcᵀ Xc` (one
    matrix product over the M rows instead of a full SVD), re-orthonormalised by QR."""
    Xc = _centre(X)
    vals, vecs = torch.linalg.eigh((Xc.T @ Xc).double())
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    if vals.sum() <= 0:
        return Xc[:, :0]
    n = int((vals.cumsum(0) / vals.sum() < keep_var).sum()) + 1
    r = min(n, max_dims, int((vals > vals[0] * 1e-10).sum()))
    return torch.linalg.qr(Xc @ vecs[:, :r].float()).Q


def _cca_mean(Ux: Tensor, Uy: Tensor) -> float:
    if Ux.shape[1] == 0 or Uy.shape[1] == 0:
        return 0.0
    return float(torch.linalg.svdvals(Ux.T @ Uy).clamp(0, 1).mean())


def svcca(X_MA: Tensor, Y_MB: Tensor, keep_var: float = 0.99, max_dims: int = 256) -> float:
    """SVCCA (Raghu et al. 2017): each side reduced to the top singular directions holding `keep_var` of
    its variance (at most `max_dims`), then the mean canonical correlation of the two subspaces."""
    return _cca_mean(top_subspace(X_MA, keep_var, max_dims), top_subspace(Y_MB, keep_var, max_dims))


def similarity_with_baseline(X: Tensor, Y: Tensor, n_perm: int = 3, seed: int = 0, max_dims: int = 256) -> dict:
    """SVCCA and CKA of (X, Y), and the same with Y's rows shuffled (mean of n_perm shuffles). Each side's
    subspace and Gram norm is computed once: shuffling rows permutes the rows of Y's basis alike."""
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(Y.shape[0], generator=g) for _ in range(n_perm)]
    Ux, Uy = top_subspace(X, max_dims=max_dims), top_subspace(Y, max_dims=max_dims)
    Xc, Yc = _centre(X), _centre(Y)
    nx, ny = (Xc.T @ Xc).norm(), (Yc.T @ Yc).norm()
    return {"svcca": _cca_mean(Ux, Uy), "cka": _cka_from(Xc, Yc, nx, ny),
            "svcca_permuted": float(np.mean([_cca_mean(Ux, Uy[p]) for p in perms])),
            "cka_permuted": float(np.mean([_cka_from(Xc, Yc[p], nx, ny) for p in perms]))}


# -- the comparison ------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """What `compare_features` measured. `pairs`: [(a, b, correlation)] best first."""

    level: str
    n_aligned: int
    alive_a: int
    alive_b: int
    threshold: float
    method: str
    pairs: list[tuple[int, int, float]]
    similarity: dict
    similarity_on: str
    mean_max_corr_a: float
    examples: dict = field(default_factory=dict)
    labels: tuple[str, str] = ("A", "B")

    def summary(self) -> dict:
        above = sum(1 for _, _, c in self.pairs if c >= self.threshold)
        return {"a": self.labels[0], "b": self.labels[1], "level": self.level, "aligned_rows": self.n_aligned,
                "alive_a": self.alive_a, "alive_b": self.alive_b, "method": self.method,
                "threshold": self.threshold, "matched_above_threshold": above,
                "share_matched": above / max(1, self.alive_a), "mean_matched_corr":
                    float(np.mean([c for _, _, c in self.pairs])) if self.pairs else 0.0,
                "mean_max_corr_a": self.mean_max_corr_a, "similarity_on": self.similarity_on, **self.similarity}

    def twins(self) -> dict[int, tuple[int, float]]:
        """A latent -> (its twin in B, correlation)."""
        return {a: (b, c) for a, b, c in self.pairs}


def aligned_codes(a: Side, b: Side, level: str = "auto", exclude_outliers: bool = True,
                  max_rows: int | None = None, seed: int = 0) -> tuple[str, Tensor, Tensor, dict]:
    """(level, codes of A `[M, F]`, codes of B `[M, G]`, where: {"rows_a", "rows_b"} or {"doc_ids"})."""
    if level == "auto":
        level = "token" if same_tokenisation(a.store, b.store) else "document"
    if level == "token":
        if not same_tokenisation(a.store, b.store):
            raise ConfigError("compare: token-level alignment needs two token stores from one tokenizer; "
                              "use level='document'")
        ra, rb = token_alignment(a.store, b.store, exclude_outliers)
        if max_rows and len(ra) > max_rows:
            pick = np.sort(np.random.default_rng(seed).choice(len(ra), max_rows, replace=False))
            ra, rb = ra[pick], rb[pick]
        where = {"rows_a": ra, "rows_b": rb}
        Za, Zb = token_codes(a, ra), token_codes(b, rb)
    elif level == "document":
        docs = shared_documents(a.store, b.store)
        if max_rows and len(docs) > max_rows:
            docs = np.sort(np.random.default_rng(seed).choice(docs, max_rows, replace=False))
        where = {"doc_ids": docs}
        Za, Zb = pooled_codes(a, docs, exclude_outliers), pooled_codes(b, docs, exclude_outliers)
    else:
        raise ConfigError(f"compare: expected level 'auto', 'token' or 'document', found {level!r}")
    if Za.shape[0] < 3:
        raise SaekitError(f"compare: expected shared rows/documents in both stores, found {Za.shape[0]}")
    return level, Za, Zb, where


def compare_features(a: Side, b: Side, *, level: str = "auto", threshold: float = 0.5, method: str = "hungarian",
                     max_rows: int | None = 20000, n_perm: int = 3, top_pairs: int = 20, n_examples: int = 3,
                     decode: Callable[[list[int]], str] | None = None, seed: int = 0) -> Comparison:
    """Align the two runs' rows, match latents by activation correlation, compare the matched spaces.
    `decode` (token ids -> text, e.g. the tokenizer's) writes the examples' token contexts as text."""
    level, Za, Zb, where = aligned_codes(a, b, level, max_rows=max_rows, seed=seed)
    alive_a, alive_b = (Za != 0).any(0), (Zb != 0).any(0)
    C = correlation_matrix(Za, Zb)
    ia, ib = match_latents(C, alive_a, alive_b, method)
    corr = C[ia, ib]
    order = corr.argsort(descending=True)
    pairs = [(int(ia[i]), int(ib[i]), float(corr[i])) for i in order]
    good = corr >= threshold
    sel_a, sel_b, on = (ia[good], ib[good], "pairs above threshold") if int(good.sum()) >= 2 else (ia, ib, "all pairs")
    sim = similarity_with_baseline(Za[:, sel_a], Zb[:, sel_b], n_perm, seed)
    if on != "all pairs":  # pairs chosen by their correlation flatter SVCCA: the unselected figure beside it
        sim.update({f"{k}_all_pairs": v for k, v in similarity_with_baseline(Za[:, ia], Zb[:, ib], 1, seed).items()})
    mmc = float(C[alive_a].max(1).values.mean()) if bool(alive_a.any()) else 0.0
    ex = pair_examples(pairs[:top_pairs], Za, Zb, where, a, b, n_examples, decode)
    return Comparison(level, Za.shape[0], int(alive_a.sum()), int(alive_b.sum()), threshold, method, pairs,
                      sim, on, mmc, ex, (a.label, b.label))


def token_context(store, row: int, decode: Callable[[list[int]], str] | None, before: int = 6,
                  after: int = 2) -> str:
    """The tokens around a store row in its document, the row's own token in [[ ]] (ids as <id> without a
    decode function). A document's rows are contiguous in the store, in position order."""
    lo, hi = max(0, row - before), min(len(store), row + after + 1)
    rows = np.arange(lo, hi)
    doc_W = store.gather("doc_id", rows).numpy()
    tok_W = store.gather("token_id", rows).numpy()
    keep = doc_W == doc_W[row - lo]
    text = lambda ids: decode(ids) if decode else "".join(f"<{i}>" for i in ids)  # noqa: E731
    left = [int(t) for t, k in zip(tok_W[: row - lo], keep[: row - lo]) if k]
    right = [int(t) for t, k in zip(tok_W[row - lo + 1:], keep[row - lo + 1:]) if k]
    return f"{text(left)}[[{text([int(tok_W[row - lo])])}]]{text(right)}"


def _row_text(side: Side, where: dict, key: str, m: int, decode=None) -> dict:
    if "doc_ids" in where:
        d = int(where["doc_ids"][m])
        return {"doc_id": d, "text": side.store.docs.get(d, {}).get("text", "")[:160]}
    row = int(where[key][m])
    d = int(side.store.gather("doc_id", np.array([row]))[0])
    p = int(side.store.gather("pos", np.array([row]))[0])
    return {"doc_id": d, "pos": p, "text": side.store.docs.get(d, {}).get("text", "")[:160],
            "context": token_context(side.store, row, decode)}


def pair_examples(pairs: list, Za: Tensor, Zb: Tensor, where: dict, a: Side, b: Side, n: int,
                  decode: Callable[[list[int]], str] | None = None) -> dict:
    """For each pair: the aligned rows where A's latent fires most and where B's twin fires most (token
    level: with the tokens around the row, decoded by `decode` when given)."""
    out = {}
    for fa, fb, _ in pairs:
        top_a = Za[:, fa].topk(min(n, Za.shape[0])).indices.tolist()
        top_b = Zb[:, fb].topk(min(n, Zb.shape[0])).indices.tolist()
        out[f"{fa}-{fb}"] = {"a": [{**_row_text(a, where, "rows_a", m, decode), "value": float(Za[m, fa])}
                                   for m in top_a],
                             "b": [{**_row_text(b, where, "rows_b", m, decode), "value": float(Zb[m, fb])}
                                   for m in top_b]}
    return out
