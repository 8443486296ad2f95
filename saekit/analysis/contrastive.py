"""Contrastive feature search: which latents separate two sets of documents?

    rep = contrastive_search(model, tok, "model.layers.15", sae, airline_texts, other_texts,
                             interval=difference_interval_fn())            # two text sets, an LLM run
    rep = contrast_store(store, sae, "topic", "airline", interval=...)    # a label split of a run's corpus
    rep["best"]                                                           # the feature to hand to the sweep

Each document is one unit: its SAE code is mean-pooled over its tokens (an embedding store's row
already is a document), and latents are ranked by the difference of the two sets' mean pooled
activation, A minus B. The interval of that difference comes from a function the caller passes
(`saekit.eval.difference.difference_interval_fn`: a bootstrap over documents of each set; analysis
sits below eval and may not import it). Each top latent carries the share of documents of each set
it fires on and the texts of set A where it is strongest.

`label_top_tokens` gives the target token set of a label for the sweep: the word tokens most
over-represented in the label's documents (smoothed log-odds against the rest).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from saekit.analysis.probing import document_units, pool_features, sae_codes
from saekit.analysis.text_probe import LinearProbe, fit_linear_probe, pooled_activations
from saekit.errors import ConfigError
from saekit.sae.base import SparseAutoencoder, inference_mode

MAX_FIRES_B = 0.5
DiffInterval = Callable[[Tensor, Tensor], "list[float] | None"]


def rank_latents(pooled_a_GF: Tensor, pooled_b_HF: Tensor, *, top_n: int = 10,
                 interval: DiffInterval | None = None, max_fires_b: float = MAX_FIRES_B) -> list[dict]:
    """The `top_n` latents with the largest mean(A) − mean(B) of pooled activation, with their interval.

    Latents that fire on more than `max_fires_b` of B's documents are left out: mean-pooled, a latent
    that fires on nearly every document with large values can win the raw difference without
    separating the sets (on the SmolLM2 quickstart run the top raw difference for airline tweets fired
    on 90 % of airline and 86 % of other tweets); it is not a feature to steer with."""
    a, b = torch.as_tensor(pooled_a_GF).float(), torch.as_tensor(pooled_b_HF).float()
    if len(a) < 2 or len(b) < 2 or a.shape[1] != b.shape[1]:
        raise ConfigError(f"contrastive search: expected >= 2 documents per set over the same latents, found "
                          f"{tuple(a.shape)} and {tuple(b.shape)}")
    diff_F = a.mean(0) - b.mean(0)
    diff_F = torch.where((b > 0).float().mean(0) <= max_fires_b, diff_F, torch.full_like(diff_F, -float("inf")))
    top = diff_F.topk(min(top_n, diff_F.shape[0])).indices.tolist()
    out = []
    for f in top:
        if not math.isfinite(float(diff_F[f])) or float(diff_F[f]) <= 0:
            break  # left out (fires on most of B) or not higher in A: nothing more separates A from B
        out.append({"feature": int(f), "diff": float(diff_F[f]), "mean_a": float(a[:, f].mean()),
                    "mean_b": float(b[:, f].mean()), "fires_a": float((a[:, f] > 0).float().mean()),
                    "fires_b": float((b[:, f] > 0).float().mean()),
                    "ci95": interval(a[:, f].double(), b[:, f].double()) if interval is not None else None})
    return out


def _examples(pooled_a_GF: Tensor, texts_a: Sequence[str], feature: int, n: int) -> list[dict]:
    col = pooled_a_GF[:, feature]
    idx = col.topk(min(n, len(col))).indices.tolist()
    return [{"activation": float(col[i]), "text": texts_a[i][:200]} for i in idx if col[i] > 0]


def _report(ranked: list[dict], pooled_a: Tensor, texts_a: Sequence[str], n_examples: int, **head) -> dict:
    for r in ranked:
        r["examples"] = _examples(pooled_a, texts_a, r["feature"], n_examples)
    return {"kind": "contrastive", **head, "features": ranked, "best": ranked[0]["feature"] if ranked else None}


def dense_code_fn(sae: SparseAutoencoder) -> Callable[[Tensor], Tensor]:
    """`acts [..., d_in] -> dense code [..., d_sae]` on the SAE's device and dtype."""
    p = next(sae.parameters())

    def fn(x: Tensor) -> Tensor:
        with inference_mode(sae):
            return sae.encode(x.to(p.device, p.dtype)).dense().float()
    return fn


def contrastive_search(model, tokenizer, hook: str, sae: SparseAutoencoder, texts_a: Sequence[str],
                       texts_b: Sequence[str], *, top_n: int = 10, interval: DiffInterval | None = None,
                       n_examples: int = 3, batch_size: int = 16, max_length: int = 64,
                       max_fires_b: float = MAX_FIRES_B) -> dict:
    """Latents of `sae` at `hook` ranked by how much more they fire on `texts_a` than on `texts_b`."""
    code = dense_code_fn(sae)
    kw = {"transform": code, "batch_size": batch_size, "max_length": max_length}
    pooled_a = pooled_activations(model, tokenizer, list(texts_a), hook, **kw)
    pooled_b = pooled_activations(model, tokenizer, list(texts_b), hook, **kw)
    ranked = rank_latents(pooled_a, pooled_b, top_n=top_n, interval=interval, max_fires_b=max_fires_b)
    return _report(ranked, pooled_a, list(texts_a), n_examples, hook=hook, n_a=len(texts_a), n_b=len(texts_b),
                   unit="document (mean-pooled tokens, position 0 left out)")


