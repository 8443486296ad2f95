"""Probe reports as tables, strict JSON and an accuracy-vs-k plot (the output side of probing.py)."""

from __future__ import annotations

from pathlib import Path

from saekit.artifacts import atomic_write_json, atomic_write_png, to_strict_json


def probe_table(report: dict) -> list[dict]:
    """One row per k: test accuracy of every (feature set, method), for printing and notes."""
    rows = []
    for k in report["ks"]:
        row = {"k": k}
        for fs, by_method in report["results"].items():
            for method, per_k in by_method.items():
                row[f"{fs}/{method}"] = per_k[str(k)]["accuracy"]
        rows.append(row)
    return rows


def format_ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def format_probe_table(report: dict) -> str:
    """A fixed-width text table of accuracy vs k (with 95 % intervals when the report has them), the dense
    probes, the majority baseline, the probe's unit and, for one-vs-rest reports, the best latent per class."""
    table = probe_table(report)
    cols = [c for c in table[0] if c != "k"]
    cis = {(r["k"], c): _ci_of(report, c, r["k"]) for r in table for c in cols}
    w = 36 if any(cis.values()) else 22
    lines = [f"unit: {report.get('unit', 'token')} (pooling {report.get('pooling', 'token')}), "
             f"{report.get('n_examples', report.get('n_rows'))} examples"]
    lines += ["k    " + "  ".join(f"{c:>{w}}" for c in cols)]
    lines += [f"{r['k']:<5}" + "  ".join(f"{(f'{r[c]:.3f}' + format_ci(cis[(r['k'], c)])):>{w}}" for c in cols)
              for r in table]
    dense = ", ".join(f"{fs} {d['accuracy']:.3f}{format_ci((d.get('ci95') or {}).get('accuracy'))} "
                      f"({d['n_features']} dims)" for fs, d in report["dense"].items())
    lines.append(f"dense: {dense}; majority baseline {report['majority_baseline']:.3f}")
    lines += _class_lines(report)
    return "\n".join(lines)


def _ci_of(report: dict, col: str, k: int) -> list[float] | None:
    fs, method = col.split("/", 1)
    return (report["results"][fs][method][str(k)].get("ci95") or {}).get("accuracy")


def _class_lines(report: dict) -> list[str]:
    per_class = report.get("per_class")
    if not per_class:
        return []
    lines = ["one vs rest: best single feature per class (k=1)"]
    for c, e in per_class.items():
        if "best" not in e:
            lines.append(f"  {c}: skipped ({e.get('skipped')})")
            continue
        best = ", ".join(f"{fs} #{b['feature']} {b['accuracy']:.3f}{format_ci((b.get('ci95') or {}).get('accuracy'))}"
                         for fs, b in e["best"].items())
        lines.append(f"  {c} ({e['count']} examples, majority {e['majority_baseline']:.3f}): {best}")
    macro = report.get("macro") or {}
    for fs, by_method in (macro.get("accuracy") or {}).items():
        for method, per_k in by_method.items():
            lines.append(f"  macro {fs}/{method}: " + ", ".join(f"k={k} {v:.3f}" for k, v in per_k.items())
                         + f" (majority {macro.get('majority_baseline') or float('nan'):.3f})")
    return lines


def _plot(report: dict, path: Path) -> None:

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"sae": "tab:blue", "neurons": "tab:orange"}
    styles = {"mean_diff": "-", "l1": "--", "density_norm": ":"}
    ks = report["ks"]
    for fs, by_method in report["results"].items():
        for method, per_k in by_method.items():
            ax.plot(ks, [per_k[str(k)]["accuracy"] for k in ks], styles.get(method, "-"), marker="o",
                    color=colours.get(fs), label=f"{fs} · {method}")
    for fs, d in report["dense"].items():
        ax.axhline(d["accuracy"], color=colours.get(fs), alpha=0.5, lw=1, label=f"dense {fs} ({d['n_features']})")
    ax.axhline(report["majority_baseline"], color="grey", ls="-.", lw=1, label="majority")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (features in the probe)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"sparse probing: {report['label']} = {report['positive']} vs rest")
    ax.legend(fontsize=7, loc="lower right")
    atomic_write_png(fig, path, dpi=110)
    plt.close(fig)


def write_probe_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write `report.json` (strict JSON) and `accuracy_vs_k.png`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "png": out / "accuracy_vs_k.png"}
    atomic_write_json(paths["json"], to_strict_json(report))
    _plot(report, paths["png"])
    return paths
