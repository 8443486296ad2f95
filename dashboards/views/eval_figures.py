"""The evaluation page's figures (matplotlib), each a pure function of a report dict, so a test can
draw them without Streamlit: feature density histogram, description length against value bits, probe
accuracy against k, loss recovered with its interval, and the distribution of explanation scores."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SIZE = (5.0, 3.2)


def density_histogram(rep: dict):
    """log10 feature density histogram, dead features as their own bar; None without one."""
    h = ((rep.get("sparsity") or {}).get("density_histogram")) or {}
    if not h.get("counts"):
        return None
    edges, counts = np.asarray(h["log10_edges"]), np.asarray(h["counts"])
    fig, ax = plt.subplots(figsize=SIZE)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0", label="live")
    if h.get("dead"):
        ax.bar([edges[0] - 0.5], [h["dead"]], width=0.4, color="#c44e52", label="dead")
    ax.set(xlabel="log10 feature density (fraction of rows it fires on)", ylabel="features",
           title=f"Feature density ({h.get('live', int(counts.sum()))} live, {h.get('dead', 0)} dead)")
    ax.legend()
    fig.tight_layout()
    return fig


def description_length_curve(rep: dict):
    """Description length per row against the bits per value (the selected precision marked); None without."""
    dl = rep.get("description_length") or {}
    sweep = dl.get("sweep") or []
    if not sweep:
        return None
    bits = [s["bits"] for s in sweep]
    fig, ax = plt.subplots(figsize=SIZE)
    ax.plot(bits, [s["dl_bits_per_row"] for s in sweep], "o-", label="description length")
    if "fvu" in sweep[0]:
        ax2 = ax.twinx()
        ax2.plot(bits, [s["fvu"] for s in sweep], "s--", color="#dd8452", label="FVU")
        ax2.set_ylabel("FVU at that precision")
    if dl.get("selected_bits") is not None:
        ax.axvline(dl["selected_bits"], color="grey", ls=":", label=f"selected: {dl['selected_bits']} bits")
    ax.set(xlabel="bits per activation value", ylabel="bits per row", title="Description length")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def probe_accuracy_vs_k(rep: dict):
    """Test accuracy against k for each feature set and method, with 95% intervals; None without results."""
    ks, results = rep.get("ks") or [], rep.get("results") or {}
    if not ks or not results:
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    for fs, by_method in results.items():
        for method, per_k in by_method.items():
            acc = [(per_k.get(str(k)) or {}).get("accuracy") for k in ks]
            ci = [((per_k.get(str(k)) or {}).get("ci95") or {}).get("accuracy") for k in ks]
            ok = [i for i, a in enumerate(acc) if a is not None]
            line = ax.plot([ks[i] for i in ok], [acc[i] for i in ok], "o-", label=f"{fs}/{method}")[0]
            lo_hi = [(ks[i], ci[i]) for i in ok if ci[i]]
            if lo_hi:
                ax.fill_between([k for k, _ in lo_hi], [c[0] for _, c in lo_hi], [c[1] for _, c in lo_hi],
                                color=line.get_color(), alpha=0.12)
    if rep.get("majority_baseline") is not None:
        ax.axhline(rep["majority_baseline"], color="grey", ls=":", label="majority")
    ax.set(xscale="log", xlabel="k (features in the probe)", ylabel="test accuracy",
           title=f"Probe: {rep.get('label')} = {rep.get('positive')} vs rest")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def loss_recovered(rep: dict):
    """Loss recovered (vs mean and zero ablation) with 95% intervals; None without a splice-in result."""
    s = ((rep.get("downstream") or {}).get("splice_in")) or {}
    names = [k for k in ("loss_recovered_vs_mean", "loss_recovered_vs_zero") if s.get(k) is not None]
    if not names:
        return None
    vals = [s[k] for k in names]
    ci = [(s.get("ci95") or {}).get(k) or [v, v] for k, v in zip(names, vals)]
    err = np.array([[v - c[0] for v, c in zip(vals, ci)], [c[1] - v for v, c in zip(vals, ci)]])
    fig, ax = plt.subplots(figsize=SIZE)
    ax.barh([n.replace("loss_recovered_", "") for n in names], vals, xerr=err, color="#55a868", capsize=6)
    for i, (v, c) in enumerate(zip(vals, ci)):
        ax.text(0.02, i, f"{v:.3f} [{c[0]:.3f}, {c[1]:.3f}]", va="center", color="white")
    ax.set(xlim=(0, 1.02), xlabel="fraction of the ablation's CE increase recovered",
           title=f"Loss recovered over {s.get('n_tokens', '?')} tokens (95% interval)")
    fig.tight_layout()
    return fig


def score_distribution(table, columns=("score_detection", "score_fuzzing", "score_embedding")):
    """Histograms of the explanation scores over features (pandas table with score_* columns); None without."""
    cols = [c for c in columns if table is not None and c in table and table[c].notna().any()]
    if not cols:
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    bins = np.linspace(0, 1, 21)
    for c in cols:
        v = table[c].dropna().to_numpy()
        ax.hist(v, bins=bins, alpha=0.5, label=f"{c.replace('score_', '')} (n={len(v)}, mean {v.mean():.3f})")
    ax.axvline(0.5, color="grey", ls=":", label="chance")
    ax.set(xlabel="score per feature", ylabel="features", title="Explanation scores")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
