"""The evaluation report's figures: L0 and feature-density histograms, and FVU against L0 across SAEs.

matplotlib's Agg canvas on a bare `Figure` (no pyplot global state, so reports can be drawn from any
thread); every PNG goes through `artifacts.atomic_write_png`. Split from `report.py`, which measures.
"""

from __future__ import annotations

from pathlib import Path


from saekit.artifacts import atomic_write_png
from saekit.eval.report_text import fmt_value


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def plot_l0_histogram(report: dict, path: str | Path) -> Path:
    h = report["sparsity"]["l0_histogram"]
    fig, ax = _figure()
    ax.bar(h["l0"], h["counts"], width=1.0, color="tab:blue")
    ax.set_xlabel("active latents per row (L0)")
    ax.set_ylabel("rows")
    ax.set_title(f"L0 distribution (mean {fmt_value(report['sparsity']['l0_mean'])})")
    return atomic_write_png(fig, path)


def plot_density_histogram(report: dict, path: str | Path) -> Path:
    h = report["sparsity"]["density_histogram"]
    edges, counts = h["log10_edges"], h["counts"]
    fig, ax = _figure()
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="tab:green")
    ax.set_xlabel("log10(feature density)")
    ax.set_ylabel("latents")
    ax.set_title(f"feature density ({h['live']} live, {h['dead']} dead not shown)")
    return atomic_write_png(fig, path)


def plot_fvu_vs_l0(reports: dict[str, dict], path: str | Path) -> Path:
    fig, ax = _figure()
    for name, r in reports.items():
        ax.scatter([r["sparsity"]["l0_mean"]], [r["reconstruction"]["fvu"]], label=name)
    ax.set_xlabel("L0 (mean active latents)")
    ax.set_ylabel("FVU")
    ax.set_title("FVU vs L0")
    if reports:
        ax.legend(fontsize=8)
    return atomic_write_png(fig, path)
