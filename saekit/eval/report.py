"""Evaluation report for an SAE: one streaming pass of metrics, a strict-JSON file, a table, figures.

    report = evaluate_sae(sae, batches, description_length=True, true_dictionary_GD=D)
    report = evaluate_sae(sae, batches, EvalOptions(retrieval_rows=2000))   # or an options record
    write_report(report, "runs/x/eval")      # report.json, report.txt, l0_histogram.png, feature_density.png
    attach_generalisation(report, evaluate_sae(sae, training_rows))   # training vs held-out, and the gap
    table = compare_table({"a": rep_a, "b": rep_b})   # a side-by-side text table

`batches` yields activation tensors `[..., d_in]` (or `(acts, ...)` tuples, as an
ActivationSource does). Memory is bounded by one batch plus per-dimension and per-latent
statistics; the description-length sweep needs a second pass, so it requires a re-iterable (a list,
a dataset) or a zero-argument function returning a fresh iterator.

The report's `downstream` section is where results that need a model (splice-in language-model
loss, computed through the hook adapter in `saekit.sources`) go; `attach_downstream` fills it.

Massive-activation outliers (`saekit.store.outliers`): a run evaluates its headline on the ordinary
rows and puts the outlier rows' own figures in `report["outliers"]` (`outlier_section`), with the
rule and the row counts in `report["row_set"]`; `compare_table` flags reports whose headlines cover
different row sets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.artifacts import atomic_write_bytes, atomic_write_json
from saekit.errors import ConfigError, ShapeMismatchError
from saekit.eval.bootstrap import (
    DEFAULT_RESAMPLES,
    Bootstrap,
    GroupedSums,
    fvu_from_sums,
    percentile_interval,
)
from saekit.eval.description_length import (
    DEFAULT_FVU_TOLERANCE,
    DEFAULT_PRECISIONS,
    DescriptionLengthAccumulator,
    LatentValueRange,
)
from saekit.eval.ground_truth import ground_truth_metrics
from saekit.eval.reconstruction import DEFAULT_DENSE_THRESHOLD, ReconstructionAccumulator, RunningMoments
from saekit.eval.report_plots import plot_density_histogram, plot_fvu_vs_l0, plot_l0_histogram  # noqa: F401
from saekit.eval.report_text import compare_table, format_report
from saekit.eval.retrieval import retrieval_metrics
from saekit.sae.base import SparseAutoencoder, inference_mode
from saekit.train.validation import GAP_ABS, GAP_RATIO, generalisation_gap

REPORT_FORMAT_VERSION = 1
REPORT_KIND = "saekit.eval_report"
RECON_KEYS = ("mse", "sse_per_row", "total_variance_per_row", "fvu", "explained_variance", "cosine_mean",
              "shrinkage_mean")


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def _acts(item: Any) -> Tensor:
    if isinstance(item, Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        return item[0]
    if isinstance(item, dict) and isinstance(item.get("acts"), Tensor):
        return item["acts"]
    raise ShapeMismatchError(f"evaluate_sae: expected batches of activation tensors [..., d_in] or (acts, ...) "
                             f"tuples, found {type(item).__name__}")


def _fresh(batches: Iterable | Callable[[], Iterable]) -> Iterator:
    return iter(batches()) if callable(batches) else iter(batches)


def _doc_ids(item: Any) -> Tensor | None:
    """The rows' document ids when the batch carries them ((acts, doc_id, ...) tuples or dicts)."""
    if isinstance(item, (tuple, list)) and len(item) > 1 and isinstance(item[1], Tensor):
        return item[1]
    if isinstance(item, dict) and isinstance(item.get("doc_id"), Tensor):
        return item["doc_id"]
    return None


