"""Building a run's browser bundle from its store and SAE: `saekit analyze RUN`.

Where the store, the SAE and the bundle live is `saekit.layout.RunFolder`'s answer (a config's
`store.path`, one bundle per SAE of a multi-SAE run); the run layer (`saekit.run.stages.analyze_run`)
picks the SAEs and the run's `analyze:` settings.

The heavy lifting is `saekit.analysis.features` (two streaming passes); this module gathers the
examples' contexts and documents, assembles one JSON record per feature (everything its page
shows, so the app assembles a page with one seek), the list table, and the manifest. The folder is
built beside its final name and renamed into place, so a crash never leaves a half bundle.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from saekit.analysis.features import (
    AnalyzeConfig,
    IndexStats,
    RunningStats,
    decoder_neighbours,
    encode_pass,
    example_windows,
    feature_families,
    feature_values_at,
    index_pass,
    logit_lens,
    top_cooccurring,
)
from saekit.artifacts import FORMAT_VERSION, atomic_dir, read_json, write_manifest
from saekit.browser.bundle import BUNDLE_FORMAT, FEATURES_TABLE, INDEX_DIR, OFFSETS, RECORDS, LatentIndex
from saekit.errors import ModelNotAvailableError, ShapeMismatchError
from saekit.layout import RunFolder
from saekit.sae.registry import load_sae
from saekit.store.locate import store_for_hook
from saekit.store.reader import ActivationStore
from saekit.store.writer import DOCS

log = logging.getLogger(__name__)
NORM_PATHS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm", "ln_f")


def load_lm_parts(spec: dict, model=None, tokenizer=None):
    """(tokenizer, W_U [V, D], final norm weight [D] or None) for an LLM run; Nones when unavailable."""
    if model is None:
        from saekit.sources.models import load_lm

        try:
            model, tokenizer = load_lm(spec["model"])
        except (ModelNotAvailableError, OSError, ValueError) as e:
            log.warning("no language model for the logit lens and token text (%s); showing token ids", e)
            return tokenizer, None, None
    W_U = model.get_output_embeddings().weight.detach()
    norm = None
    for path in NORM_PATHS:
        try:
            norm = model.get_submodule(path).weight.detach()
            break
        except AttributeError:
            continue
    return tokenizer, W_U, norm


def token_strings(tokenizer, token_ids: np.ndarray) -> dict[int, str]:
    """Readable text of each distinct token id (the tokenizer's decode of that one token)."""
    uniq = [int(t) for t in np.unique(token_ids) if t >= 0]
    if tokenizer is None:
        return {t: f"<{t}>" for t in uniq}
    return {t: tokenizer.decode([t]) for t in uniq}


def read_docs(path: Path, wanted: set[int]) -> dict[int, dict]:
    """Only the documents the examples need (the whole corpus never sits in memory)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            if int(d["doc_id"]) in wanted:
                out[int(d["doc_id"])] = d
    return out


class Examples:
    """Every example the bundle shows (top and interval samples), flat, with its context gathered."""

    def __init__(self, stats: RunningStats, istats: IndexStats):
        n_top = len(stats.top_f)
        self.f = torch.cat([stats.top_f, istats.sample_f]).numpy()
        self.v = torch.cat([stats.top_v, istats.sample_v]).numpy()
        self.r = torch.cat([stats.top_r, istats.sample_r]).numpy()
        self.q = np.concatenate([np.full(n_top, -1), istats.sample_q.numpy()])  # -1: top example

    def gather(self, store: ActivationStore, index: LatentIndex, context: int, tokenizer) -> None:
        """Doc ids for all; for LLM runs the window's tokens and the feature's activation on each."""
        self.doc = store._gather("doc_id", self.r).numpy()
        self.pos = store._gather("pos", self.r).numpy()
        if store.kind == "embedding" or len(self.r) == 0:
            self.win = None
            return
        win, valid = example_windows(self.r, len(store), context)
        flat = win.ravel()
        doc_w = store._gather("doc_id", flat).numpy().reshape(win.shape)
        tok_w = store._gather("token_id", flat).numpy().reshape(win.shape)
        acts_w = feature_values_at(index.rows(flat), np.repeat(self.f, win.shape[1])).reshape(win.shape)
        self.win, self.valid = win, valid & (doc_w == self.doc[:, None])
        self.tok_w, self.acts_w = tok_w, acts_w
        self.tok_str = token_strings(tokenizer, tok_w[self.valid])

    def item(self, e: int, docs: dict[int, dict]) -> dict:
        out = {"row": int(self.r[e]), "doc": int(self.doc[e]), "act": round(float(self.v[e]), 5)}
        d = docs.get(int(self.doc[e]), {})
        out["labels"] = d.get("labels") or {}
        if self.win is None:
            out["text"] = d.get("text", "")
            return out
        ok = self.valid[e]
        out["pos"] = int(self.pos[e])
        out["tokens"] = [self.tok_str.get(int(t), f"<{int(t)}>") for t in self.tok_w[e][ok]]
        out["acts"] = [round(float(a), 4) for a in self.acts_w[e][ok]]
        out["center"] = int(ok[: len(ok) // 2].sum())
        return out


def join_tokens(tokens: list[str]) -> str:
    """Text of a token window: BPE pieces carry their own spaces, word-level tokens need them added."""
    return "".join(tokens) if any(t[:1].isspace() for t in tokens) else " ".join(tokens)


def label_distribution(items: list[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {}
    for it in items:
        for k, v in (it.get("labels") or {}).items():
            if v is not None and not isinstance(v, (dict, list)):
                out.setdefault(k, Counter())[str(v)] += 1
    return {k: dict(c.most_common()) for k, c in out.items()}


def _summary_fields(top: list[dict], labels: dict, promoted: list) -> dict:
    """The list table's search text: top tokens, top text, dominant labels, promoted tokens."""
    if top and "tokens" in top[0]:
        seen = []
        for it in top:
            t = it["tokens"][it["center"]] if it["tokens"] else ""
            if t not in seen:
                seen.append(t)
        tokens = " | ".join(seen[:6])
        text = join_tokens(top[0]["tokens"])
    else:
        tokens, text = "", (top[0]["text"] if top else "")
    n = max(len(top), 1)
    lab = ", ".join(f"{k}={max(c, key=c.get)} ({100 * max(c.values()) // n}%)" for k, c in labels.items() if c)
    return {"top_tokens": tokens, "top_text": text[:200], "top_labels": lab,
            "promoted": " | ".join(p[0] for p in promoted[:5])}


def _groups(keys: np.ndarray, n: int) -> np.ndarray:
    """Bounds of each feature's block in an array sorted by feature."""
    return np.searchsorted(keys, np.arange(n + 1))


def assemble(stats: RunningStats, istats: IndexStats, ex: Examples, docs: dict, extras: dict,
             cfg: AnalyzeConfig, n_rows: int, tmp: Path) -> dict:
    """Write features.jsonl + offsets + features.parquet; returns counts for the manifest."""
    import pandas as pd

    from saekit.artifacts import save_tensors

    F = stats.d_sae
    order = np.lexsort((np.arange(len(ex.f)), ex.q, ex.f))  # by feature, top first, interval, rank
    bounds = _groups(ex.f[order], F)
    cf, co, cc, cp = (t.numpy() for t in extras["cooc"])
    cb = _groups(cf, F)
    parent, p_parent = extras["parent"]
    children: dict[int, list] = {}
    for c in np.nonzero(parent >= 0)[0]:
        children.setdefault(int(parent[c]), []).append([int(c), round(float(p_parent[c]), 4)])
    count, mx = stats.count_F.numpy(), stats.max_F.numpy()
    mean = (stats.sum_F / stats.count_F.clamp_min(1)).numpy()
    hist = istats.hist_FB.numpy()
    rows, offsets = [], [0]
    with open(tmp / RECORDS, "wb") as fh:
        for f in range(F):
            sel = order[bounds[f]:bounds[f + 1]]
            top = [ex.item(e, docs) for e in sel if ex.q[e] < 0]
            quant = [{"interval": q, "lo": round(float(mx[f] * q / cfg.quantiles), 5),
                      "hi": round(float(mx[f] * (q + 1) / cfg.quantiles), 5),
                      "examples": [ex.item(e, docs) for e in sel if ex.q[e] == q]} for q in range(cfg.quantiles)]
            labels = label_distribution(top)
            promoted, suppressed = extras["logits"](f)
            rec = {"feature": f, "count": int(count[f]), "density": float(count[f]) / max(n_rows, 1),
                   "mean": float(mean[f]), "max": float(mx[f]),
                   "hist": {"max": float(mx[f]), "counts": hist[f].tolist()},
                   "top": top, "quantiles": [q for q in quant if q["examples"]],
                   "neighbours": [[int(g), round(float(c), 4)] for g, c in zip(*extras["neigh"](f))],
                   "cooccur": [[int(o), int(c), round(float(p), 4)] for o, c, p in
                               zip(co[cb[f]:cb[f + 1]], cc[cb[f]:cb[f + 1]], cp[cb[f]:cb[f + 1]])],
                   "logit_lens": {"promoted": promoted, "suppressed": suppressed},
                   "labels": labels,
                   "family": {"parent": int(parent[f]) if parent[f] >= 0 else None,
                              "p_parent": round(float(p_parent[f]), 4), "children": children.get(f, [])}}
            line = json.dumps(rec, ensure_ascii=False, allow_nan=False).encode() + b"\n"
            fh.write(line)
            offsets.append(offsets[-1] + len(line))
            rows.append({"feature": f, "count": int(count[f]), "density": rec["density"], "mean": rec["mean"],
                         "max": rec["max"], "dead": bool(count[f] == 0), "parent": rec["family"]["parent"] or -1,
                         "children": len(rec["family"]["children"]), **_summary_fields(top, labels, promoted)})
    save_tensors(tmp / OFFSETS, {"offsets": torch.tensor(offsets, dtype=torch.int64)})
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    (tmp / FEATURES_TABLE).write_bytes(buf.getvalue())
    return {"dead": int((count == 0).sum())}


def _logit_fn(W_dec_FD, W_U, norm, tokenizer, n: int):
    if W_U is None or n == 0 or W_dec_FD is None:
        return lambda f: ([], [])
    if W_U.shape[1] != W_dec_FD.shape[1]:
        raise ShapeMismatchError(f"logit lens: unembedding expects width {W_U.shape[1]}, SAE decoder has {W_dec_FD.shape[1]}")
    pi, pv, ni, nv = (t.numpy() for t in logit_lens(W_dec_FD, W_U, norm, n))
    strs = token_strings(tokenizer, np.concatenate([pi.ravel(), ni.ravel()]))
    return lambda f: ([[strs[int(i)], round(float(v), 4)] for i, v in zip(pi[f], pv[f])],
                      [[strs[int(i)], round(float(v), 4)] for i, v in zip(ni[f], nv[f])])


def open_run(run: str | Path | RunFolder):
    """(folder, SAE, store of the SAE's hook) of a single run or of one SAE of a multi-SAE run."""
    folder = (run if isinstance(run, RunFolder) else RunFolder(Path(run))).require_one_sae()
    sae = load_sae(folder.train())
    store = store_for_hook(folder.store, sae.cfg.hook_name or None)
    if sae.cfg.d_in != store.d_in:
        raise ShapeMismatchError(f"SAE expects d_in={sae.cfg.d_in}, the store has d_in={store.d_in}")
    return folder, sae, store


def build_bundle(run: str | Path | RunFolder, cfg: AnalyzeConfig | None = None, *, model=None, tokenizer=None,
                 out: str | Path | None = None) -> Path:
    """Analyse the run's store with its SAE and write its bundle folder (or `out`); returns the folder.

    `run` is a run folder (or a `RunFolder` scoped to one SAE of a multi-SAE run); `cfg` defaults to
    `AnalyzeConfig()` (the run layer passes the run config's `analyze:` section)."""
    t0 = time.perf_counter()
    cfg = cfg or AnalyzeConfig()
    folder, sae, store = open_run(run)
    out = Path(out) if out else folder.bundle
    spec = store.manifest["source"]
    is_llm = store.kind != "embedding"
    W_U = norm = None
    if is_llm:
        tokenizer, W_U, norm = load_lm_parts(spec, model, tokenizer) if (cfg.logit_lens or model is not None) \
            else (tokenizer, None, None)
    W_dec = getattr(sae, "W_dec", None)
    W_dec = W_dec.detach().float().cpu() if isinstance(W_dec, torch.Tensor) else None
    with atomic_dir(out) as tmp:
        stats, parts = encode_pass(store, sae, cfg, tmp / INDEX_DIR)
        istats = index_pass(tmp / INDEX_DIR, parts, stats.max_F, cfg)
        ex = Examples(stats, istats)
        ex.gather(store, LatentIndex(tmp / INDEX_DIR, parts), cfg.context, tokenizer)
        docs = read_docs(store.path / DOCS, set(ex.doc.tolist()))
        n_idx, n_cos = decoder_neighbours(W_dec, cfg.neighbours) if W_dec is not None else (None, None)
        extras = {
            "cooc": top_cooccurring(istats.pair_keys, istats.pair_counts, stats.count_F, cfg.cooccur),
            "parent": tuple(t.numpy() for t in feature_families(istats.pair_keys, istats.pair_counts, stats.count_F,
                                                                 cfg.family_threshold, cfg.family_min_count)),
            "neigh": (lambda f: (n_idx[f].tolist(), n_cos[f].tolist())) if n_idx is not None else (lambda f: ([], [])),
            "logits": _logit_fn(W_dec, W_U if cfg.logit_lens else None, norm, tokenizer, cfg.logit_tokens),
        }
        facts = assemble(stats, istats, ex, docs, extras, cfg, len(store), tmp)
        files = [p.relative_to(tmp).as_posix() for p in sorted(tmp.rglob("*")) if p.is_file()]
        write_manifest(tmp, files, {
            "bundle_format": BUNDLE_FORMAT, "kind": store.kind, "run": folder.label, "hook": store.hook,
            "model": spec.get("model"), "source": spec, "d_in": store.d_in, "d_sae": sae.cfg.d_sae,
            "n_rows": len(store), "n_docs": store.manifest.get("n_docs"), "index_parts": parts,
            "sae": {"architecture": sae.architecture, "k": getattr(sae.cfg, "k", None)},
            "analyze": cfg.to_dict(), "cooccurrence_exact": not istats.pairs_truncated,
            "has_logit_lens": bool(is_llm and W_U is not None and cfg.logit_lens),
            "has_token_text": bool(is_llm and tokenizer is not None), "dead": facts["dead"],
            "build_seconds": round(time.perf_counter() - t0, 3), "store_format_version": FORMAT_VERSION,
            "eval_report": (folder.eval / "report.json").exists()})
    log.info("bundle for %s: %d features (%d dead) over %d rows in %.1f s", folder.label, sae.cfg.d_sae,
             facts["dead"], len(store), time.perf_counter() - t0)
    return out


def read_bundle_manifest(path: str | Path) -> dict:
    from saekit.artifacts import MANIFEST

    return read_json(Path(path) / MANIFEST)
