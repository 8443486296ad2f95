"""MDL model selection over a grid of SAE widths and ks (issue 5, item 3; Ayonrinde et al. 2024).

    result = run_mdl_select(MDLSelectConfig.from_yaml("configs/mdl_select_synthetic.yaml"))
    saekit mdl-select configs/mdl_select_synthetic.yaml

For every (width, k) of the grid an SAE is trained with `saekit.train.train` (an SAE folder that
already exists under `output_dir/saes/` is loaded instead, so a rerun only trains what is missing;
folders listed under `saes:` are taken as they are). Each SAE's description length and error are
measured on held-out rows with `description_length` (activity bits + entropy-coded value bits per
activation vector, minimised over value precisions within `fvu_tolerance`). The selected SAE is the
one with the shortest DL whose quantised FVU stays within `fvu_budget`: the paper's "shortest
description of the activations within an acceptable error".

Beside it the result records what selecting by reconstruction at fixed L0 would pick (for each k,
the width with the lowest FVU): on planted data that choice drifts to wider dictionaries, because
extra latents always buy some error at the same L0, while the bits to say *which* latents fire grow
with the width (the paper's feature-splitting argument).

Why in the run layer: this is an experiment runner, not a metric. It trains a grid, measures,
selects and plots, so it sits beside the other stages and may call the trainer; `saekit.eval`
keeps only the measurements (`description_length`) it is built from.

Output folder: `results.json` (strict JSON), `results.md` (the table), `mdl_select.png` (DL against
width, one line per k, and against k, one line per width).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from saekit.artifacts import atomic_write_bytes, atomic_write_json
from saekit.config import Config, param
from saekit.errors import ConfigError
from saekit.eval.description_length import DEFAULT_FVU_TOLERANCE, DEFAULT_PRECISIONS, description_length
from saekit.layout import FINAL_SAE, RunFolder
from saekit.run.outliers import eval_rows, training_rows
from saekit.sae.base import SparseAutoencoder, inference_mode
from saekit.sae.registry import create, get_class, load_sae
from saekit.store.batches import TensorBatches
from saekit.train import TrainConfig, train

log = logging.getLogger(__name__)
RESULT_KIND = "saekit.mdl_select"
RESULT_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
@dataclass
class SyntheticDataConfig(Config):
    """Planted-feature rows (`saekit.data.synthetic.planted_features`): the true width is known."""

    n_train: int = param(16384, "training rows", ge=1)
    n_heldout: int = param(4096, "held-out rows for DL and error (drawn from the same dictionary)", ge=1)
    d_in: int = param(32, "activation width", ge=1)
    n_features: int = param(64, "true dictionary size", ge=1)
    avg_active: float = param(2.0, "expected active features per row", gt=0)
    zipf: float = param(0.0, "Zipf exponent of feature frequencies (0: all equal)", ge=0)
    noise: float = param(0.0, "Gaussian noise standard deviation added to every row", ge=0)
    seed: int = param(0, "seed of the dictionary and the rows")


@dataclass
class DataConfig(Config):
    """Where rows come from: `synthetic` planted data, or `store` (an activation store, or a run folder)."""

    synthetic: SyntheticDataConfig | None = param(None, "planted-feature data spec")
    store: str | None = param(None, "activation store folder, cache root, or a run folder (runs/<name>)")
    hook: str | None = param(None, "hook of the store when the cache holds several")
    heldout_fraction: float = param(0.1, "store only: fraction of documents held out for DL and error", gt=0, lt=1)
    max_heldout_rows: int = param(65536, "store only: at most this many held-out rows are evaluated", ge=1)
    split_seed: int = param(0, "store only: seed of the document split")
    exclude_outliers: bool = param(True, "store only: leave the store's massive-activation outlier rows out of "
                                         "training and of the held-out rows measured (as runs do; see "
                                         "saekit.run.outliers), so a few huge rows do not decide the selection")

    def validate(self) -> None:
        if (self.synthetic is None) == (self.store is None):
            raise ConfigError("mdl-select data: give exactly one of 'synthetic' and 'store' "
                              f"(found synthetic={self.synthetic is not None}, store={self.store!r})")


@dataclass
class GridConfig(Config):
    widths: list[int] = param(default_factory=list, doc="dictionary sizes d_sae to train")
    ks: list[int] = param(default_factory=list, doc="k values (active latents per row) to train")

    def validate(self) -> None:
        if any(w < 1 for w in self.widths) or any(k < 1 for k in self.ks):
            raise ConfigError(f"mdl-select grid: expected positive widths and ks, found {self.widths} / {self.ks}")
        if bool(self.widths) != bool(self.ks):
            raise ConfigError(f"mdl-select grid: give both widths and ks (found widths={self.widths}, ks={self.ks})")


def _default_train() -> TrainConfig:
    return TrainConfig(total_steps=2000, batch_size=256, lr=3e-3, decay="linear", decay_fraction=0.3,
                       checkpoint_every=0, log_every=500, progress_bar=False)


@dataclass
class MDLSelectConfig(Config):
    """`saekit mdl-select CONFIG`: train or take a grid of SAEs, measure DL and error, pick by MDL."""

    output_dir: str = param(doc="folder for saes/, results.json, results.md and mdl_select.png")
    data: DataConfig = param(doc="where the rows come from")
    grid: GridConfig = param(default_factory=GridConfig, doc="widths × ks to train")
    architecture: str = param("topk", "architecture of the grid's SAEs (a registered name with a 'k' field)")
    sae: dict[str, Any] = param(default_factory=dict, doc="extra fields of the architecture's config "
                                                          "(e.g. batch_topk: true); d_in, d_sae, k come from the grid")
    train: TrainConfig = param(default_factory=_default_train, doc="trainer settings shared by every SAE")
    saes: list[str] = param(default_factory=list, doc="already-trained SAE folders (or run folders) to include")
    precisions: list[int] = param(default_factory=lambda: list(DEFAULT_PRECISIONS),
                                  doc="value precisions (bits) swept by the DL metric")
    fvu_tolerance: float = param(DEFAULT_FVU_TOLERANCE, "largest FVU increase quantisation may add", ge=0)
    fvu_budget: float = param(0.1, "error budget: only SAEs whose quantised FVU is at most this are eligible", gt=0)
    eval_batch_size: int = param(4096, "held-out rows encoded at once", ge=1)

    def validate(self) -> None:
        if not self.grid.widths and not self.saes:
            raise ConfigError("mdl-select: nothing to compare; give grid.widths/grid.ks or saes")
        if self.grid.widths:
            cls = get_class(self.architecture)
            names = {f.name for f in dataclasses.fields(cls.config_class)}
            if "k" not in names:
                raise ConfigError(f"mdl-select: architecture '{self.architecture}' has no 'k' field to grid over")
            clash = {"d_in", "d_sae", "k"} & set(self.sae)
            if clash:
                raise ConfigError(f"mdl-select sae: {sorted(clash)} come from the grid and the data, not from 'sae'")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@dataclass
class SelectionData:
    """What the grid trains on and is measured on."""

    train_batches: Any  # a trainer BatchSource factory: batch_size, seed -> BatchSource
    heldout_ND: Tensor
    d_in: int
    description: dict


def load_selection_data(cfg: DataConfig) -> SelectionData:
    if cfg.synthetic is not None:
        return _synthetic_data(cfg.synthetic)
    return _store_data(cfg)


def _synthetic_data(s: SyntheticDataConfig) -> SelectionData:
    from saekit.data.synthetic import planted_features

    pd = planted_features(s.n_train + s.n_heldout, s.d_in, s.n_features, avg_active=s.avg_active, seed=s.seed,
                          noise=s.noise, zipf=s.zipf)
    x_tr, x_te = pd.x_ND[: s.n_train], pd.x_ND[s.n_train:]
    true_l0 = float((pd.codes_NF[s.n_train:] != 0).sum(1).double().mean())
    desc = {"kind": "synthetic", **s.to_dict(), "true_width": s.n_features, "true_l0_heldout": true_l0}
    return SelectionData(lambda bs, seed: TensorBatches(x_tr, bs, seed=seed), x_te, s.d_in, desc)


def _store_data(cfg: DataConfig) -> SelectionData:
    from saekit.store.reader import ActivationStore

    path = Path(cfg.store)
    if RunFolder(path).store.is_dir() and not (path / "manifest.json").exists():
        path = RunFolder(path).store  # a run folder: its store (honouring the config's store.path)
    store = ActivationStore(path, hook=cfg.hook)
    train_rows, held_rows = store.split_by_document(cfg.heldout_fraction, cfg.split_seed)
    used = training_rows(store, train_rows, cfg.exclude_outliers)
    train_rows = used.rows
    if cfg.exclude_outliers:
        held_rows = eval_rows(store, held_rows).ordinary
    held_rows = held_rows[: cfg.max_heldout_rows]
    desc = {"kind": "store", "path": str(store.path), "hook": store.hook, "train_rows": int(len(train_rows)),
            "heldout_rows": int(len(held_rows)), "exclude_outliers": cfg.exclude_outliers,
            "outliers_left_out_of_training": used.excluded_outliers}
    return SelectionData(lambda bs, seed: store.batches(bs, seed=seed, rows=train_rows), store[held_rows].float(),
                         store.d_in, desc)


# ---------------------------------------------------------------------------------------------
# training and measuring
# ---------------------------------------------------------------------------------------------
def grid_name(width: int, k: int) -> str:
    return f"w{width}_k{k}"


def train_grid_sae(cfg: MDLSelectConfig, data: SelectionData, width: int, k: int) -> tuple[SparseAutoencoder, Path]:
    """Train one grid point into output_dir/saes/<name>/ (trainer run folder), or load it if it is done."""
    run_dir = Path(cfg.output_dir) / "saes" / grid_name(width, k)
    if (run_dir / FINAL_SAE).is_dir():
        log.info("mdl-select: %s already trained, loading it", run_dir)
        return load_sae(run_dir), run_dir
    sae_cfg = {"architecture": cfg.architecture, **cfg.sae, "d_in": data.d_in, "d_sae": width, "k": k}
    sae = create(sae_cfg)
    tcfg = cfg.train
    log.info("mdl-select: training %s (%d steps)", run_dir.name, tcfg.steps)
    train(sae, data.train_batches(tcfg.batch_size, tcfg.seed), tcfg, run_dir, resume="auto")
    return load_sae(run_dir), run_dir


def measure_sae(sae: SparseAutoencoder, x_ND: Tensor, precisions: list[int], fvu_tolerance: float,
                batch_size: int = 4096) -> dict:
    """DL sweep and errors of one SAE on held-out rows (see `description_length`); the fast path
    through gathered `W_dec` rows when the architecture declares its decoder affine."""
    p = next(sae.parameters())
    items = []
    with inference_mode(sae):
        for s in range(0, x_ND.shape[0], batch_size):
            x = x_ND[s: s + batch_size].to(device=p.device, dtype=p.dtype)
            code = sae.encode(x)
            items.append((code, x, sae.decode(code)))
        fast = sae.decoder_is_affine
        return description_length(items, sae.cfg.d_sae, precisions, decoder_FD=sae.W_dec.detach() if fast else None,
                                   decode_fn=None if fast else sae.decode, fvu_tolerance=fvu_tolerance)


def table_row(name: str, sae: SparseAutoencoder, folder: Path, res: dict) -> dict:
    """One row of the selection table from a DL result."""
    sel = next((e for e in res["sweep"] if e["bits"] == res["selected_bits"]), None)
    return {
        "name": name,
        "architecture": sae.architecture,
        "width": int(sae.cfg.d_sae),
        "k": int(getattr(sae.cfg, "k", 0) or 0),
        "l0": res["l0_mean"],
        "fvu": res["unquantised"]["fvu"],
        "fvu_at_dl": sel["fvu"] if sel else None,
        "dl_bits": res["dl_bits_per_row"],
        "activity_bits": res["activity_bits_per_row"],
        "value_bits": sel["value_bits_per_row"] if sel else None,
        "selected_precision": res["selected_bits"],
        "folder": str(folder),
    }


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------
def within_budget(row: dict, budget: float) -> bool:
    return row["dl_bits"] is not None and row["fvu_at_dl"] is not None and row["fvu_at_dl"] <= budget


def select_mdl(rows: list[dict], budget: float) -> dict | None:
    """The minimum-DL row among those within the error budget; ties go to the narrower, sparser SAE."""
    ok = [r for r in rows if within_budget(r, budget)]
    return min(ok, key=lambda r: (r["dl_bits"], r["width"], r["k"])) if ok else None


def select_by_reconstruction(rows: list[dict]) -> dict[int, dict]:
    """For each k: the row with the lowest (unquantised) FVU — selection by reconstruction at fixed L0."""
    out: dict[int, dict] = {}
    for r in rows:
        best = out.get(r["k"])
        if best is None or (r["fvu"], r["width"]) < (best["fvu"], best["width"]):
            out[r["k"]] = r
    return dict(sorted(out.items()))


def budget_sweep(rows: list[dict], budgets: list[float]) -> list[dict]:
    """Which SAE MDL selects at each budget (how robust the choice is to the budget)."""
    out = []
    for b in budgets:
        r = select_mdl(rows, b)
        out.append({"fvu_budget": b, "name": r["name"] if r else None, "width": r["width"] if r else None,
                    "k": r["k"] if r else None})
    return out


def run_mdl_select(cfg: MDLSelectConfig) -> dict:
    """Train/take the SAEs, measure them, select, and write the outputs; returns the result dict."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_selection_data(cfg.data)
    rows = []
    for width in cfg.grid.widths:
        for k in cfg.grid.ks:
            sae, folder = train_grid_sae(cfg, data, width, k)
            res = measure_sae(sae, data.heldout_ND, cfg.precisions, cfg.fvu_tolerance, cfg.eval_batch_size)
            rows.append(table_row(grid_name(width, k), sae, folder, res))
    for path in cfg.saes:
        sae = load_sae(path)
        if sae.cfg.d_in != data.d_in:
            raise ConfigError(f"mdl-select: SAE {path} has d_in={sae.cfg.d_in}, the data has d_in={data.d_in}")
        res = measure_sae(sae, data.heldout_ND, cfg.precisions, cfg.fvu_tolerance, cfg.eval_batch_size)
        rows.append(table_row(Path(path).name, sae, Path(path), res))
    for r in rows:
        r["within_budget"] = within_budget(r, cfg.fvu_budget)
    best = select_mdl(rows, cfg.fvu_budget)
    by_recon = select_by_reconstruction(rows)
    budgets = sorted({round(cfg.fvu_budget * f, 6) for f in (0.5, 0.75, 1.0, 1.5, 2.0)})
    result = {
        "kind": RESULT_KIND,
        "format_version": RESULT_FORMAT_VERSION,
        "config": cfg.to_dict(),
        "data": data.description,
        "fvu_budget": cfg.fvu_budget,
        "rows": rows,
        "mdl_choice": best,
        "reconstruction_choice_by_k": {str(k): r for k, r in by_recon.items()},
        "budget_sweep": budget_sweep(rows, budgets),
    }
    write_outputs(result, out)
    return result


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def format_table(result: dict) -> str:
    """The selection table in markdown; the MDL choice is marked ◀ MDL, the fixed-L0 choices ◀ recon."""
    best = result["mdl_choice"]
    recon_names = {r["name"] for r in result["reconstruction_choice_by_k"].values()}
    head = ["name", "width", "k", "L0", "FVU", "FVU@DL", "DL bits", "activity", "value", "prec", "in budget", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(result["rows"], key=lambda r: (r["k"], r["width"], r["name"])):
        mark = []
        if best and r["name"] == best["name"]:
            mark.append("◀ MDL")
        if r["name"] in recon_names:
            mark.append("◀ recon@k")
        cells = [r["name"], r["width"], r["k"], _fmt(r["l0"], 3), _fmt(r["fvu"]), _fmt(r["fvu_at_dl"]),
                 _fmt(r["dl_bits"]), _fmt(r["activity_bits"]), _fmt(r["value_bits"]), _fmt(r["selected_precision"]),
                 "yes" if r["within_budget"] else "no", " ".join(mark)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    lines.append(f"FVU budget {result['fvu_budget']}: MDL selects "
                 + (f"{best['name']} (width {best['width']}, k {best['k']}, {best['dl_bits']:.2f} bits/row)"
                    if best else "nothing (no SAE within the budget)"))
    for k, r in result["reconstruction_choice_by_k"].items():
        lines.append(f"reconstruction at k={k} selects {r['name']} (width {r['width']}, FVU {r['fvu']:.4f})")
    if "true_width" in result["data"]:
        lines.append(f"true width {result['data']['true_width']}, true L0 {result['data']['true_l0_heldout']:.2f}")
    return "\n".join(lines) + "\n"


def plot_png(result: dict) -> bytes:
    """DL against width (a line per k) and against k (a line per width), PNG bytes (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["dl_bits"] is not None]
    fig, (ax_w, ax_k, ax_f) = plt.subplots(1, 3, figsize=(15, 4))
    for key, other, ax, log_x in (("k", "width", ax_w, True), ("width", "k", ax_k, False)):
        for val in sorted({r[key] for r in rows}):
            pts = sorted((r[other], r["dl_bits"], r["within_budget"]) for r in rows if r[key] == val)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            line, = ax.plot(xs, ys, marker="o", label=f"{key}={val}")
            ax.scatter([p[0] for p in pts if not p[2]], [p[1] for p in pts if not p[2]], marker="x", s=60,
                       color=line.get_color())
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(other)
        ax.set_ylabel("description length (bits / row)")
        ax.legend(fontsize=8)
    best = result["mdl_choice"]
    if best:
        ax_w.scatter([best["width"]], [best["dl_bits"]], s=200, facecolors="none", edgecolors="k", label="MDL")
        ax_k.scatter([best["k"]], [best["dl_bits"]], s=200, facecolors="none", edgecolors="k")
    _plot_frontier(ax_f, rows, best, result["fvu_budget"])
    fig.suptitle(f"DL against width and k, and the DL-vs-FVU frontier (× = over the FVU budget {result['fvu_budget']})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def pareto_frontier(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both DL and quantised FVU (lower is better), by FVU."""
    pts = sorted((r for r in rows if r["dl_bits"] is not None and r["fvu_at_dl"] is not None),
                 key=lambda r: (r["fvu_at_dl"], r["dl_bits"]))
    out: list[dict] = []
    for r in pts:
        if not out or r["dl_bits"] < out[-1]["dl_bits"]:
            out.append(r)
    return out


def _plot_frontier(ax, rows: list[dict], best: dict | None, budget: float) -> None:
    """DL against quantised FVU, every SAE labelled, the Pareto frontier joined, the budget a line:
    MDL's choice is the lowest point left of the line."""
    pts = [r for r in rows if r["fvu_at_dl"] is not None]
    ax.scatter([r["fvu_at_dl"] for r in pts], [r["dl_bits"] for r in pts], color="0.5")
    for r in pts:
        ax.annotate(r["name"], (r["fvu_at_dl"], r["dl_bits"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_frontier(pts)
    ax.plot([r["fvu_at_dl"] for r in front], [r["dl_bits"] for r in front], "-o", color="C3", label="frontier")
    ax.axvline(budget, color="k", ls="--", lw=1, label=f"FVU budget {budget:g}")
    if best:
        ax.scatter([best["fvu_at_dl"]], [best["dl_bits"]], s=200, facecolors="none", edgecolors="k", label="MDL")
    ax.set_xlabel("FVU at the selected precision (held-out)")
    ax.set_ylabel("description length (bits / row)")
    ax.legend(fontsize=8)


def write_outputs(result: dict, out: Path) -> None:
    atomic_write_json(out / "results.json", result)
    atomic_write_bytes(out / "results.md", format_table(result).encode())
    atomic_write_bytes(out / "mdl_select.png", plot_png(result))