def _limited_docs(batches: Iterable | Callable[[], Iterable], max_rows: int | None,
                  d_in: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    """(x_ND, doc_N or None) per batch, at most `max_rows` rows in all."""
    seen = 0
    for item in _fresh(batches):
        x, doc = _acts(item), _doc_ids(item)
        if x.shape[-1] != d_in:
            raise ShapeMismatchError(f"evaluate_sae: expected activations [..., d_in={d_in}], found {tuple(x.shape)}")
        x_ND = x.reshape(-1, d_in)
        if doc is not None and doc.numel() != x_ND.shape[0]:
            raise ShapeMismatchError(f"evaluate_sae: expected one doc id per row ({x_ND.shape[0]}), found {doc.numel()}")
        if max_rows is not None:
            x_ND = x_ND[: max_rows - seen]
            doc = None if doc is None else doc.reshape(-1)[: x_ND.shape[0]]
        if x_ND.shape[0] == 0:
            break
        seen += x_ND.shape[0]
        yield x_ND, doc
        if max_rows is not None and seen >= max_rows:
            break


def _limited(batches: Iterable | Callable[[], Iterable], max_rows: int | None, d_in: int) -> Iterator[Tensor]:
    for x_ND, _ in _limited_docs(batches, max_rows, d_in):
        yield x_ND


def sae_summary(sae: SparseAutoencoder) -> dict:
    cfg = sae.cfg
    return {"architecture": sae.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": getattr(cfg, "k", None),
            "model_name": cfg.model_name, "hook_name": cfg.hook_name}


@dataclass(frozen=True)
class EvalOptions:
    """What `evaluate_sae` measures. Reconstruction and sparsity always; each add-on pass reads its own fields."""

    max_rows: int | None = None
    dense_threshold: float = DEFAULT_DENSE_THRESHOLD
    description_length: bool = False  # the MDL sweep over dl_precisions (a second pass over the data)
    dl_precisions: tuple[int, ...] = DEFAULT_PRECISIONS
    fvu_tolerance: float = DEFAULT_FVU_TOLERANCE
    true_dictionary_GD: Tensor | None = None  # ground-truth recovery against planted atoms
    gt_threshold: float = 0.9
    retrieval_rows: int = 0  # > 0: recall@k on the first rows (embedding SAEs), held in memory
    retrieval_k: int = 10
    device: str | torch.device | None = None
    progress: bool = False
    bootstrap_resamples: int = DEFAULT_RESAMPLES  # 0 = no intervals
    bootstrap_seed: int = 0


@dataclass
class FirstPass:
    """What the streaming reconstruction pass leaves for the add-on passes."""

    recon: dict  # ReconstructionAccumulator.result()
    ranges: LatentValueRange | None  # per-latent value ranges, for the description-length grid
    kept_x: list[Tensor] = field(default_factory=list)  # the first retrieval_rows rows and reconstructions
    kept_r: list[Tensor] = field(default_factory=list)
    kept_doc: list[Tensor] = field(default_factory=list)  # the kept rows' units (for recall@k's interval)
    grouped: GroupedSums = field(default_factory=GroupedSums)  # per-document sums (the intervals)
    shift_D: Tensor | None = None  # a fixed shift (the first batch's mean) for the centred sums


def evaluate_sae(sae: SparseAutoencoder, batches: Iterable | Callable[[], Iterable],
                 options: EvalOptions | None = None, **fields: Any) -> dict:
    """Evaluate `sae` over `batches` and return the report dict (strict-JSON serialisable).

    `options` (or its fields as keywords: `description_length=True`, `true_dictionary_GD=D`,
    `retrieval_rows=2000`, ...) chooses the add-on passes; see `EvalOptions`. The SAE runs in eval
    mode without gradient; its previous mode is restored.
    """
    opts = dataclasses.replace(options or EvalOptions(), **fields)
    if opts.description_length and not callable(batches) and iter(batches) is batches:
        raise ConfigError("evaluate_sae: description_length needs two passes over the data; pass a re-iterable "
                          "(list, dataset) or a function returning a fresh iterator, not a one-shot iterator")
    dev = torch.device(opts.device) if opts.device is not None else \
        next(iter(sae.parameters()), torch.zeros(())).device
    with inference_mode(sae):
        first = reconstruction_pass(sae, batches, opts, dev)
        report = _report(sae, first.recon)
        attach_intervals(report, first, opts, sae.cfg.d_in)
        report["ground_truth"] = ground_truth_pass(sae, opts)
        report["retrieval"] = retrieval_pass(first, opts)
        report["description_length"] = description_length_pass(sae, batches, first, opts, dev)
    return report


def _progress(items: Iterator[Tensor], desc: str, opts: EvalOptions) -> Iterator[Tensor]:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not opts.progress, unit="batch")


