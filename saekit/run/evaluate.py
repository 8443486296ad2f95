"""The evaluation stage: the trained SAE on held-out documents (ordinary rows as the headline,
massive-activation outliers apart), the training-vs-held-out gap, splice-in loss on the model, and
`saekit eval` of any SAE folder against any store. Split from `stages.py`, which runs it in the main job.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from saekit.artifacts import read_json
from saekit.errors import ConfigError
from saekit.eval.preflight import preflight
from saekit.layout import EVAL, RunFolder
from saekit.run.config import RunConfig, load_run_config
from saekit.run.outliers import chunked, eval_rows
from saekit.sae.base import SparseAutoencoder
from saekit.sae.registry import load_sae
from saekit.store.locate import store_for_hook
from saekit.store.reader import ActivationStore
from saekit.train.validation import evenly_spaced
from saekit.run.folders import checked_sae_and_store, run_store

log = logging.getLogger(__name__)


def heldout_batches(rows: torch.Tensor, batch_rows: int, max_rows: int = 0) -> list[torch.Tensor]:
    rows = rows[:max_rows] if max_rows else rows
    return [rows[i: i + batch_rows] for i in range(0, len(rows), batch_rows)]


def eval_stage(cfg: RunConfig, sae: SparseAutoencoder | None = None, force: bool = False) -> dict:
    """Evaluate the trained SAE on held-out documents; write RUN/eval/report.json, table and figures.
    The preflight (d_in, model, hook, first FVU) runs first and its record goes into the report."""
    from saekit.eval.report import attach_downstream, evaluate_sae, write_report
    from saekit.eval.report_text import format_report

    run_store(cfg)  # a store never cached: StoreMissingError naming `saekit cache`, before the SAE is looked for
    sae, store, checked = checked_sae_and_store(cfg.folder, sae=sae, force=force)
    train_rows, held = store.split_by_document(cfg.eval.holdout, seed=cfg.seed)
    held = held[: cfg.eval.max_rows] if cfg.eval.max_rows else held
    split = eval_rows(store, held)  # the headline is the ordinary rows'; outliers are reported apart
    chunks = heldout_batches(split.ordinary, cfg.eval.batch_rows)
    doc_N = store.meta("doc_id")  # the intervals resample whole documents
    report = evaluate_sae(sae, lambda: ((store[c], doc_N[c]) for c in chunks),
                          description_length=cfg.eval.description_length,
                          retrieval_rows=cfg.eval.retrieval_rows if store.kind == "embedding" else 0,
                          retrieval_k=cfg.eval.retrieval_k, progress=True)
    attach_outliers(report, sae, store, split, cfg.eval.batch_rows)
    report["run"] = {"name": cfg.name, "store": str(store.path), "heldout_rows": int(len(held))}
    generalisation_stage(cfg, store, sae, train_rows, report)
    report["preflight"] = checked.to_dict()
    if store.kind != "embedding" and cfg.eval.splice_docs:
        attach_downstream(report, "splice_in", splice_stage(cfg, store, sae, held))
    write_report(report, cfg.folder.eval)
    log.info("\n%s", format_report(report))
    return report


def attach_outliers(report: dict, sae: SparseAutoencoder, store: ActivationStore, split, batch_rows: int) -> dict:
    """The report's `row_set` (which rows the headline covers) and `outliers` (their own figures)."""
    from saekit.eval.reconstruction import RunningMoments
    from saekit.eval.report import outlier_section

    moments = RunningMoments(0, torch.zeros(store.d_in, dtype=torch.float64), torch.zeros(store.d_in, dtype=torch.float64))
    for c in chunked(split.ordinary, batch_rows):
        moments.update(store[c])
    report["row_set"] = split.row_set(len(split.ordinary) + len(split.outliers))
    doc_N = store.meta("doc_id")
    report["outliers"] = outlier_section(sae, [(store[c], doc_N[c]) for c in chunked(split.outliers, batch_rows)],
                                         split.rule,
                                         headline=report, ordinary_moments=moments)
    return report


def generalisation_stage(cfg: RunConfig, store: ActivationStore, sae: SparseAutoencoder, train_rows: torch.Tensor,
                         report: dict) -> dict | None:
    """Evaluate a fixed sample of training rows beside the held-out ones and attach the gap (with
    the training's own record: epochs, the exported step) to the report; warn when it is large."""
    from saekit.eval.report import attach_generalisation, evaluate_sae

    if not cfg.eval.train_rows or len(train_rows) < 2 or report["n_rows"] < 2:
        return None
    rows = evenly_spaced(eval_rows(store, train_rows).ordinary, cfg.eval.train_rows)  # as the headline: ordinary rows
    train_report = evaluate_sae(sae, heldout_batches(store[rows], cfg.eval.batch_rows))
    summary = cfg.folder.train_summary()
    training = read_json(summary) if summary.exists() else None
    gen = attach_generalisation(report, train_report, cfg.eval.gap_ratio, cfg.eval.gap_abs, training)
    if gen["warning"]:
        log.warning("%s: %s", cfg.name, gen["warning"])
    return gen


