"""Sparse probing (Gurnee et al., "Finding Neurons in a Haystack"): how few features predict a label?

    report = probe_sweep(store, "sentiment", sae=sae, ks=(1, 2, 5, 10, 20))
    paths = write_probe_report(report, "runs/x/probe")        # report.json + accuracy_vs_k.png

One API for token-level LLM stores (each row is a token; its label comes from its document's labels
or from a user function `fn(doc_id, pos, token_id, doc) -> label`) and document-level embedding
stores (one row per document). For each feature set — SAE latents (when an SAE is given) and raw
neurons, side by side — and each selection method, the k best features are chosen on the training
split only, a logistic probe is fitted on them, and test accuracy and F1 are reported for every k,
next to a dense probe on all dimensions.

Why these choices:
* Splits are by document (deterministic under `seed`, train/test ids disjoint and reported): tokens
  of one document are strongly correlated, and a row-level split would leak the label.
* Selection methods: `mean_diff` (absolute difference of class means, the paper's main heuristic),
  `l1` (order in which features enter an L1-regularised logistic path), and `density_norm` (the
  class-mean difference divided by the feature's standard deviation on the training rows; for a
  sparse latent that is about magnitude·sqrt(density), so a latent that fires almost everywhere
  with large values does not win just by its scale). Features firing on fewer than
  `MIN_FIRING_ROWS` training rows are not selected by `density_norm` (their ratio is noise).
* Labels are made binary: one class (`positive`) versus the rest. Default `positive`: True / 1 for
  boolean or 0/1 labels, otherwise the most frequent class (ties by name). The report says which.
* SAE codes stay sparse (scipy CSR) end to end, so d_sae can be wide without a dense
  `[rows, d_sae]` matrix; neurons are dense.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from saekit.errors import ConfigError, SaekitError, ShapeMismatchError
from saekit.sae.base import SparseAutoencoder, inference_mode
from saekit.analysis.pooling import (POOLINGS, document_units, pool_features,  # noqa: F401  (public names)
                                     sample_documents)
from saekit.analysis.probe_ranking import (METHODS, MIN_FIRING_ROWS, class_mean_diff, rank_features,  # noqa: F401
                                           selection_scores)
from saekit.analysis.probe_report import format_probe_table, probe_table, write_probe_report  # noqa: F401

log = logging.getLogger(__name__)

N_EXAMPLES = 5
SNIPPET_CHARS = 200


class ArrayStore:
    """An in-memory stand-in for `ActivationStore` (tensors + docs), for probing arrays you already have."""

    def __init__(self, acts_ND: Tensor, doc_id_N: Tensor, docs: dict[int, dict], pos_N: Tensor | None = None,
                 token_id_N: Tensor | None = None, kind: str = "embedding"):
        n = acts_ND.shape[0]
        self.acts_ND = torch.as_tensor(acts_ND).float()
        fill = torch.full((n,), -1, dtype=torch.int64)
        self._meta = {"doc_id": torch.as_tensor(doc_id_N).long(),
                      "pos": fill if pos_N is None else torch.as_tensor(pos_N).long(),
                      "token_id": fill if token_id_N is None else torch.as_tensor(token_id_N).long()}
        if any(len(v) != n for v in self._meta.values()):
            raise ShapeMismatchError(f"ArrayStore: expected {n} doc ids / positions / token ids, found "
                                     f"{[len(v) for v in self._meta.values()]}")
        self.docs, self.kind, self.hook = docs, kind, "array"

    def __len__(self) -> int:
        return self.acts_ND.shape[0]

    @property
    def d_in(self) -> int:
        return self.acts_ND.shape[1]

    def __getitem__(self, idx) -> Tensor:
        return self.acts_ND[torch.as_tensor(idx)] if not isinstance(idx, slice) else self.acts_ND[idx]

    def meta(self, name: str) -> Tensor:
        return self._meta[name]


class _MetaCache:
    """Wraps a store so each provenance column is read from the shards once per sweep."""

    def __init__(self, store):
        self._store, self._cols = store, {}

    def __getattr__(self, name):
        return getattr(self._store, name)

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, idx) -> Tensor:
        return self._store[idx]

    def meta(self, name: str) -> Tensor:
        if name not in self._cols:
            self._cols[name] = self._store.meta(name)
        return self._cols[name]


# -- labels and splits (pure) ------------------------------------------------------------------------------


def sample_rows(n: int, max_rows: int | None, seed: int) -> np.ndarray:
    """All rows, or `max_rows` of them chosen by `seed` (sorted, so reads stay sequential)."""
    if max_rows is not None and max_rows < 0:
        raise ConfigError(f"probe: expected max_rows >= 0 (0 or None = all rows), found {max_rows}")
    if not max_rows or max_rows >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def row_labels(store, rows: np.ndarray, labels: str | Callable) -> list:
    """The label of each row: a document label by name, or `labels(doc_id, pos, token_id, doc)`."""
    doc_ids = store.meta("doc_id")[torch.from_numpy(rows)].tolist()
    if isinstance(labels, str):
        out = [(store.docs.get(int(d), {}).get("labels") or {}).get(labels) for d in doc_ids]
        if all(v is None for v in out):
            names = sorted({k for v in store.docs.values() for k in (v.get("labels") or {})})
            raise ConfigError(f"probe: expected a document label '{labels}'; the store's documents have {names}")
        return out
    pos = store.meta("pos")[torch.from_numpy(rows)].tolist()
    tok = store.meta("token_id")[torch.from_numpy(rows)].tolist()
    return [labels(int(d), int(p), int(t), store.docs.get(int(d), {})) for d, p, t in zip(doc_ids, pos, tok)]


def default_positive(values: Sequence) -> object:
    """True / 1 for boolean-like labels, otherwise the most frequent class (ties broken by name)."""
    uniq = set(values)
    if uniq <= {True, False} or uniq <= {0, 1}:
        return True if True in uniq or 1 in uniq else next(iter(uniq))
    counts = Counter(values)
    return sorted(counts, key=lambda c: (-counts[c], str(c)))[0]


def binarize(values: Sequence, positive=None) -> tuple[np.ndarray, object, dict]:
    """(y_N bool, the positive class, class counts): one-vs-rest for multi-class labels."""
    counts = Counter(values)
    if len(counts) < 2:
        raise SaekitError(f"probe: expected at least two label classes, found {dict(counts)}")
    positive = default_positive(values) if positive is None else positive
    if positive not in counts:
        raise ConfigError(f"probe: positive class '{positive}' not among the labels {sorted(map(str, counts))}")
    return np.array([v == positive for v in values]), positive, {str(k): int(v) for k, v in counts.items()}


def split_documents(doc_ids_N: np.ndarray, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_doc_ids, test_doc_ids), sorted and disjoint: a seeded permutation of the unique ids."""
    if not 0 < test_frac < 1:
        raise ConfigError(f"probe: expected 0 < test_frac < 1, found {test_frac}")
    uniq = np.unique(doc_ids_N)
    if len(uniq) < 2:
        raise SaekitError(f"probe: expected at least 2 documents to split, found {len(uniq)}")
    perm = np.random.default_rng(seed).permutation(uniq)
    n_test = min(len(uniq) - 1, max(1, int(round(test_frac * len(uniq)))))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# -- features ------------------------------------------------------------------------------------------------