def reconstruction_pass(sae: SparseAutoencoder, batches: Iterable | Callable[[], Iterable], opts: EvalOptions,
                        dev: torch.device) -> FirstPass:
    """The one streaming pass: reconstruction and sparsity metrics, plus what the add-on passes need
    from it (latent value ranges for description length, the first rows for retrieval)."""
    cfg = sae.cfg
    acc = ReconstructionAccumulator(cfg.d_in, cfg.d_sae, dense_threshold=opts.dense_threshold)
    first = FirstPass({}, LatentValueRange(cfg.d_sae) if opts.description_length else None)
    kept = 0
    for x_ND, doc_N in _progress(_limited_docs(batches, opts.max_rows, cfg.d_in), "eval", opts):
        x_ND = x_ND.to(dev)
        out = sae(x_ND)
        acc.update(x_ND, out.recon, out.code)
        unit_N = add_unit_sums(first, x_ND, out, doc_N, acc.last_rows) if opts.bootstrap_resamples else None
        if first.ranges is not None:
            first.ranges.update(out.code)
        take = min(opts.retrieval_rows - kept, x_ND.shape[0])
        if take > 0:
            first.kept_x.append(x_ND[:take].float().cpu())
            first.kept_r.append(out.recon[:take].float().cpu())
            if unit_N is not None:
                first.kept_doc.append(unit_N[:take])
            kept += take
    first.recon = acc.result()
    return first


def add_unit_sums(first: FirstPass, x_ND: Tensor, out: Any, doc_N: Tensor | None = None,
                  rows: dict[str, Tensor] | None = None) -> Tensor:
    """Per-document sufficient statistics of one batch (see `saekit.eval.bootstrap`); returns the rows' units.
    `rows` are the accumulator's per-row sse, cosine and L0 of this batch (`last_rows`), reused when given."""
    g = first.grouped
    unit_N = g.units_for(doc_N, x_ND.shape[0])
    x = x_ND.detach().float()
    if first.shift_D is None:
        first.shift_D = x.mean(0)
    if rows is None:
        r = out.recon.detach().float()
        rows = {"sse": (x - r).pow(2).sum(-1), "cos": torch.nn.functional.cosine_similarity(x, r, dim=-1, eps=1e-12),
                "l0": out.code.detach().l0().reshape(-1)}
    # the shift (the first batch's mean) keeps the centred sums small: no cancellation in the total variance
    xc = x - first.shift_D
    g.add("n", unit_N, torch.ones(x.shape[0]))
    g.add("sum_x", unit_N, xc)
    g.add("sumsq", unit_N, xc.pow(2).sum(-1))
    for name in ("sse", "cos", "l0"):
        g.add(name, unit_N, rows[name].reshape(-1).float())
    return unit_N


def recon_intervals(grouped: GroupedSums, resamples: int, seed: int, d_in: int) -> tuple[dict, dict] | None:
    """ci95 of FVU, EV, MSE, cosine and L0 from the per-document sums, and the bootstrap's description."""
    if grouped.n_units < 2 or resamples <= 0:
        return None
    t = grouped.totals()
    boot = Bootstrap(grouped.n_units, resamples, seed)
    fvu_R = boot.values(fvu_from_sums, {k: t[k] for k in ("sse", "sum_x", "sumsq", "n")})
    ci = {"fvu": percentile_interval(fvu_R), "explained_variance": percentile_interval(1.0 - fvu_R),
          "mse": boot.ci(lambda s: s["sse"] / (s["n"] * d_in), {"sse": t["sse"], "n": t["n"]}),
          "cosine_mean": boot.ratio_ci(t["cos"], t["n"]), "l0_mean": boot.ratio_ci(t["l0"], t["n"])}
    return ci, boot.describe(grouped.unit)


def _report(sae: SparseAutoencoder, rec: dict) -> dict[str, Any]:
    return {
        "kind": REPORT_KIND,
        "format_version": REPORT_FORMAT_VERSION,
        "sae": sae_summary(sae),
        "n_rows": rec["n_rows"],
        "reconstruction": {k: rec[k] for k in RECON_KEYS},
        "sparsity": {k: v for k, v in rec.items() if k not in RECON_KEYS and k != "n_rows"},
        "ground_truth": None,
        "retrieval": None,
        "description_length": None,
        "downstream": {},
    }


