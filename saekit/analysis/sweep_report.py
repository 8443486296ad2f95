"""Steering-sweep reports as a table, strict JSON and an effect-vs-damage plot (the output side of
steering_sweep.py)."""

from __future__ import annotations

from pathlib import Path

from saekit.artifacts import atomic_write_json, atomic_write_png, read_json, to_strict_json

COLUMNS = (("target_mass", "target mass", "{:.3g}"), ("feature_act", "feature act", "{:.2f}"),
           ("probe_score", "probe", "{:.3f}"), ("kl", "KL (nats)", "{:.3f}"), ("perplexity", "ppl", "{:.1f}"))


def _cell(fig: dict, fmt: str) -> str:
    if fig["mean"] is None:
        return "-"
    ci = fig["ci95"]
    return fmt.format(fig["mean"]) + ("" if not ci else f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]")


def sweep_table(report: dict) -> list[dict]:
    """One row per strength with the figures the report holds (columns with no value anywhere are left out)."""
    cols = [c for c in COLUMNS if any(r[c[0]]["mean"] is not None for r in report["rows"])]
    return [{"strength": r["strength"], **{name: _cell(r[key], fmt) for key, name, fmt in cols}}
            for r in report["rows"]]


def format_sweep_table(report: dict) -> str:
    """A fixed-width text table (95 % intervals in brackets) and the chosen strength."""
    table = sweep_table(report)
    cols = list(table[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in table)) for c in cols}
    lines = ["  ".join(c.rjust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).rjust(width[c]) for c in cols) for r in table]
    ch = report["chosen"]
    ratio = "" if ch["ratio_to_unsteered"] is None else f", {ch['ratio_to_unsteered']:.2f}x unsteered"
    lines.append(f"chosen strength {ch['strength']:g}: {ch['metric']} {ch['effect']:.4g}{ratio} "
                 f"at KL {ch['kl']:.3f} (budget {ch['kl_budget']:g} nats)")
    return "\n".join(lines)


def plot_sweep(report: dict, path: Path) -> None:
    """Effect (the calibrated metric) against KL on neutral text, one point per strength, the budget marked."""

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    metric = report["chosen"]["metric"]
    rows = report["rows"]
    kl = [r["kl"]["mean"] for r in rows]
    eff = [r[metric]["mean"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(kl, eff, "-o", color="tab:blue")
    for r, x, y in zip(rows, kl, eff):
        ci = r[metric]["ci95"]
        if ci:
            ax.plot([x, x], ci, color="tab:blue", alpha=0.4, lw=1)
        ax.annotate(f"{r['strength']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(report["kl_budget"], color="tab:red", ls="--", lw=1, label=f"KL budget {report['kl_budget']:g}")
    ch = report["chosen"]
    ax.plot([ch["kl"]], [ch["effect"]], "*", color="tab:red", ms=14, label=f"chosen: {ch['strength']:g}")
    ax.set_xlabel("damage: KL(unsteered ‖ steered) on neutral text (nats/token)")
    ax.set_ylabel(f"effect: {metric.replace('_', ' ')}")
    what = f"feature {report['feature']}" if report["feature"] is not None else "vector"
    ax.set_title(f"steering sweep: {what} at {report['hook']} ({report['mode']})")
    ax.legend(fontsize=8)
    atomic_write_png(fig, path, dpi=110)
    plt.close(fig)


def write_sweep_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write `sweep.json` (strict JSON) and `effect_vs_damage.png` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sweep.json", "png": out / "effect_vs_damage.png"}
    atomic_write_json(paths["json"], to_strict_json(report))
    plot_sweep(report, paths["png"])
    return paths


def saved_sweeps(steer_dir: str | Path) -> dict[str, dict]:
    """Sweep reports saved under a run's steer folder (`<steer>/<name>/sweep.json`), by folder name."""
    root = Path(steer_dir)
    if not root.is_dir():
        return {}
    return {p.parent.name: read_json(p) for p in sorted(root.glob("*/sweep.json"))}