def sae_codes(sae: SparseAutoencoder, acts_ND: Tensor, chunk: int = 4096) -> sp.csr_matrix:
    """The SAE's codes of `acts_ND` as a sparse `[N, d_sae]` matrix (never densified)."""
    p = next(sae.parameters())
    rows, cols, vals = [], [], []
    with inference_mode(sae):
        for lo in range(0, acts_ND.shape[0], chunk):
            code = sae.encode(acts_ND[lo: lo + chunk].to(p.device, p.dtype))
            idx, v = code.indices.cpu().long(), code.values.detach().float().cpu()
            keep = v != 0
            r = torch.arange(lo, lo + idx.shape[0])[:, None].expand_as(idx)
            rows.append(r[keep]), cols.append(idx[keep]), vals.append(v[keep])
    r, c, v = (torch.cat(t).numpy() for t in (rows, cols, vals))
    m = sp.coo_matrix((v, (r, c)), shape=(acts_ND.shape[0], sae.cfg.d_sae)).tocsr()
    m.sum_duplicates()
    return m


# -- probes ----------------------------------------------------------------------------------------------------


def fit_probe(X_train, y_train: np.ndarray, X_test, y_test: np.ndarray, C: float = 1.0,
              interval: Callable | None = None, test_units: np.ndarray | None = None) -> dict:
    """Logistic probe on standardised features (train statistics): test accuracy and F1 of the positive
    class, and (given an `interval(correct, units)` function) a ci95 of the accuracy over test documents."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import StandardScaler

    sparse = sp.issparse(X_train)
    scaler = StandardScaler(with_mean=not sparse).fit(X_train)
    clf = LogisticRegression(C=C, max_iter=2000).fit(scaler.transform(X_train), y_train)
    pred = clf.predict(scaler.transform(X_test))
    out = {"accuracy": float(accuracy_score(y_test, pred)), "f1": float(f1_score(y_test, pred, zero_division=0))}
    if interval is not None:
        correct = torch.from_numpy((pred == y_test).astype(np.float64))
        out["ci95"] = {"accuracy": interval(correct, None if test_units is None else torch.from_numpy(test_units))}
    return out


def _columns(X, feats: np.ndarray):
    sub = X[:, feats]
    return sub.toarray() if sp.issparse(sub) else sub


def _sweep_one(X, y: np.ndarray, train: np.ndarray, test: np.ndarray, method: str, ks: list[int],
               interval: Callable | None = None, units: np.ndarray | None = None) -> dict:
    order = rank_features(X[train], y[train], method, max(ks))
    diff = class_mean_diff(X[train], y[train])
    out = {}
    for k in ks:
        feats = order[:k]
        res = fit_probe(_columns(X[train], feats), y[train], _columns(X[test], feats), y[test], interval=interval,
                        test_units=None if units is None else units[test])
        out[str(k)] = {**res, "features": [int(f) for f in feats],
                       "signs": ["+" if diff[f] >= 0 else "-" for f in feats]}
    return out


# -- naming the k=1 winners ---------------------------------------------------------------------------------------


def top_examples(store, rows: np.ndarray, column: np.ndarray, labels: list, n: int = N_EXAMPLES,
                 tokenizer=None, token_level: bool = True) -> list[dict]:
    """The `n` rows where a feature is largest, with their document text (and token, for token stores)."""
    best = np.argsort(-column, kind="stable")[:n]
    doc_ids = store.meta("doc_id")[torch.from_numpy(rows[best])].tolist()
    pos = store.meta("pos")[torch.from_numpy(rows[best])].tolist()
    tok = store.meta("token_id")[torch.from_numpy(rows[best])].tolist()
    out = []
    for i, d, p, t in zip(best, doc_ids, pos, tok):
        ex = {"row": int(rows[i]), "doc_id": int(d), "activation": float(column[i]), "label": labels[i],
              "text": (store.docs.get(int(d), {}).get("text") or "")[:SNIPPET_CHARS]}
        if p >= 0 and token_level:
            ex.update(pos=int(p), token_id=int(t))
            if tokenizer is not None:
                ex["token"] = tokenizer.decode([int(t)])
        out.append(ex)
    return out


def _winner(store, X, rows, labels, res: dict, tokenizer, token_level: bool = True) -> dict:
    first = res[min(res, key=int)]
    f = first["features"][0]
    col = np.asarray(X[:, f].toarray()).ravel() if sp.issparse(X) else X[:, f]
    return {"feature": f, "sign": first["signs"][0], "accuracy": first["accuracy"], "f1": first["f1"],
            "ci95": first.get("ci95"),
            "top_examples": top_examples(store, rows, col, labels, tokenizer=tokenizer, token_level=token_level)}


# -- the sweep ----------------------------------------------------------------------------------------------------


def _load(store, rows: np.ndarray, chunk: int = 65536) -> Tensor:
    parts = [store[torch.from_numpy(rows[i: i + chunk])] for i in range(0, len(rows), chunk)]
    return torch.cat(parts).float() if parts else torch.zeros(0, store.d_in)


def _check_ks(ks: Sequence[int], n_features: dict[str, int]) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"probe: expected ks >= 1, found {ks}")
    limit = min(n_features.values())
    kept = [k for k in ks if k <= limit]
    if len(kept) < len(ks):
        log.warning("probe: dropping ks %s larger than the narrowest feature set (%d)", ks[len(kept):], limit)
    return kept


def resolve_pooling(store, labels: str | Callable, pooling: str | None) -> str:
    """The probe's unit: "none" for embedding stores (a row is a document), "token" for token-level
    label functions, otherwise the given pooling ("mean" by default, as SAEBench)."""
    if getattr(store, "kind", "") == "embedding":
        return "none"
    if pooling is None:
        return "token" if callable(labels) else "mean"
    if pooling not in POOLINGS:
        raise ConfigError(f"probe: unknown pooling '{pooling}'; expected one of {POOLINGS}")
    if pooling != "token" and callable(labels):
        raise ConfigError(f"probe: pooling '{pooling}' needs a document label name; a label function labels tokens, "
                          "use pooling='token'")
    return pooling


def _examples(store, labels, pooling: str, max_rows: int | None, seed: int, sae) -> dict:
    """Rows, their labels and feature sets, pooled to one example per document unless pooling is "token"/"none"."""
    whole_docs = pooling not in ("token",)
    rows = sample_documents(store.meta("doc_id").numpy(), max_rows, seed) if whole_docs \
        else sample_rows(len(store), max_rows, seed)
    values = row_labels(store, rows, labels)
    keep = np.array([v is not None for v in values], dtype=bool)
    rows, values = rows[keep], [v for v in values if v is not None]
    acts_ND = _load(store, rows)
    feature_sets = {"neurons": acts_ND.numpy()}
    if sae is not None:
        if sae.cfg.d_in != store.d_in:
            raise ShapeMismatchError(f"probe: SAE expects d_in={sae.cfg.d_in}, the store has d_in={store.d_in}")
        feature_sets = {"sae": sae_codes(sae, acts_ND), **feature_sets}
    doc_ids = store.meta("doc_id")[torch.from_numpy(rows)].numpy()
    if pooling in ("token", "none"):
        return {"rows": rows, "values": values, "feature_sets": feature_sets, "doc_ids": doc_ids, "n_rows": len(rows),
                "unit_rows": np.ones(len(rows), dtype=np.int64)}
    uniq, unit_N = document_units(doc_ids)
    pos = store.meta("pos")[torch.from_numpy(rows)].numpy()
    first = np.unique(unit_N, return_index=True)[1]
    return {"rows": rows[first], "values": [values[i] for i in first], "doc_ids": uniq, "n_rows": len(rows),
            "unit_rows": np.bincount(unit_N, minlength=len(uniq)),
            "feature_sets": {k: pool_features(X, unit_N, pos, pooling) for k, X in feature_sets.items()}}


def _check_split(y: np.ndarray, train: np.ndarray, test: np.ndarray, what: str = "") -> None:
    for name, part in (("train", train), ("test", test)):
        if len(set(y[part].tolist())) < 2:
            raise SaekitError(f"probe{what}: the {name} split has only one class (positive examples: "
                              f"{int(y[part].sum())} of {int(part.sum())}); use more documents or another "
                              "test_frac/seed")


def probe_sweep(store, labels: str | Callable, *, sae: SparseAutoencoder | None = None,
                ks: Sequence[int] = (1, 2, 5, 10, 20), methods: Sequence[str] = METHODS, test_frac: float = 0.3,
                seed: int = 0, max_rows: int | None = None, positive=None, tokenizer=None,
                pooling: str | None = None, classes: Sequence | str | None = None,
                class_methods: Sequence[str] = ("mean_diff",), interval: Callable | None = None) -> dict:
    """k-sparse probes of a label on SAE latents (when `sae` is given) and on raw neurons, side by side.

    `labels` is a document label name (e.g. "sentiment") or `fn(doc_id, pos, token_id, doc) -> label`
    (None drops the row). For a token store and a document label the probe's unit is the document:
    its rows' SAE codes and neurons are pooled (`pooling` "mean" by default, "max" or "last"; "token"
    probes every row against its document's label). `classes` ("all" or a list) adds one-vs-rest
    probes per class (`class_methods`) with a macro summary. `interval(correct, units)` (e.g.
    `saekit.eval.bootstrap.interval_fn()`) adds a ci95 to every accuracy. Returns a JSON-ready report:
    per feature set, method and k the chosen features and test accuracy/F1; dense probes on all
    dimensions; the majority baseline; the k=1 winners with their top examples; the train/test doc ids.
    """
    for m in (*methods, *class_methods):
        if m not in METHODS:
            raise ConfigError(f"probe: unknown selection method '{m}'; expected some of {METHODS}")
    store = _MetaCache(store)
    pooling = resolve_pooling(store, labels, pooling)
    ex = _examples(store, labels, pooling, max_rows, seed, sae)
    rows, values, doc_ids, feature_sets = ex["rows"], ex["values"], ex["doc_ids"], ex["feature_sets"]
    y, positive, counts = binarize(values, positive)
    train_docs, test_docs = split_documents(doc_ids, test_frac, seed)
    train, test = np.isin(doc_ids, train_docs), np.isin(doc_ids, test_docs)
    _check_split(y, train, test)
    ks = _check_ks(ks, {k: X.shape[1] for k, X in feature_sets.items()})
    token_level = pooling == "token"
    results, winners, dense = {}, {}, {}
    for fs, X in feature_sets.items():
        results[fs], winners[fs] = {}, {}
        for method in methods:
            log.info("probe: %s / %s", fs, method)
            results[fs][method] = _sweep_one(X, y, train, test, method, ks, interval, doc_ids)
            winners[fs][method] = _winner(store, X, rows, values, results[fs][method], tokenizer, token_level)
        dense[fs] = {**fit_probe(X[train], y[train], X[test], y[test], interval=interval, test_units=doc_ids[test]),
                     "n_features": int(X.shape[1])}
    majority = max(float(y[test].mean()), 1 - float(y[test].mean()))
    report = {"label": labels if isinstance(labels, str) else getattr(labels, "__name__", "function"),
              "positive": positive, "classes": counts, "kind": getattr(store, "kind", "unknown"),
              "hook": getattr(store, "hook", ""), "seed": seed, "test_frac": test_frac, "ks": ks,
              "pooling": pooling, "unit": "token" if token_level else "document",
              "methods": list(methods), "n_rows": int(ex["n_rows"]), "n_examples": int(len(y)),
              "n_train_rows": int(ex["unit_rows"][train].sum()), "n_test_rows": int(ex["unit_rows"][test].sum()), "n_train_docs": int(len(train_docs)),
              "n_test_docs": int(len(test_docs)), "majority_baseline": majority, "results": results, "dense": dense,
              "winners": winners,
              "sae": None if sae is None else {"architecture": sae.architecture, "d_sae": int(sae.cfg.d_sae)},
              "train_doc_ids": [int(d) for d in train_docs], "test_doc_ids": [int(d) for d in test_docs]}
    if classes is not None:
        report["per_class"], report["macro"] = one_vs_rest(store, ex, classes, class_methods, ks, train, test,
                                                           interval, tokenizer, token_level)
    return report


def one_vs_rest(store, ex: dict, classes: Sequence | str, methods: Sequence[str], ks: list[int], train: np.ndarray,
                test: np.ndarray, interval: Callable | None, tokenizer, token_level: bool) -> tuple[dict, dict]:
    """Per class (one vs the rest): per feature set the k sweep, the best single latent with its top
    examples; and the macro summary (mean accuracy over the classes probed, per feature set, method, k)."""
    values, doc_ids = ex["values"], ex["doc_ids"]
    names = sorted(set(values), key=str) if classes == "all" else list(classes)
    per_class: dict[str, dict] = {}
    for c in names:
        y = np.array([v == c for v in values])
        if len(set(y[train].tolist())) < 2 or len(set(y[test].tolist())) < 2:
            per_class[str(c)] = {"skipped": "a split holds only one class", "count": int(y.sum())}
            continue
        entry = {"count": int(y.sum()), "majority_baseline": max(float(y[test].mean()), 1 - float(y[test].mean())),
                 "results": {}, "best": {}}
        for fs, X in ex["feature_sets"].items():
            entry["results"][fs] = {m: _sweep_one(X, y, train, test, m, ks, interval, doc_ids) for m in methods}
            entry["best"][fs] = _winner(store, X, ex["rows"], values, entry["results"][fs][methods[0]], tokenizer,
                                        token_level)
        per_class[str(c)] = entry
    probed = [e for e in per_class.values() if "results" in e]
    macro = {fs: {m: {str(k): float(np.mean([e["results"][fs][m][str(k)]["accuracy"] for e in probed]))
                      for k in ks} for m in methods} for fs in ex["feature_sets"]} if probed else {}
    return per_class, {"classes_probed": len(probed), "accuracy": macro,
                       "majority_baseline": float(np.mean([e["majority_baseline"] for e in probed])) if probed else None}