def _split_docs(store, label: str, positive: str, max_docs: int | None, seed: int, only=None):
    """(rows, unit index per row, doc ids per unit, is-A per unit) for the documents that carry `label`
    (and are among `only` when given)."""
    doc_N = store.meta("doc_id").numpy()
    labelled = {d for d, doc in store.docs.items() if (doc.get("labels") or {}).get(label) is not None}
    if not labelled:
        known = sorted({k for doc in store.docs.values() for k in (doc.get("labels") or {})})
        raise ConfigError(f"contrast: expected documents with label '{label}', found none (labels: {known})")
    labelled = labelled if only is None else labelled & {int(d) for d in only}
    docs = np.array(sorted(set(doc_N.tolist()) & labelled))
    if max_docs is not None and len(docs) > max_docs:
        docs = np.sort(np.random.default_rng(seed).choice(docs, max_docs, replace=False))
    rows = np.flatnonzero(np.isin(doc_N, docs))
    units_G, unit_N = document_units(doc_N[rows])
    is_a = np.array([str(store.docs[int(d)]["labels"][label]) == str(positive) for d in units_G])
    if is_a.sum() < 2 or (~is_a).sum() < 2:
        raise ConfigError(f"contrast: expected >= 2 documents with {label}={positive!r} and >= 2 without, found "
                          f"{int(is_a.sum())} and {int((~is_a).sum())}")
    return rows, unit_N, units_G, is_a


def contrast_store(store, sae: SparseAutoencoder, label: str, positive, *, top_n: int = 10,
                   interval: DiffInterval | None = None, max_docs: int | None = 2000, seed: int = 0,
                   n_examples: int = 3, max_fires_b: float = MAX_FIRES_B) -> dict:
    """Contrastive search on a run's store: documents with `label == positive` against the rest.
    Token stores are mean-pooled per document; an embedding store's rows are documents already."""
    rows, unit_N, units_G, is_a = _split_docs(store, label, positive, max_docs, seed)
    X = sae_codes(sae, torch.as_tensor(store[rows]).float())
    pooled = pool_features(X, unit_N, store.meta("pos").numpy()[rows], "mean")
    pooled = torch.from_numpy(np.asarray(pooled.todense() if hasattr(pooled, "todense") else pooled)).float()
    texts = [store.docs[int(d)].get("text") or "" for d in units_G]
    ranked = rank_latents(pooled[torch.from_numpy(is_a)], pooled[torch.from_numpy(~is_a)], top_n=top_n,
                          interval=interval, max_fires_b=max_fires_b)
    texts_a = [t for t, a in zip(texts, is_a) if a]
    return _report(ranked, pooled[torch.from_numpy(is_a)], texts_a, n_examples, hook=getattr(store, "hook", ""),
                   label=label, positive=str(positive), n_a=int(is_a.sum()), n_b=int((~is_a).sum()),
                   unit="document (mean-pooled rows)" if getattr(store, "kind", "") != "embedding" else "document")


def label_top_tokens(tokenizer, docs: Sequence[dict], label: str, positive, n: int = 20, min_count: int = 5,
                     ) -> list[int]:
    """The `n` word-initial tokens (a leading space, then >= 3 letters) most over-represented in documents with
    `label == positive`, by add-one smoothed log-odds against the other documents."""
    counts = {True: Counter(), False: Counter()}
    for d in docs:
        value = (d.get("labels") or {}).get(label)
        if value is not None:
            counts[str(value) == str(positive)].update(tokenizer(d.get("text") or "", add_special_tokens=False).input_ids)
    tot = {k: sum(c.values()) + 1 for k, c in counts.items()}
    if tot[True] <= 1:
        raise ConfigError(f"label_top_tokens: expected documents with {label}={positive!r}, found none")

    def word(t: int) -> bool:
        s = tokenizer.decode([t])
        return s[:1] == " " and len(s.strip()) >= 3 and s.strip().isalpha()

    score = {t: math.log((c + 1) / tot[True]) - math.log((counts[False][t] + 1) / tot[False])
             for t, c in counts[True].items() if c >= min_count and word(t)}
    return sorted(sorted(score, key=lambda t: (-score[t], t))[:n])


def store_class_means(store, label: str, positive, *, max_docs: int | None = 2000, seed: int = 0,
                      doc_ids: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Per-document mean activations `[G, D]` of the documents with `label == positive` and of the rest
    (restricted to `doc_ids` when given, e.g. a probe report's training documents)."""
    rows, unit_N, units_G, is_a = _split_docs(store, label, positive, max_docs, seed, doc_ids)
    pooled = pool_features(np.asarray(store[rows], dtype=np.float32), unit_N, store.meta("pos").numpy()[rows], "mean")
    pooled = torch.from_numpy(np.asarray(pooled)).float()
    return pooled[torch.from_numpy(is_a)], pooled[torch.from_numpy(~is_a)]


def store_probe(store, label: str, positive, *, doc_ids: Sequence[int] | None = None, max_docs: int | None = 2000,
                seed: int = 0) -> LinearProbe:
    """A linear probe for `label == positive` on document-pooled activations of the store's hook: the
    steering sweep scores generated text with it ("the run's probe", refitted on its training documents)."""
    pos, neg = store_class_means(store, label, positive, max_docs=max_docs, seed=seed, doc_ids=doc_ids)
    return fit_linear_probe(pos, neg, hook=getattr(store, "hook", ""), positive=f"{label}={positive}")
