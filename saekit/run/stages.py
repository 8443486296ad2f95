"""The main job as plain calls: cache → train → evaluate → probe → analyze → explain, each resumable on its own.

Why here, at the top of the library: a stage turns a run config into calls of the layers below it
(data, sources, store, sae, train, eval, analysis, browser) and writes into the run folder, so it is
the one place allowed to know all of them. Where each part of a run lives is `saekit.layout.RunFolder`'s
answer; nothing here joins path strings. The trainer (`saekit.train`) never sees a run config: the
stages build the SAE from the store's facts and hand it batches. A run of an SAE you already have
(`sae: {from: PATH}`) imports it in place of training. Every stage that puts an SAE to a store opens them
through `checked_sae_and_store` (run/folders.py), so the preflight (d_in, hook, model, first FVU) runs before
any work. The evaluation stage lives in run/evaluate.py.

A run folder, once more (see `saekit.layout`): config.yaml, store/ (or the config's `store.path`),
train/ (train/<name>/ for each SAE of a multi-SAE run), eval/, probe/, steer/, bundle/ (per SAE).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from saekit.analysis.features import AnalyzeConfig
from saekit.data.streaming import open_documents
from saekit.errors import ConfigError, EmptyDataError, SaekitError
from saekit.eval.preflight import preflight
from saekit.layout import RunFolder
from saekit.run.config import ActivationRunConfig, RunConfig, load_run_config
from saekit.run.evaluate import (attach_outliers, eval_stage, eval_target, generalisation_stage,  # noqa: F401
                                 heldout_batches, splice_documents, splice_stage)
from saekit.run.folders import (as_folder, checked_sae_and_store, configured_force,  # noqa: F401
                                open_sae_and_store, require_complete, require_rows, run_store, save_resolved,
                                store_summary)
from saekit.run.outliers import eval_rows, read_training_rows, training_rows, write_training_rows
from saekit.sae.base import SparseAutoencoder
from saekit.sae.registry import create, load_sae, save_sae
from saekit.sources.factory import make_source
from saekit.store.locate import store_for_hook
from saekit.store.reader import ActivationStore
from saekit.store.writer import cache_activations, merge_manifests, prepare_store
from saekit.train.distributed import current_sync
from saekit.train.loop import TrainResult, train
from saekit.train.validation import evenly_spaced

log = logging.getLogger(__name__)


# -- cache ---------------------------------------------------------------------------------------
def cache_stage(cfg: ActivationRunConfig, rank: int = 0, world_size: int = 1) -> dict[str, ActivationStore]:
    """Fill the run's activation stores (resuming a partial cache); returns hook -> store."""
    save_resolved(cfg) if rank == 0 else None
    docs = open_documents(cfg.corpus)  # file and hub corpora stay in Arrow until a shard is cached
    source = make_source(cfg.source)
    kwargs = {}
    if world_size > 1:
        n_shards = max(1, -(-len(docs) // cfg.store.docs_per_shard))
        kwargs = {"shard_range": range(rank, n_shards, world_size), "manifest_name": f"manifest.rank-{rank}.json"}
    paths = cache_activations(source, docs, cfg.store_dir, cfg.store, **kwargs)
    if world_size > 1:
        return {}
    return {h: ActivationStore(p) for h, p in paths.items()}


def cache_distributed(cfg: ActivationRunConfig, rank: int, world_size: int) -> dict:
    """Each rank fills its shards (shard s goes to rank s % world_size) with its own partial
    manifest `manifest.rank-R.json`; after a barrier rank 0 merges them into one manifest per hook.
    Resuming re-runs the same command: each rank skips the shards its partial manifest lists.

    Rank 0 first creates (or checks) the store alone (`prepare_store`), then every rank runs
    `cache_stage(cfg, rank, world_size)`. Returns hook -> summary on rank 0."""
    if rank == 0:
        prepare_store(make_source(cfg.source), open_documents(cfg.corpus), cfg.store_dir, cfg.store)
    dist.barrier()
    cache_stage(cfg, rank, world_size)
    dist.barrier()
    summaries = {}
    if rank == 0:
        merge_manifests(cfg.store_dir)
        for h in cfg.source.hooks or [None]:
            store = ActivationStore(cfg.store_dir, hook=h)
            summaries[store.hook] = store_summary(store)
    dist.barrier()
    return summaries


# -- train ---------------------------------------------------------------------------------------
def create_sae_for(fields: dict[str, Any], d_in: int, hook: str, source_spec: dict, seed: int,
                   dataset: str = "") -> SparseAutoencoder:
    """An SAE of the config's `sae:` fields, with the facts of the activations it will read (d_in,
    hook, model, context size, corpus) filled in; the config's own fields win. Shared by single and
    multi-SAE runs so both write the same metadata into cfg.json."""
    facts = {"d_in": d_in, "hook_name": hook, "model_name": str(source_spec.get("model", "")),
             "context_size": int(source_spec.get("max_length", 0) or 0), "dataset_path": dataset, "seed": seed}
    return create({**facts, **fields})


def train_stage(cfg: RunConfig) -> TrainResult:
    """Train the run's SAE on the training documents of its store (resuming a partial run)."""
    if cfg.imports_sae:
        return train_run(cfg)  # raises: nothing to train
    if not cfg.sae or not cfg.train:
        raise ConfigError("run config: the train stage needs `sae` and `train` sections")
    torch.manual_seed(cfg.seed)
    return train_run(cfg, resume="auto")


def train_run(cfg: RunConfig, resume: bool | str = "auto", rank: int | None = None, world_size: int | None = None,
              callbacks: list | None = None) -> TrainResult:
    """Train the SAE of a RunConfig on its store into the run's train folder (this rank's share
    when a process group is initialised). Returns the TrainResult."""
    if cfg.imports_sae:
        raise ConfigError(f"run config {cfg.name}: `sae: {{from: {cfg.sae['from']}}}` uses an existing SAE; there is "
                          f"nothing to train (run `saekit run CONFIG`, or eval/probe/analyze the run folder)")
    sync = current_sync()
    rank = sync.rank if rank is None else rank
    world_size = sync.world_size if world_size is None else world_size
    store = require_rows(require_complete(ActivationStore(cfg.store_dir, hook=_single_hook(cfg))))
    tcfg = cfg.train_config()
    sae = create_sae_for(cfg.sae, store.d_in, store.hook, store.manifest["source"], cfg.seed, cfg.corpus.name)
    if torch.device(cfg.sae.get("device", "cpu")).type == "cuda" and dist.is_initialized():
        sae = sae.to(torch.device("cuda", torch.cuda.current_device()))
    # whole documents are held out for evaluation (cfg.eval.holdout); training never sees them, nor
    # (train.exclude_outliers) the store's massive-activation outliers: the loss and the input
    # normalisation estimate are then the ordinary rows'. Validation reads the held-out ordinary
    # rows, the rows the eval report's headline covers.
    train_rows, held_rows = store.split_by_document(cfg.eval.holdout, seed=cfg.seed)
    used = training_rows(store, train_rows, cfg.exclude_outliers)
    log.info("%s: %s", cfg.name, used.describe())
    if len(used.rows) == 0:
        raise EmptyDataError(f"{store.path}: 0 rows left to train on after holding out documents "
                             f"(eval.holdout={cfg.eval.holdout}) and outliers ({used.describe()}); "
                             f"expected at least one training row")
    if rank == 0:
        write_training_rows(cfg.folder.train_data(), used)
    batches = store.batches(tcfg.batch_size, seed=cfg.seed, rows=used.rows, rank=rank, world_size=world_size)
    val_rows = validation_rows(store, eval_rows(store, held_rows).ordinary, tcfg.val_rows if tcfg.eval_every else 0)
    return train(sae, batches, tcfg, cfg.folder.train(), callbacks=callbacks, resume=resume, val_batches=val_rows)


def validation_rows(store: ActivationStore, held_rows: torch.Tensor, max_rows: int) -> torch.Tensor | None:
    """The trainer's fixed validation sample: up to `max_rows` held-out rows, evenly spaced over the
    held-out documents of the same split the eval stage reads, so validation and evaluation agree.
    None when nothing is held out (cfg.eval.holdout = 0) or validation is off."""
    if max_rows <= 0 or len(held_rows) < 2:
        if max_rows > 0:
            log.warning("no held-out rows (eval.holdout=0?): training runs without validation")
        return None
    return store[evenly_spaced(held_rows, max_rows)]


def _single_hook(cfg: RunConfig) -> str | None:
    hooks = list(cfg.source.hooks)
    if cfg.sae.get("hook_name"):
        return cfg.sae["hook_name"]
    if len(hooks) > 1:
        raise ConfigError(f"the run caches several hooks {hooks}; set sae.hook_name to the one to train on, or use "
                          "a multi-SAE config (saekit.run.multi)")
    return None


# -- an SAE you already have ---------------------------------------------------------------------
def import_sae_stage(cfg: RunConfig) -> Path:
    """Put the config's existing SAE (`sae: {from: PATH}`: saekit, SAELens, sparsify, dictionary_learning or
    Gemma Scope files) into the run's final SAE place, in saekit format with its foreign metadata kept
    (metadata.json), so every later stage and the browser read it like an SAE the run trained."""
    if not cfg.imports_sae:
        raise ConfigError(f"run config {cfg.name}: expected `sae: {{from: PATH}}` to import an SAE, found none")
    source = Path(cfg.sae["from"]).resolve()
    sae = load_sae(source, strict=bool(cfg.sae.get("strict", True)))
    store = store_for_hook(cfg.store_dir, sae.cfg.hook_name or None)
    preflight(sae, store, force=bool(cfg.sae.get("force", False)))  # refuse before anything is written
    return save_sae(sae, cfg.folder.final_sae())


# -- probe, analyze ------------------------------------------------------------------------------
def probe_stage(cfg: RunConfig, force: bool = False) -> dict:
    """k-sparse probes of a corpus label on the SAE's latents vs raw neurons; RUN/probe/<label>.json + plot."""
    from saekit.analysis.probing import format_probe_table, probe_sweep, write_probe_report

    from saekit.eval.bootstrap import interval_fn

    p = cfg.probe
    sae, store, checked = checked_sae_and_store(cfg.folder, force=force)
    report = probe_sweep(store, p.label, sae=sae, ks=p.ks, test_frac=p.test_frac,
                         seed=cfg.seed, max_rows=p.max_rows, positive=p.positive, pooling=p.pooling,
                         classes="all" if p.one_vs_rest else None,
                         interval=interval_fn(p.resamples, cfg.seed) if p.resamples else None)
    report["preflight"] = checked.to_dict()
    write_probe_report(report, cfg.folder.probe)
    log.info("\n%s", format_probe_table(report))
    return report


def analyze_config_for(run: str | Path | RunFolder) -> AnalyzeConfig:
    """The `analyze:` section of the run's resolved config, or the defaults when it has none."""
    folder = as_folder(run)
    if not folder.config.exists():
        return AnalyzeConfig()
    return load_run_config(folder.config).analyze_config()


def analyze_stage(cfg: RunConfig, force: bool = False) -> Path:
    """Build the read-only feature-browser bundle of the run (RUN/bundle), after the preflight."""
    return analyze_run(cfg.folder, cfg.analyze_config(), force=force)[0]


def analyze_run(run: str | Path | RunFolder, cfg: AnalyzeConfig | None = None, out: str | Path | None = None,
                force: bool = False, **bundle_kwargs) -> list[Path]:
    """A bundle per SAE of the run (one for a single run); `out` only for a single SAE. Each SAE passes
    the preflight against its store first; the record goes into the bundle's manifest."""
    from saekit.browser.build import build_bundle

    folder = as_folder(run).require_run()
    cfg = cfg or analyze_config_for(folder)
    targets = [folder] if folder.sae else folder.per_sae()
    if out is not None and len(targets) > 1:
        raise ConfigError(f"{folder.root} holds {len(targets)} SAEs; --out names one bundle, choose one SAE")
    from saekit.run.explain import reattach_explanations

    checks = [checked_sae_and_store(t, force=force)[2] for t in targets]
    bundles = [build_bundle(t, cfg, out=out, preflight=c.to_dict(), **bundle_kwargs) for t, c in zip(targets, checks)]
    if out is None:  # the run's own bundle: keep the explanations already written for this SAE
        for t in targets:
            reattach_explanations(t)
    return bundles


def explain_stage(cfg: RunConfig) -> list[dict]:
    """Explain every feature of the run's bundle in words and score the explanations (the `explain:`
    section; by default the offline ngram backend with the keyword judge): RUN/explanations/ and the
    bundle's explanations table."""
    from saekit.run.explain import explain_run

    return explain_run(cfg.folder, cfg.explain_config())


def run_all(cfg: RunConfig) -> dict:
    """The main job for one config: cache → train (or import `sae.from`) → evaluate → (probe) → browser bundle
    → explanations (ngram by default, every feature)."""
    if cfg.imports_sae:
        final_sae = run_imported(cfg)
    else:
        cache_stage(cfg)
        final_sae = train_stage(cfg).final_sae
    report = eval_stage(cfg, None)
    if cfg.probe.label:
        probe_stage(cfg)
    bundle = analyze_stage(cfg)
    explained = explain_stage(cfg)
    return {"run_dir": str(cfg.run_dir), "final_sae": str(final_sae), "report": report, "bundle": str(bundle),
            "explanations": explained,
            "training_rows": read_training_rows(cfg.folder.train_data())}


def run_imported(cfg: RunConfig) -> Path:
    """A run of an existing SAE: cache only when the store is missing or incomplete (the store the config
    names may have been filled before, by any run of the same model), then import the SAE."""
    save_resolved(cfg)
    if not _store_complete(cfg):
        cache_stage(cfg)
    return import_sae_stage(cfg)


def _store_complete(cfg: RunConfig) -> bool:
    try:
        return store_for_hook(cfg.store_dir, _first_hook(cfg)).complete
    except SaekitError:  # no store (or no manifest) yet: cache it
        return False


def _first_hook(cfg: RunConfig) -> str | None:
    return cfg.source.hooks[0] if cfg.source.kind != "embedding" and cfg.source.hooks else None
