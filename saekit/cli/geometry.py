"""`saekit geometry RUN|CONFIG`: per-layer geometry over every hook the run cached (IsoScore, TwoNN,
effective rank, norms, a mean-pooled probe) and, for each SAE of the run, its decoder spectrum and
co-occurrence lobes. Writes `geometry/layers.json` + `layers.png` and `geometry/[<sae>/]sae.json` +
`spectrum.png`; the browser's "Geometry" page reads them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from saekit.analysis.geometry import dictionary_geometry, layer_geometry
from saekit.artifacts import atomic_write_json, to_strict_json
from saekit.errors import StoreMissingError
from saekit.eval.bootstrap import interval_fn
from saekit.layout import RunFolder
from saekit.run.config import load_run_config
from saekit.sae.registry import load_sae
from saekit.store.locate import cached_hooks, store_for_hook

LAYERS_JSON, LAYERS_PNG, SAE_JSON, SPECTRUM_PNG = "layers.json", "layers.png", "sae.json", "spectrum.png"


def _folder(path: str) -> RunFolder:
    p = Path(path)
    if p.is_file():
        return load_run_config(p).folder
    return RunFolder(p).require_run()


def _layer_number(hook: str) -> float:
    nums = re.findall(r"\d+", hook)
    return float(nums[-1]) if nums else float("nan")


def plot_layers(layers: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(layers)))
    panels = [("isoscore", "IsoScore"), ("twonn_dim", "TwoNN intrinsic dim."), ("effective_rank", "effective rank"),
              ("norm_median", "median row norm"), ("mean_cosine", "mean cosine (anisotropy)"), ("probe", "pooled probe acc.")]
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.5))
    for ax, (key, title) in zip(axes.flat, panels):
        if key == "probe":
            ys = [(r.get("probe") or {}).get("accuracy") for r in layers]
            base = [(r.get("probe") or {}).get("majority") for r in layers]
            if any(y is not None for y in ys):
                ax.plot(x, ys, "o-")
                ax.plot(x, base, ":", color="grey", label="majority class")
                ax.legend(fontsize=7)
        else:
            ax.plot(x, [r[key] for r in layers], "o-")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(x, [r["hook"].split(".")[-1] for r in layers], fontsize=7)
    fig.supxlabel("layer (hook)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectrum(geo: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eig = [e for e in geo["eigenvalues"] if e > 0]
    fig, axes = plt.subplots(1, 2 if "lobes" in geo else 1, figsize=(9 if "lobes" in geo else 4.5, 3.8), squeeze=False)
    ax = axes[0, 0]
    ax.loglog(range(1, len(eig) + 1), eig, ".")
    pl = geo["power_law"]
    if pl.get("alpha") is not None:
        i0, i1 = pl["fit_ranks"]
        c = math.exp(pl["log_c"])
        ax.loglog([i0, i1], [c * i0 ** -pl["alpha"], c * i1 ** -pl["alpha"]], "r-",
                  label=f"power law α={pl['alpha']:.2f} (R²={pl['r2']:.2f})")
        ax.legend(fontsize=7)
    ax.set(xlabel="rank", ylabel="eigenvalue", title="decoder-direction covariance spectrum")
    if "lobes" in geo:
        lob = geo["lobes"]
        ax2 = axes[0, 1]
        xs, ys = zip(*lob["xy"])
        ax2.scatter(xs, ys, c=lob["lobe"], s=6, cmap="tab10")
        ax2.set(title=f"co-occurrence lobes {lob['sizes']}", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _layers(folder: RunFolder, args, out: Path) -> list[dict]:
    hooks = cached_hooks(folder.store) or [None]
    interval = interval_fn(args.resamples, args.seed) if args.resamples else None
    layers = [layer_geometry(store_for_hook(folder.store, h), max_rows=args.max_rows, label=args.label or None,
                             positive=args.positive, seed=args.seed, interval=interval) for h in hooks]
    layers.sort(key=lambda r: _layer_number(r["hook"]))
    atomic_write_json(out / LAYERS_JSON, to_strict_json({"run": str(folder.root), "layers": layers}))
    plot_layers(layers, out / LAYERS_PNG)
    print(f"{'hook':<18} {'rows':>6} {'IsoScore':>8} {'φ':>6} {'TwoNN':>6} {'eff.rank':>8} {'med.norm':>8} "
          f"{'cos':>5} {'probe':>14}")
    for r in layers:
        p = r.get("probe")
        ptext = f"{p['accuracy']:.3f}/{p['majority']:.3f}" if p else "-"
        print(f"{r['hook']:<18} {r['rows']:>6} {r['isoscore']:>8.4f} {r['fraction']:>6.3f} {r['twonn_dim']:>6.1f} "
              f"{r['effective_rank']:>8.1f} {r['norm_median']:>8.2f} {r['mean_cosine']:>5.2f} {ptext:>14}")
    return layers


def _saes(folder: RunFolder, args, out_root: Path | None) -> None:
    for f in folder.per_sae():
        if not f.final_sae().exists():
            continue
        sae = load_sae(f.train()).eval()
        store = store_for_hook(f.store, sae.cfg.hook_name or None)
        geo = dictionary_geometry(sae, store, max_rows=args.max_rows, n_lobes=args.lobes, seed=args.seed)
        out = (out_root / f.sae if f.sae else out_root) if out_root else f.geometry
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / SAE_JSON, to_strict_json(geo))
        plot_spectrum(geo, out / SPECTRUM_PNG)
        pl, lob = geo["power_law"], geo["lobes"]
        print(f"SAE {f.label}: decoder spectrum power law α={pl['alpha']:.3f} (R²={pl['r2']:.3f}); lobes "
              f"{lob['sizes']} over {lob['documents']} documents, phi within {lob['within_phi']:.3f} vs between "
              f"{lob['between_phi']:.3f}")


def cmd_geometry(args) -> int:
    folder = _folder(args.run)
    if not (folder.store.exists() and any(folder.store.iterdir())):
        raise StoreMissingError(f"{folder.store}: expected the run's activation store, found none",
                                fix=f"saekit cache {args.run}")
    out = Path(args.out) if args.out else RunFolder(folder.root, folder.store_path).geometry
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_layers:
        _layers(folder, args, out)
    if not args.no_sae:
        _saes(folder, args, Path(args.out) if args.out else None)
    print(f"saved {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("geometry", help="per-layer geometry (IsoScore, TwoNN, eff. rank, norms, probe) and SAE "
                                        "dictionary spectrum / co-occurrence lobes")
    p.add_argument("run", help="run folder or run config (every hook it cached)")
    p.add_argument("--label", default="sentiment", help="document label for the pooled probe ('' : none)")
    p.add_argument("--positive", default=None, help="positive class (default: the most frequent)")
    p.add_argument("--max-rows", type=int, default=20000, help="rows sampled per hook (outliers left out)")
    p.add_argument("--lobes", type=int, default=3, help="co-occurrence clusters of latents")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the probe interval (0: none)")
    p.add_argument("--no-sae", action="store_true", help="layers only")
    p.add_argument("--no-layers", action="store_true", help="the SAEs' dictionaries only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: the run's geometry/ folder)")
    p.set_defaults(fn=cmd_geometry)