def attach_intervals(report: dict, first: FirstPass, opts: EvalOptions, d_in: int) -> None:
    """`ci95` next to the reconstruction and sparsity figures, and how they were drawn (`bootstrap`)."""
    got = recon_intervals(first.grouped, opts.bootstrap_resamples, opts.bootstrap_seed, d_in)
    if got is None:
        report["bootstrap"] = None
        return
    ci, described = got
    report["reconstruction"]["ci95"] = {k: ci[k] for k in ("fvu", "explained_variance", "mse", "cosine_mean")}
    report["sparsity"]["ci95"] = {"l0_mean": ci["l0_mean"]}
    report["bootstrap"] = described


def ground_truth_pass(sae: SparseAutoencoder, opts: EvalOptions) -> dict | None:
    """Recovery of the planted atoms `opts.true_dictionary_GD` by the decoder rows (None when not given)."""
    if opts.true_dictionary_GD is None:
        return None
    return ground_truth_metrics(sae.W_dec.detach().cpu(), opts.true_dictionary_GD.cpu(), threshold=opts.gt_threshold)


def retrieval_pass(first: FirstPass, opts: EvalOptions) -> dict | None:
    """Retrieval fidelity (recall@k) of the reconstructions on the kept rows (None when off or < 2 rows)."""
    if opts.retrieval_rows <= 0 or sum(x.shape[0] for x in first.kept_x) < 2:
        return None
    units = torch.cat(first.kept_doc) if first.kept_doc else None
    return retrieval_metrics(torch.cat(first.kept_x), torch.cat(first.kept_r), k=opts.retrieval_k, units_N=units,
                             resamples=opts.bootstrap_resamples, seed=opts.bootstrap_seed)


def description_length_pass(sae: SparseAutoencoder, batches: Iterable | Callable[[], Iterable], first: FirstPass,
                            opts: EvalOptions, dev: torch.device) -> dict | None:
    """The MDL sweep, a second pass over the data on the first pass's value ranges. An architecture
    that declares its decoder affine (`decoder_is_affine`) quantises through gathered `W_dec` rows;
    any other decodes once per precision."""
    if first.ranges is None or first.ranges.n_rows == 0:
        return None
    fast = sae.decoder_is_affine
    acc = DescriptionLengthAccumulator(first.ranges.lo_F, first.ranges.hi_F, opts.dl_precisions,
                                       decoder_FD=sae.W_dec.detach() if fast else None,
                                       decode_fn=None if fast else sae.decode)
    for x_ND in _progress(_limited(batches, opts.max_rows, sae.cfg.d_in), "description length", opts):
        x_ND = x_ND.to(dev)
        out = sae(x_ND)
        acc.update(out.code, x_ND, out.recon)
    dl = acc.result(opts.fvu_tolerance)
    dl["error_path"] = "affine decoder (gathered W_dec rows)" if fast else "sae.decode per precision"
    return dl


def outlier_section(sae: SparseAutoencoder, batches: Iterable | Callable[[], Iterable], rule: dict,
                    headline: dict | None = None, ordinary_moments: RunningMoments | None = None,
                    device: str | torch.device | None = None, resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0) -> dict:
    """Reconstruction on the massive-activation outlier rows alone, reported apart from the headline.

    Their FVU is around their own mean (null with fewer than two rows), with a `ci95` bootstrapped over
    their documents (when the batches carry doc ids; blocks of rows otherwise). Given the headline
    report of the ordinary rows and those rows' moments, `all_rows` adds the FVU and explained
    variance of both sets together: what a headline that kept the outliers would have said."""
    cfg = sae.cfg
    dev = torch.device(device) if device is not None else next(iter(sae.parameters()), torch.zeros(())).device
    acc = ReconstructionAccumulator(cfg.d_in, cfg.d_sae)
    first = FirstPass({}, None)
    with inference_mode(sae):
        for x_ND, doc_N in _limited_docs(batches, None, cfg.d_in):
            x_ND = x_ND.to(dev)
            out = sae(x_ND)
            acc.update(x_ND, out.recon, out.code)
            add_unit_sums(first, x_ND, out, doc_N, acc.last_rows)
    rec = acc.result()
    n = rec["n_rows"]
    section = {"rule": rule, "count": n, **{k: (rec[k] if n else None) for k in RECON_KEYS},
               "l0_mean": rec["l0_mean"] if n else None}
    if n < 2:
        section["fvu"] = section["explained_variance"] = None
    got = recon_intervals(first.grouped, resamples, seed, cfg.d_in) if n >= 2 else None
    section["ci95"] = {k: got[0][k] for k in ("fvu", "explained_variance", "mse", "cosine_mean", "l0_mean")} \
        if got else None
    section["bootstrap"] = got[1] if got else None
    if headline is not None and ordinary_moments is not None:
        section["all_rows"] = _all_rows(headline, ordinary_moments, acc)
    return section