def splice_stage(cfg: RunConfig, store: ActivationStore, sae: SparseAutoencoder, held_rows: torch.Tensor) -> dict:
    from saekit.eval.splice import splice_lm_loss
    from saekit.sources.models import load_for_spec

    doc_ids = splice_documents(store.meta("doc_id")[held_rows], cfg.eval.splice_docs, cfg.eval.splice_tokens)
    texts = [store.docs[d]["text"] for d in doc_ids]
    model, tok = load_for_spec({**store.manifest["source"], "model": cfg.source.model})
    # the mean-ablation baseline is the mean of the ordinary rows (outlier positions are passed through)
    ordinary_N = ~store.outlier_mask()
    mean_D = sum(c[ordinary_N[lo: lo + len(c)]].double().sum(0) for lo, c in store.iter_chunks(65536)) \
        / max(int(ordinary_N.sum()), 1)
    # outlier positions (norm above the store's threshold) and, when the store left them out,
    # special tokens keep their own activation: the SAE was neither trained nor is it judged on them
    spec = store.manifest["source"]
    special = set(tok.all_special_ids) if spec.get("exclude_special", True) else set()
    return splice_lm_loss(model, tok, store.hook, sae, texts, mean_acts_D=mean_D,
                          max_length=cfg.source.max_length, batch_size=cfg.eval.splice_batch,
                          passthrough_norm=store.outlier_threshold(), passthrough_ids=special)


def splice_documents(doc_N: torch.Tensor, max_docs: int, min_tokens: int) -> list[int]:
    """Held-out documents for the splice-in loss, in id order: enough that their stored rows (about
    their tokens) reach `min_tokens`, at most `max_docs`. Why: the loss-recovered interval narrows
    with the tokens measured (~±0.025 at 48 short documents, issue 16)."""
    ids, counts = torch.unique(doc_N, return_counts=True)
    reach = int(torch.searchsorted(torch.cumsum(counts, 0), torch.tensor(min_tokens)).item()) + 1
    return ids[: min(max_docs, reach)].tolist()


def eval_target(target: str | Path, store: str | Path | None = None, max_rows: int = 0,
                out: str | Path | None = None, force: bool = False) -> tuple[dict, Path]:
    """Evaluate what `saekit eval TARGET` names: a run config YAML, a run folder, or a bare SAE
    folder (saekit or another tool's files) with a store. Returns (report, folder the report was
    written to). The preflight checks the SAE against the store first; `force` accepts a model alias."""
    from saekit.eval.report import evaluate_sae, write_report

    if max_rows < 0:
        raise ConfigError(f"max_rows (--max-rows): expected >= 0 (0 = all rows), found {max_rows}")
    target = Path(target)
    if target.suffix in (".yaml", ".yml") or (RunFolder(target).config.exists() and store is None):
        cfg = load_run_config(target)
        if not isinstance(cfg, RunConfig):
            raise ConfigError(f"{target}: a multi-SAE run; evaluate one of its SAEs with "
                              f"`saekit eval {cfg.folder.train('NAME')} --store {cfg.store_dir}`")
        return eval_stage(cfg, force=force), cfg.folder.eval
    if store is None:
        raise ConfigError(f"{target}: expected a run folder (with {RunFolder(target).config.name}) or a run config "
                          f"YAML, found {'no such file or folder' if not target.exists() else 'neither'}; "
                          "to evaluate a bare SAE folder pass --store STORE")
    sae = load_sae(target)
    acts = store_for_hook(store, sae.cfg.hook_name or None)
    checked = preflight(sae, acts, force=force)
    split = eval_rows(acts, torch.arange(min(len(acts), max_rows or len(acts))))
    doc_N = acts.meta("doc_id")
    chunks = [(acts[c], doc_N[c]) for c in chunked(split.ordinary, 4096)]
    report = evaluate_sae(sae, chunks, description_length=True,
                          retrieval_rows=2000 if acts.kind == "embedding" else 0)
    attach_outliers(report, sae, acts, split, 4096)
    report["preflight"] = checked.to_dict()
    out = Path(out or (target if target.is_dir() else target.parent) / EVAL)  # beside a bare SAE folder
    write_report(report, out)
    return report, out
