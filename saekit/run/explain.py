"""`saekit explain RUN`: explanations and scores for every feature of a run's bundle.

Why from the bundle: it already holds, per feature, the top examples and the samples across
activation intervals (with their token windows), and its latent index says which features fire on
any row — everything an explainer and the scorers need, without re-encoding the store or holding the
code matrix. Records are streamed one at a time (`Bundle.iter_records`), so memory does not grow with
the number of latents.

Writes `RUN/explanations/[<sae>/]`: `explanations.jsonl` (one line per feature: explanation, terms,
scores and ledger, or `skipped` with the reason), `summary.json` (counts, mean scores with 95%
intervals, the ledger's totals), `cache/` (chat prompts and responses by content hash); and adds the
table to the bundle (`explanations.parquet`, the manifest's `explanations`).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np

from saekit.analysis.explain.cache import CachedChat, ChatCache
from saekit.analysis.explain.llm import ChatExplainer, ChatJudge
from saekit.analysis.explain.ngram import NgramExplainer, build_background
from saekit.analysis.explain.protocol import ExplainConfig, from_record
from saekit.analysis.explain.runner import NegativePool, Plan, explain_records, read_explanations, write_summary
from saekit.analysis.explain.scorers import DetectionScorer, EmbeddingScorer, FuzzingScorer, KeywordJudge
from saekit.browser.build import attach_explanations
from saekit.browser.bundle import Bundle
from saekit.artifacts import MANIFEST, read_json
from saekit.errors import ConfigError, MissingArtifactError, ModelNotAvailableError
from saekit.layout import RunFolder

log = logging.getLogger(__name__)
POOL_CONTEXTS = 1024  # non-activating candidates kept (from the background sample's records)
OUTPUT = "explanations.jsonl"
SUMMARY = "summary.json"
CACHE = "cache"


def chat_backend(kind: str, cfg: ExplainConfig, cache_dir: Path) -> CachedChat:
    """The config's chat backend behind the on-disk cache."""
    if kind == "openai":
        from saekit.analysis.explain.openai import OpenAIChat

        backend = OpenAIChat(cfg.base_url, cfg.model, cfg.api_key_env, requests_per_minute=cfg.requests_per_minute,
                             concurrency=cfg.concurrency, retries=cfg.retries, timeout_s=cfg.timeout_s,
                             backoff_s=cfg.backoff_s, max_tokens=cfg.max_tokens)
    elif kind == "local":
        from saekit.analysis.explain.local import LocalChat

        backend = LocalChat(cfg.model or "default", max_tokens=cfg.max_tokens)
    else:
        raise ConfigError(f"chat backend: expected openai or local, found {kind!r}")
    return CachedChat(backend, ChatCache(cache_dir))


def live_features(bundle: Bundle) -> np.ndarray:
    df = bundle.table
    return df.loc[df["count"] > 0, "feature"].to_numpy()


def background_records(bundle: Bundle, n: int, seed: int) -> list[dict]:
    """A seeded sample of live features' records: their contexts are the n-gram background and the pool
    of non-activating candidates."""
    live = live_features(bundle).tolist()
    pick = sorted(random.Random(seed).sample(live, min(n, len(live))))
    return list(bundle.iter_records(pick))


def index_fires(bundle: Bundle):
    """(feature, rows) -> bool [n]: whether the feature is active at those store rows (the latent index)."""
    def fires(f: int, rows: np.ndarray) -> np.ndarray:
        idx, val = bundle.index.rows(np.clip(rows, 0, len(bundle.index) - 1))
        return ((idx == f) & (val > 0)).any(1)
    return fires


def make_plan(bundle: Bundle, cfg: ExplainConfig, cache_dir: Path, embed=None, features=None) -> Plan:
    """Explainer, judge, scorers and the negative pool for one bundle; the embedding scorer runs on a seeded
    sample of the live features among `features` (default: all)."""
    bg_recs = background_records(bundle, cfg.background, cfg.seed)
    contexts = [(int(r["feature"]), c) for r in bg_recs for c in from_record(r).examples]
    bg = build_background(c for _, c in contexts)
    pool = random.Random(cfg.seed).sample(contexts, min(POOL_CONTEXTS, len(contexts)))
    chats: dict[str, CachedChat] = {}

    def chat(kind: str) -> CachedChat:
        if kind not in chats:
            chats[kind] = chat_backend(kind, cfg, cache_dir)
        return chats[kind]

    explainer = (NgramExplainer(bg, cfg.max_terms, seed=cfg.seed) if cfg.backend == "ngram"
                 else ChatExplainer(chat(cfg.backend), cfg.n_explain, cfg.seed))
    judge = KeywordJudge() if cfg.judge == "keyword" else ChatJudge(chat(cfg.judge))
    known = {"detection": lambda: DetectionScorer(judge), "fuzzing": lambda: FuzzingScorer(judge, cfg.seed)}
    unknown = [s for s in cfg.scorers if s not in known]
    if unknown:
        raise ConfigError(f"explain.scorers: expected names from {sorted(known)}, found {unknown}")
    plan = Plan(explainer, [known[s]() for s in cfg.scorers], NegativePool(pool, index_fires(bundle)), cfg, chats=chats)
    if cfg.embedding_features and embed is not False:
        embed = embed or default_embed()
        if embed is not None:
            live = live_features(bundle).tolist()
            live = [f for f in live if f in set(features)] if features is not None else live
            plan.extra = {"embedding": EmbeddingScorer(embed)}
            plan.extra_features = set(random.Random(cfg.seed + 1).sample(live, min(cfg.embedding_features, len(live))))
    return plan


