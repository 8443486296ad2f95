"""Probe reports as tables, strict JSON and an accuracy-vs-k plot (the output side of probing.py)."""

from __future__ import annotations

from pathlib import Path

from saekit.artifacts import atomic_write_bytes, atomic_write_json, to_strict_json


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


def format_probe_table(report: dict) -> str:
    """A fixed-width text table of accuracy vs k (plus the dense probes and the majority baseline)."""
    table = probe_table(report)
    cols = [c for c in table[0] if c != "k"]
    lines = ["k    " + "  ".join(f"{c:>22}" for c in cols)]
    lines += [f"{r['k']:<5}" + "  ".join(f"{r[c]:>22.3f}" for c in cols) for r in table]
    dense = ", ".join(f"{fs} {d['accuracy']:.3f} ({d['n_features']} dims)" for fs, d in report["dense"].items())
    lines.append(f"dense: {dense}; majority baseline {report['majority_baseline']:.3f}")
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    import io

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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_probe_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write `report.json` (strict JSON) and `accuracy_vs_k.png`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "png": out / "accuracy_vs_k.png"}
    atomic_write_json(paths["json"], to_strict_json(report))
    _plot(report, paths["png"])
    return paths
