"""Building a run's browser bundle from its store and SAE: `saekit analyze RUN`.

Where the store, the SAE and the bundle live is `saekit.layout.RunFolder`'s answer (a config's
`store.path`, one bundle per SAE of a multi-SAE run); the run layer (`saekit.run.stages.analyze_run`)
picks the SAEs and the run's `analyze:` settings.

The analysis is `saekit.analysis.features` (two streaming passes, then the examples' contexts, label
distributions and summaries); this module only assembles: one `FeatureRecord` per feature
(everything its page shows, so the app assembles a page with one seek), the list table of
`FeatureRow`s, and the `BundleManifest`. The folder is built beside its final name and renamed into
place, so a crash never leaves a half bundle.

Massive-activation outliers (`saekit.store.outliers`): every example says whether its row is one
(`outlier`), a feature whose top examples are mostly outliers is marked (`outlier_examples`,
`mostly_outliers` in its record and list row), and the manifest's `outliers` carries the rule, the
norm threshold for live text and whether the run's training left them out.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from saekit.analysis.features import (
    AnalyzeConfig,
    ExampleSet,
    IndexStats,
    RunningStats,
    decoder_neighbours,
    encode_pass,
    feature_families,
    feature_summary,
    gather_examples,
    index_pass,
    label_distribution,
    logit_lens,
    top_cooccurring,
)
from saekit.analysis.hierarchy import refinements, sae_levels
from saekit.artifacts import (FORMAT_VERSION, MANIFEST, atomic_dir, atomic_write_bytes, atomic_write_json, read_json,
                              sha256_file, write_manifest)
from saekit.browser.bundle import (
    BUNDLE_FORMAT,
    FEATURES_TABLE,
    INDEX_DIR,
    OFFSETS,
    PROBE_FILE,
    RECORDS,
    BundleManifest,
    Example,
    Family,
    FeatureRecord,
    FeatureRow,
    Interval,
    LatentIndex,
    LogitLens,
    probe_summary,
)
from saekit.errors import ModelNotAvailableError, ShapeMismatchError
from saekit.layout import RunFolder
from saekit.store.reader import ActivationStore
from saekit.sae.registry import load_sae
from saekit.store.locate import store_for_hook
from saekit.store.manifest import DOCS

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


MOSTLY = 0.5  # a feature is marked when more than this fraction of its top examples are outliers


def example_record(ex: ExampleSet, e: int, docs: dict[int, dict], token_text: dict[int, str],
                   outlier_R: np.ndarray | None = None) -> Example:
    """The JSON record of example `e`: its document's labels, and its token window or document text."""
    doc = docs.get(int(ex.doc_E[e]), {})
    out = Example(row=int(ex.row_E[e]), doc=int(ex.doc_E[e]), act=round(float(ex.value_E[e]), 5),
                  labels=doc.get("labels") or {},
                  outlier=bool(outlier_R[int(ex.row_E[e])]) if outlier_R is not None else False)
    if ex.windows is None:
        out["text"] = doc.get("text", "")
        return out
    ok_W = ex.windows.valid_EW[e]
    out["pos"] = int(ex.pos_E[e])
    out["tokens"] = [token_text.get(int(t), f"<{int(t)}>") for t in ex.windows.token_EW[e][ok_W]]
    out["acts"] = [round(float(a), 4) for a in ex.windows.acts_EW[e][ok_W]]
    out["center"] = int(ok_W[: len(ok_W) // 2].sum())
    return out


@dataclass
class Cooccurrence:
    """Each feature's most frequent co-firing partners: flat arrays grouped by feature."""

    other_M: np.ndarray
    together_M: np.ndarray  # firings together
    p_other_M: np.ndarray  # P(other fires | feature fires)
    bounds_F1: np.ndarray  # feature f's partners are [bounds_F1[f], bounds_F1[f + 1])

    def of(self, f: int) -> list[tuple[int, int, float]]:
        lo, hi = self.bounds_F1[f], self.bounds_F1[f + 1]
        return [[int(o), int(c), round(float(p), 4)]
                for o, c, p in zip(self.other_M[lo:hi], self.together_M[lo:hi], self.p_other_M[lo:hi])]


@dataclass
class LogitTable:
    """Promoted / suppressed token ids and logits of every feature, with the tokens' text."""

    promoted_FN: np.ndarray
    promoted_logit_FN: np.ndarray
    suppressed_FN: np.ndarray
    suppressed_logit_FN: np.ndarray
    token_text: dict[int, str]

    def of(self, f: int) -> LogitLens:
        def pairs(ids, vals):
            return [[self.token_text[int(i)], round(float(v), 4)] for i, v in zip(ids[f], vals[f])]

        return LogitLens(promoted=pairs(self.promoted_FN, self.promoted_logit_FN),
                         suppressed=pairs(self.suppressed_FN, self.suppressed_logit_FN))


@dataclass
class FeatureTables:
    """The per-feature tables a record needs besides its examples, computed once before assembly."""

    cooccur: Cooccurrence
    parent_F: np.ndarray  # -1 when none
    p_parent_F: np.ndarray
    neighbour_FN: np.ndarray | None  # None when the SAE has no decoder matrix
    neighbour_cos_FN: np.ndarray | None
    logits: LogitTable | None  # None without an unembedding (embedding runs, no model, logit_lens off)
    level_F: np.ndarray | None = None  # prefix level of each latent (nested SAEs only)
    refined: dict[int, list] = field(default_factory=dict)  # general latent -> [(later latent, decoder cos)]

    def __post_init__(self):
        self.children: dict[int, list] = {}
        for c in np.nonzero(self.parent_F >= 0)[0]:
            self.children.setdefault(int(self.parent_F[c]), []).append([int(c), round(float(self.p_parent_F[c]), 4)])

    def neighbours(self, f: int) -> list[tuple[int, float]]:
        if self.neighbour_FN is None:
            return []
        return [[int(g), round(float(c), 4)] for g, c in zip(self.neighbour_FN[f].tolist(), self.neighbour_cos_FN[f].tolist())]

    def family(self, f: int) -> Family:
        parent = int(self.parent_F[f])
        return Family(parent=parent if parent >= 0 else None, p_parent=round(float(self.p_parent_F[f]), 4),
                      children=self.children.get(f, []))

    def logit_lens(self, f: int) -> LogitLens:
        return self.logits.of(f) if self.logits is not None else LogitLens(promoted=[], suppressed=[])

    def level(self, f: int) -> int:
        return int(self.level_F[f]) if self.level_F is not None else -1

    def refined_by(self, f: int) -> list[list]:
        """Later-level latents that refine f: (latent, decoder cosine, P(f fires | latent fires))."""
        return [[c, cos, self._p_given(c, f)] for c, cos in self.refined.get(f, [])]

    def _p_given(self, child: int, f: int) -> float:
        return next((p for other, _, p in self.cooccur.of(child) if other == f), 0.0)


def feature_tables(stats: RunningStats, istats: IndexStats, W_dec_FD, lm_parts: tuple, cfg: AnalyzeConfig,
                   level_F: torch.Tensor | None = None) -> FeatureTables:
    """Co-firing partners, families, decoder neighbours and the logit lens of every feature;
    `lm_parts` is `load_lm_parts`' (tokenizer, W_U, final norm weight); with `level_F` (a nested SAE's
    prefix levels) also each general latent's refinements in later levels."""
    tokenizer, W_U, norm = lm_parts
    feature_M, other_M, together_M, p_M = (t.numpy() for t in top_cooccurring(
        istats.pair_keys, istats.pair_counts, stats.count_F, cfg.cooccur))
    cooc = Cooccurrence(other_M, together_M, p_M, np.searchsorted(feature_M, np.arange(stats.d_sae + 1)))
    parent_F, p_parent_F = (t.numpy() for t in feature_families(istats.pair_keys, istats.pair_counts, stats.count_F,
                                                                cfg.family_threshold, cfg.family_min_count))
    n_idx = n_cos = None
    if W_dec_FD is not None:
        n_idx, n_cos = (t.numpy() for t in decoder_neighbours(W_dec_FD, cfg.neighbours))
    logits = _logit_table(W_dec_FD, W_U if cfg.logit_lens else None, norm, tokenizer, cfg.logit_tokens)
    refined = refinements(W_dec_FD, level_F) if level_F is not None and W_dec_FD is not None else {}
    return FeatureTables(cooc, parent_F, p_parent_F, n_idx, n_cos, logits,
                         None if level_F is None else level_F.numpy(), refined)


def _logit_table(W_dec_FD, W_U, norm, tokenizer, n: int) -> LogitTable | None:
    if W_U is None or n == 0 or W_dec_FD is None:
        return None
    if W_U.shape[1] != W_dec_FD.shape[1]:
        raise ShapeMismatchError(f"logit lens: unembedding expects width {W_U.shape[1]}, SAE decoder has {W_dec_FD.shape[1]}")
    pi, pv, ni, nv = (t.numpy() for t in logit_lens(W_dec_FD, W_U, norm, n))
    return LogitTable(pi, pv, ni, nv, token_strings(tokenizer, np.concatenate([pi.ravel(), ni.ravel()])))


def feature_record(f: int, stats: RunningStats, istats: IndexStats, examples: list[Example], interval_E: list[int],
                   tables: FeatureTables, cfg: AnalyzeConfig, n_rows: int) -> FeatureRecord:
    """One feature's page: stats, histogram, top examples, interval samples and the per-feature tables."""
    count, max_f = int(stats.count_F[f]), float(stats.max_F[f])
    top = [x for x, q in zip(examples, interval_E) if q < 0]
    quantiles = [Interval(interval=q, lo=round(max_f * q / cfg.quantiles, 5), hi=round(max_f * (q + 1) / cfg.quantiles, 5),
                          examples=[x for x, qq in zip(examples, interval_E) if qq == q]) for q in range(cfg.quantiles)]
    n_out = sum(bool(x.get("outlier")) for x in top)
    return FeatureRecord(
        feature=f, count=count, density=float(count) / max(n_rows, 1),
        mean=float(stats.sum_F[f] / max(count, 1)), max=max_f,
        hist={"max": max_f, "counts": istats.hist_FB[f].tolist()},
        top=top, quantiles=[q for q in quantiles if q["examples"]],
        neighbours=tables.neighbours(f), cooccur=tables.cooccur.of(f), logit_lens=tables.logit_lens(f),
        labels=label_distribution([x.get("labels") for x in top]), family=tables.family(f),
        outlier_examples=n_out, mostly_outliers=bool(top) and n_out > MOSTLY * len(top),
        level=tables.level(f), refined_by=tables.refined_by(f))


def table_row(rec: FeatureRecord) -> FeatureRow:
    """The list table's row of a feature: its stats plus the search text."""
    return FeatureRow(feature=rec["feature"], count=rec["count"], density=rec["density"], mean=rec["mean"],
                      max=rec["max"], dead=rec["count"] == 0, parent=_or_minus_one(rec["family"]["parent"]),
                      children=len(rec["family"]["children"]), mostly_outliers=bool(rec.get("mostly_outliers")),
                      level=rec.get("level", -1),
                      **feature_summary(rec["top"], rec["labels"], rec["logit_lens"]["promoted"]))


def _or_minus_one(parent: int | None) -> int:
    return -1 if parent is None else parent


def assemble(stats: RunningStats, istats: IndexStats, ex: ExampleSet, docs: dict, tables: FeatureTables,
             token_text: dict[int, str], cfg: AnalyzeConfig, n_rows: int, tmp: Path,
             outlier_R: np.ndarray | None = None) -> dict:
    """Write features.jsonl + offsets + features.parquet; returns counts for the manifest."""
    import pandas as pd

    from saekit.artifacts import save_tensors

    rows, offsets = [], [0]
    with open(tmp / RECORDS, "wb") as fh:
        for f, sel in enumerate(ex.by_feature(stats.d_sae)):
            examples = [example_record(ex, e, docs, token_text, outlier_R) for e in sel]
            rec = feature_record(f, stats, istats, examples, ex.interval_E[sel].tolist(), tables, cfg, n_rows)
            line = json.dumps(rec, ensure_ascii=False, allow_nan=False).encode() + b"\n"
            fh.write(line)
            offsets.append(offsets[-1] + len(line))
            rows.append(table_row(rec))
    save_tensors(tmp / OFFSETS, {"offsets": torch.tensor(offsets, dtype=torch.int64)})
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    (tmp / FEATURES_TABLE).write_bytes(buf.getvalue())
    return {"dead": int((stats.count_F == 0).sum()), "mostly_outliers": sum(r["mostly_outliers"] for r in rows)}


def outlier_facts(store: ActivationStore, folder: RunFolder, mostly_outliers: int) -> dict:
    """The manifest's `outliers`: the store's rule and counts, the norm threshold the live page applies,
    and whether the run trained without them (None when the run recorded nothing)."""
    trained = folder.train_data()
    excluded = read_json(trained).get("exclude_outliers") if trained.exists() else None
    stats = store.norm_stats
    return {"rule": store.outlier_rule.to_json(), "store_outliers": int(stats["outliers"]),
            "median_norm": stats["median_norm"], "threshold_norm": stats["outlier_threshold_norm"],
            "excluded_in_training": excluded, "mostly_outlier_features": int(mostly_outliers)}


def open_run(run: str | Path | RunFolder):
    """(folder, SAE, store of the SAE's hook) of a single run or of one SAE of a multi-SAE run."""
    folder = (run if isinstance(run, RunFolder) else RunFolder(Path(run))).require_one_sae()
    sae = load_sae(folder.train())
    store = store_for_hook(folder.store, sae.cfg.hook_name or None)
    if sae.cfg.d_in != store.d_in:
        raise ShapeMismatchError(f"SAE expects d_in={sae.cfg.d_in}, the store has d_in={store.d_in}")
    return folder, sae, store


def build_bundle(run: str | Path | RunFolder, cfg: AnalyzeConfig | None = None, *, model=None, tokenizer=None,
                 out: str | Path | None = None, preflight: dict | None = None) -> Path:
    """Analyse the run's store with its SAE and write its bundle folder (or `out`); returns the folder.

    `run` is a run folder (or a `RunFolder` scoped to one SAE of a multi-SAE run); `cfg` defaults to
    `AnalyzeConfig()` (the run layer passes the run config's `analyze:` section, and the record of its
    SAE-vs-store preflight, kept in the manifest)."""
    t0 = time.perf_counter()
    cfg = cfg or AnalyzeConfig()
    folder, sae, store = open_run(run)
    out = Path(out) if out else folder.bundle
    spec = store.manifest.source
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
        ex = gather_examples(stats, istats, store, LatentIndex(tmp / INDEX_DIR, parts).rows, cfg.context)
        docs = read_docs(store.path / DOCS, set(ex.doc_E.tolist()))
        token_text = token_strings(tokenizer, ex.windows.token_EW[ex.windows.valid_EW]) if ex.windows else {}
        tables = feature_tables(stats, istats, W_dec, (tokenizer, W_U, norm), cfg, sae_levels(sae))
        facts = assemble(stats, istats, ex, docs, tables, token_text, cfg, len(store), tmp,
                         store.outlier_mask().numpy())
        has_probe = write_probe_section(folder, tmp)
        files = [p.relative_to(tmp).as_posix() for p in sorted(tmp.rglob("*")) if p.is_file()]
        write_manifest(tmp, files, {
            "bundle_format": BUNDLE_FORMAT, "kind": store.kind, "run": folder.label, "hook": store.hook,
            "model": spec.get("model"), "source": spec, "d_in": store.d_in, "d_sae": sae.cfg.d_sae,
            "n_rows": len(store), "n_docs": store.manifest.n_docs, "index_parts": parts,
            "sae": {"architecture": sae.architecture, "k": getattr(sae.cfg, "k", None),
                    "origin": getattr(getattr(sae, "metadata", None), "format", "saekit")},
            "analyze": cfg.to_dict(), "cooccurrence_exact": not istats.pairs_truncated,
            "has_logit_lens": bool(is_llm and W_U is not None and cfg.logit_lens),
            "has_token_text": bool(is_llm and tokenizer is not None), "dead": facts["dead"],
            "build_seconds": round(time.perf_counter() - t0, 3), "store_format_version": FORMAT_VERSION,
            "eval_report": (folder.eval / "report.json").exists(), "probe": has_probe,
            "outliers": outlier_facts(store, folder, facts["mostly_outliers"]), "preflight": preflight})
    log.info("bundle for %s: %d features (%d dead) over %d rows in %.1f s", folder.label, sae.cfg.d_sae,
             facts["dead"], len(store), time.perf_counter() - t0)
    return out


def write_probe_section(folder: RunFolder, out: Path) -> bool:
    """Summarise the run's probe report (RUN/probe/report.json) into the bundle's probe.json; False when none."""
    src = folder.probe / "report.json"
    if not src.exists():
        return False
    atomic_write_json(out / PROBE_FILE, probe_summary(read_json(src)))
    return True


def attach_explanations(bundle_dir: str | Path, rows: list[dict], summary: dict) -> Path:
    """Add `saekit explain`'s table to a built bundle (additive: one more file, listed with its sha256
    in the manifest, plus the run's explanation summary under `explanations`); returns the file."""
    import pandas as pd

    from saekit.browser.bundle import EXPLANATIONS_TABLE

    bundle_dir = Path(bundle_dir)
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    atomic_write_bytes(bundle_dir / EXPLANATIONS_TABLE, buf.getvalue())
    manifest = read_json(bundle_dir / MANIFEST)
    manifest["files"][EXPLANATIONS_TABLE] = sha256_file(bundle_dir / EXPLANATIONS_TABLE)
    manifest["explanations"] = {k: summary.get(k) for k in ("backend", "judge", "explained", "skipped", "scores", "ledger")}
    atomic_write_json(bundle_dir / MANIFEST, manifest)
    return bundle_dir / EXPLANATIONS_TABLE


def read_bundle_manifest(path: str | Path) -> BundleManifest:
    return read_json(Path(path) / MANIFEST)