def default_embed():
    """MiniLM (the embedded all-MiniLM-L6-v2) as `texts -> unit rows`; None (logged) when unavailable."""
    from saekit.sources.models import load_embedder

    try:
        model = load_embedder("default")
    except (ModelNotAvailableError, ImportError) as e:  # no MiniLM package, or no sentence-transformers
        log.warning("no embedding scorer: %s", e)
        return None
    return lambda texts: model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)


def table_rows(path: Path) -> list[dict]:
    """The bundle's explanation table from explanations.jsonl (one row per feature, skipped ones too)."""
    rows = []
    for r in read_explanations(path):
        led, sc = r.get("ledger") or {}, r.get("scores") or {}
        rows.append({"feature": r["feature"], "explanation": r.get("explanation", ""), "skipped": r.get("skipped", ""),
                     "examples": r.get("examples", 0), "score_detection": sc.get("detection"),
                     "score_fuzzing": sc.get("fuzzing"), "score_embedding": sc.get("embedding"),
                     "backend": led.get("backend", ""), "requests": led.get("requests", 0),
                     "prompt_tokens": led.get("prompt_tokens", 0), "completion_tokens": led.get("completion_tokens", 0),
                     "seconds": led.get("seconds", 0.0), "cost": led.get("cost")})
    return rows


def explain_sae(folder: RunFolder, cfg: ExplainConfig, features=None, out: Path | None = None,
                attach: bool = True, embed=None) -> dict:
    """Explain and score one SAE's features (all of them, or `features`); returns the summary."""
    if not (folder.bundle / MANIFEST).exists():
        raise MissingArtifactError(f"{folder.root}: expected a feature-browser bundle at {folder.bundle}, found none",
                                   fix=f"saekit analyze {folder.root}")
    bundle = Bundle(folder.bundle)
    out = Path(out) if out else folder.explanations
    feats = None if features is None else [int(f) for f in features]
    bad = [f for f in feats or [] if not 0 <= f < bundle.d_sae]
    if bad:
        raise ConfigError(f"--features: expected ids in [0, {bundle.d_sae}), found {bad[:5]}")
    plan = make_plan(bundle, cfg, out / CACHE, embed, feats)
    threads = cfg.concurrency if plan.chats else 1
    summary = explain_records(bundle.iter_records(feats), plan, out / OUTPUT,
                              total=len(feats) if feats is not None else bundle.d_sae, threads=threads)
    summary.update({"run": folder.label, "sae_weights_sha256": sae_identity(folder), "requests_sent": sum(c.sent for c in plan.chats.values()),
                    "cache_hits": sum(c.hits for c in plan.chats.values())})
    write_summary(out / SUMMARY, summary)
    if attach:
        attach_explanations(bundle.path, table_rows(out / OUTPUT), summary)
    return summary


def sae_identity(folder: RunFolder) -> str | None:
    """The sha256 of the SAE's weights (its saekit manifest), so a rebuilt bundle can tell whether the
    explanations on disk were written for the SAE it shows; None when the folder has no manifest."""
    manifest = folder.final_sae() / MANIFEST
    if not manifest.exists():
        return None
    return read_json(manifest).get("files", {}).get("sae_weights.safetensors")


def reattach_explanations(folder: RunFolder) -> bool:
    """After `saekit analyze` rebuilt the bundle: put the explanation table back when RUN/explanations
    was written for this very SAE (same weights sha256); explanations of another SAE are left out,
    with a warning that says how to redo them. True when attached."""
    out = folder.explanations
    if not (out / OUTPUT).exists() or not (out / SUMMARY).exists():
        return False
    summary = read_json(out / SUMMARY)
    current = sae_identity(folder)
    if current is None or summary.get("sae_weights_sha256") != current:
        log.warning("%s: the explanations in %s were written for another SAE (weights sha256 %s, now %s); "
                    "the bundle has none until `saekit explain %s`", folder.label, out,
                    summary.get("sae_weights_sha256"), current, folder.root)
        return False
    attach_explanations(folder.bundle, table_rows(out / OUTPUT), summary)
    return True


def explain_run(run: str | Path | RunFolder, cfg: ExplainConfig | None = None, features=None,
                out: str | Path | None = None, attach: bool = True, embed=None) -> list[dict]:
    """`explain_sae` for every SAE of the run (one for a single run); `out` only for a single SAE."""
    folder = (run if isinstance(run, RunFolder) else RunFolder(Path(run))).require_run()
    targets = [folder] if folder.sae else folder.per_sae()
    if out is not None and len(targets) > 1:
        raise ConfigError(f"{folder.root} holds {len(targets)} SAEs; --out names one folder, choose one SAE")
    cfg = cfg or ExplainConfig()
    return [explain_sae(t, cfg, features, out, attach, embed) for t in targets]
