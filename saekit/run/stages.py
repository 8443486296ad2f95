"""The main job as plain calls: cache → train → evaluate → analyze, each resumable on its own.

A run folder holds everything one config produced:

    <output_dir>/config.yaml   the resolved config
    <output_dir>/store/        the activation cache (one store per hook)
    <output_dir>/train/        checkpoints, metrics.jsonl, final_sae/ (one per hook and SAE)
    <output_dir>/eval/         report.json, figures
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import torch

from saekit.artifacts import atomic_write_bytes
from saekit.config import Config, param
from saekit.data.corpus import load_documents
from saekit.errors import ConfigError
from saekit.sources.base import make_source
from saekit.store.reader import ActivationStore
from saekit.store.run import ActivationRunConfig
from saekit.store.writer import cache_activations

log = logging.getLogger(__name__)


@dataclass
class EvalConfig(Config):
    """How a trained SAE is evaluated on held-out documents."""

    holdout: float = param(0.1, "fraction of documents held out of training for evaluation", ge=0, lt=1)
    max_rows: int = param(0, "evaluate on at most this many held-out rows (0 = all)", ge=0)
    batch_rows: int = param(4096, "rows per evaluation batch", ge=1)
    description_length: bool = param(True, "compute the MDL description-length sweep")
    splice_docs: int = param(48, "held-out documents for the splice-in LM loss (LLM runs; 0 = skip)", ge=0)
    splice_batch: int = param(8, "documents per splice-in forward pass", ge=1)
    retrieval_rows: int = param(2000, "held-out rows for recall@k (embedding runs)", ge=0)
    retrieval_k: int = param(10, "k of recall@k", ge=1)


@dataclass
class ProbeConfig(Config):
    """Sparse probing of a corpus label after training (SAE features vs neurons)."""

    label: str = param("", "document label to probe (e.g. sentiment); empty = skip probing")
    positive: str | None = param(None, "the positive class (one vs rest); None = the most frequent class")
    ks: list[int] = param([1, 2, 5, 10, 20], "numbers of features to probe with")
    max_rows: int = param(20000, "rows used (whole documents, sampled deterministically)", ge=100)
    test_frac: float = param(0.3, "fraction of documents in the probe's test split", gt=0, lt=1)


@dataclass
class RunConfig(ActivationRunConfig):
    """One run: which text, which model and hooks, where to store, what SAE to train and how."""

    sae: dict[str, Any] = param({}, "the SAE: `architecture` plus that architecture's config fields")
    train: dict[str, Any] = param({}, "trainer settings (see saekit.train.TrainConfig)")
    eval: EvalConfig = param(default_factory=EvalConfig, doc="evaluation on held-out documents")
    analyze: dict[str, Any] = param({}, "feature-browser bundle settings (saekit.analysis.features.AnalyzeConfig)")
    probe: ProbeConfig = param(default_factory=ProbeConfig, doc="sparse probing after training")

    def validate(self) -> None:
        if self.train:
            self.train_config()
        if self.analyze:
            from saekit.analysis.features import AnalyzeConfig

            AnalyzeConfig.from_dict(self.analyze, where="analyze")
        if self.sae and "architecture" not in self.sae:
            raise ConfigError("sae: missing required key 'architecture' (e.g. topk, mp, mdl)")

    def train_config(self):
        from saekit.train import TrainConfig

        return TrainConfig.from_dict(self.train, where="train")


def load_run_config(path: str | Path, strict: bool = True) -> RunConfig:
    return RunConfig.from_yaml(path, strict=strict)


def save_resolved(cfg: RunConfig) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cfg.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(redact=True), sort_keys=False).encode())


def cache_stage(cfg: RunConfig, rank: int = 0, world_size: int = 1) -> dict[str, ActivationStore]:
    """Fill the run's activation stores (resuming a partial cache); returns hook -> store."""
    save_resolved(cfg) if rank == 0 else None
    docs = load_documents(cfg.corpus)
    source = make_source(cfg.source)
    kwargs = {}
    if world_size > 1:
        n_shards = max(1, -(-len(docs) // cfg.store.docs_per_shard))
        kwargs = {"shard_range": range(rank, n_shards, world_size), "manifest_name": f"manifest.rank-{rank}.json"}
    paths = cache_activations(source, docs, cfg.store_dir, cfg.store, **kwargs)
    if world_size > 1:
        return {}
    return {h: ActivationStore(p) for h, p in paths.items()}


def store_summary(store: ActivationStore) -> dict:
    m = store.manifest
    return {"store": str(store.path), "hook": store.hook, "kind": store.kind, "model": m["source"]["model"],
            "rows": len(store), "d_in": store.d_in, "docs": m["n_docs"], "shards": len(m["shards"]),
            "complete": store.complete}


def run_store(cfg: RunConfig, hook: str | None = None) -> ActivationStore:
    hook = hook or (cfg.source.hooks[0] if cfg.source.kind != "embedding" else None)
    return ActivationStore(cfg.store_dir, hook=hook)


def train_stage(cfg: RunConfig):
    """Train the run's SAE on the training documents of its store (resuming a partial run)."""
    from saekit.train.distributed import train_run

    if not cfg.sae or not cfg.train:
        raise ConfigError("run config: the train stage needs `sae` and `train` sections")
    torch.manual_seed(cfg.seed)
    return train_run(cfg, resume="auto")


def heldout_batches(store: ActivationStore, rows: torch.Tensor, batch_rows: int, max_rows: int = 0):
    rows = rows[:max_rows] if max_rows else rows
    return [rows[i: i + batch_rows] for i in range(0, len(rows), batch_rows)]


def eval_stage(cfg: RunConfig, sae=None) -> dict:
    """Evaluate the trained SAE on held-out documents; write RUN/eval/report.json, table and figures."""
    from saekit.eval.report import attach_downstream, evaluate_sae, format_report, write_report
    from saekit.sae.registry import load_sae

    store = run_store(cfg)
    sae = sae or load_sae(cfg.run_dir / "train")
    _, held = store.split_by_document(cfg.eval.holdout, seed=cfg.seed)
    chunks = heldout_batches(store, held, cfg.eval.batch_rows, cfg.eval.max_rows)
    report = evaluate_sae(sae, lambda: (store[c] for c in chunks), description_length=cfg.eval.description_length,
                          retrieval_rows=cfg.eval.retrieval_rows if store.kind == "embedding" else 0,
                          retrieval_k=cfg.eval.retrieval_k, progress=True)
    report["run"] = {"name": cfg.name, "store": str(store.path), "heldout_rows": int(len(held))}
    if store.kind != "embedding" and cfg.eval.splice_docs:
        attach_downstream(report, "splice_in", splice_stage(cfg, store, sae, held))
    write_report(report, cfg.run_dir / "eval")
    log.info("\n%s", format_report(report))
    return report


def splice_stage(cfg: RunConfig, store: ActivationStore, sae, held_rows: torch.Tensor) -> dict:
    from saekit.eval.splice import splice_lm_loss
    from saekit.sources.models import load_lens, load_lm

    doc_ids = torch.unique(store.meta("doc_id")[held_rows]).tolist()[: cfg.eval.splice_docs]
    texts = [store.docs[d]["text"] for d in doc_ids]
    spec = store.manifest["source"]
    model = load_lens(cfg.source.model) if spec["kind"] == "lens" else load_lm(cfg.source.model)[0]
    tok = load_lm(cfg.source.model)[1]
    mean_D = sum(c.double().sum(0) for _, c in store.iter_chunks(65536)) / len(store)
    return splice_lm_loss(model, tok, store.hook, sae, texts, mean_acts_D=mean_D,
                          max_length=cfg.source.max_length, batch_size=cfg.eval.splice_batch)


def run_all(cfg: RunConfig) -> dict:
    """The main job for one config: cache → train → evaluate (→ browser bundle when available)."""
    cache_stage(cfg)
    result = train_stage(cfg)
    report = eval_stage(cfg, None)
    if cfg.probe.label:
        probe_stage(cfg)
    bundle = analyze_stage(cfg)
    return {"run_dir": str(cfg.run_dir), "final_sae": str(result.final_sae), "report": report, "bundle": str(bundle)}


def probe_stage(cfg: RunConfig) -> dict:
    """k-sparse probes of a corpus label on the SAE's latents vs raw neurons; RUN/probe/<label>.json + plot."""
    from saekit.analysis.probing import format_probe_table, probe_sweep, write_probe_report
    from saekit.sae.registry import load_sae

    p = cfg.probe
    report = probe_sweep(run_store(cfg), p.label, sae=load_sae(cfg.run_dir / "train"), ks=p.ks, test_frac=p.test_frac,
                         seed=cfg.seed, max_rows=p.max_rows, positive=p.positive)
    write_probe_report(report, cfg.run_dir / "probe")
    log.info("\n%s", format_probe_table(report))
    return report


def analyze_stage(cfg: RunConfig) -> Path:
    """Build the read-only feature-browser bundle of the run (RUN/bundle)."""
    from saekit.analysis.features import AnalyzeConfig
    from saekit.browser.build import build_bundle

    return build_bundle(cfg.run_dir, AnalyzeConfig.from_dict(cfg.analyze, where="analyze"))