def _all_rows(headline: dict, ordinary: RunningMoments, acc: ReconstructionAccumulator) -> dict:
    """FVU of ordinary and outlier rows together, merging the two sets' moments (Chan et al.)."""
    n_a, n_b = int(headline["n_rows"]), acc.n_rows
    sse = float(headline["reconstruction"]["sse_per_row"] or 0.0) * n_a + acc.sse
    merged = RunningMoments(ordinary.n, ordinary.mean_D.clone(), ordinary.m2_D.clone())
    delta = acc.moments.mean_D.to(merged.mean_D) - merged.mean_D
    n = n_a + n_b
    tv = merged.total + acc.moments.total + (float(delta.pow(2).sum()) * n_a * n_b / n if n else 0.0)
    fvu_ = sse / tv if tv > 0 else math.nan
    return {"rows": n, "fvu": fvu_, "explained_variance": 1.0 - fvu_,
            "outlier_share_of_variance": acc.moments.total / tv if tv > 0 else math.nan}


def attach_generalisation(report: dict, train_report: dict, ratio: float = GAP_RATIO, absolute: float = GAP_ABS,
                          training: dict | None = None) -> dict:
    """Put training-row and held-out reconstruction side by side under `report["generalisation"]`:
    FVU, explained variance, cosine and L0 of each, the gap, and a warning naming the likely remedy
    when held-out FVU exceeds `ratio` x and `absolute` + the training FVU. `training` is the
    trainer's summary.json (epochs, exported step, last validation), recorded when given."""
    side = lambda r: {"rows": r["n_rows"], "fvu": r["reconstruction"]["fvu"],  # noqa: E731
                      "explained_variance": r["reconstruction"]["explained_variance"],
                      "cosine_mean": r["reconstruction"]["cosine_mean"], "l0_mean": r["sparsity"]["l0_mean"]}
    gen = generalisation_gap(train_report["reconstruction"]["fvu"], report["reconstruction"]["fvu"], ratio, absolute)
    gen.update({"train": side(train_report), "heldout": side(report)})
    if training:
        gen["training"] = {k: training.get(k) for k in ("epochs", "rows_per_epoch", "steps", "exported_step",
                                                         "stopped_early", "best_val_fvu")}
    report["generalisation"] = gen
    return gen


def attach_downstream(report: dict, name: str, results: dict) -> dict:
    """Put model-dependent results (e.g. splice-in LM loss) under `report["downstream"][name]`."""
    report.setdefault("downstream", {})[name] = results
    return report


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json (strict JSON), report.txt (the table) and the two PNG figures."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "table": out / "report.txt",
             "l0_histogram": out / "l0_histogram.png", "feature_density": out / "feature_density.png"}
    atomic_write_json(paths["json"], report)
    atomic_write_bytes(paths["table"], (format_report(report) + "\n").encode())
    plot_l0_histogram(report, paths["l0_histogram"])
    plot_density_histogram(report, paths["feature_density"])
    return paths


def write_comparison(reports: dict[str, dict], out_dir: str | Path) -> dict[str, Path]:
    """Write compare.txt (the table), compare.json (the reports) and fvu_vs_l0.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "compare.txt", "json": out / "compare.json", "fvu_vs_l0": out / "fvu_vs_l0.png"}
    atomic_write_bytes(paths["table"], (compare_table(reports) + "\n").encode())
    atomic_write_json(paths["json"], reports)
    plot_fvu_vs_l0(reports, paths["fvu_vs_l0"])
    return paths
