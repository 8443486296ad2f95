"""Probing and evaluation summaries, read from the run folder's JSON reports (no model, no torch).

Where they are is the `RunFolder`'s answer (per SAE for a multi-SAE run)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from saekit.browser.bundle import EXPLANATIONS_TABLE, PROBE_FILE
from saekit.layout import RunFolder
from views import eval_figures as eval_figures_mod
from views.eval_figures import plt


def probe_files(run: RunFolder) -> list[Path]:
    return sorted(run.probe.glob("*.json")) if run.probe.is_dir() else []


def eval_report(run: RunFolder) -> Path | None:
    p = run.eval / "report.json"
    return p if p.exists() else None


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        st.error(f"{path} cannot be read ({e}); rerun the stage that writes it.")
        return None


def _accuracy_table(rep: dict) -> pd.DataFrame:
    rows = []
    for k in rep.get("ks", []):
        row = {"k": k}
        for fs, by_method in rep.get("results", {}).items():
            for method, per_k in by_method.items():
                row[f"{fs}/{method}"] = (per_k.get(str(k)) or {}).get("accuracy")
        rows.append(row)
    return pd.DataFrame(rows)


def class_table(section: dict) -> pd.DataFrame:
    """One row per class: its best single SAE latent and neuron, their accuracy and 95 % interval."""
    rows = []
    for c, e in (section.get("classes") or {}).items():
        row = {"class": c, "examples": e.get("count"), "majority": e.get("majority_baseline")}
        for fs, b in (e.get("best") or {}).items():
            ci = b.get("ci95") or [None, None]
            row.update({f"{fs} best": b.get("feature"), f"{fs} accuracy": b.get("accuracy"),
                        f"{fs} ci95": f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else "-"})
        rows.append(row)
    return pd.DataFrame(rows)


def render_probe_section(run: RunFolder) -> None:
    """The bundle's `probe` section: per class the best latents, their accuracy and a few top examples."""
    path = run.bundle / PROBE_FILE
    section = _read(path) if path.exists() else None
    if not isinstance(section, dict):
        return
    st.markdown(f"**Best single latent per class** · label `{section.get('label')}` · unit {section.get('unit')} "
                f"(pooling `{section.get('pooling')}`)")
    st.dataframe(class_table(section), hide_index=True)
    for c, e in (section.get("classes") or {}).items():
        best = (e.get("best") or {}).get("sae")
        if best and best.get("top_examples"):
            with st.expander(f"{c}: latent {best['feature']}'s top examples"):
                for ex in best["top_examples"]:
                    st.markdown(f"- ({ex.get('label')}, {ex.get('activation', 0):.3g}) {ex.get('text', '')}")


def render_probing(run: RunFolder) -> None:
    st.subheader("Sparse probing")
    render_probe_section(run)
    for path in probe_files(run):
        rep = _read(path)
        if not isinstance(rep, dict):
            continue
        st.markdown(f"**{path.name}** · label `{rep.get('label')}` = `{rep.get('positive')}` vs rest · "
                    f"{rep.get('n_train_docs', '?')} train / {rep.get('n_test_docs', '?')} test documents · "
                    f"unit: {rep.get('unit', 'token')} (pooling `{rep.get('pooling', 'token')}`)")
        table = _accuracy_table(rep)
        if not table.empty and table.shape[1] > 1:
            st.line_chart(table.set_index("k"))
            st.dataframe(table, hide_index=True)
        dense = rep.get("dense") or {}
        if dense:
            st.caption("Dense probes: " + ", ".join(f"{k} {v.get('accuracy', 0):.3f}" for k, v in dense.items())
                       + f"; majority baseline {rep.get('majority_baseline', float('nan')):.3f}")
        with st.expander("Full report"):
            st.json({k: v for k, v in rep.items() if not k.endswith("doc_ids")}, expanded=False)
        png = path.with_name("accuracy_vs_k.png")
        if png.exists():
            st.image(str(png))


def _scalars(obj, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _scalars(v, f"{prefix}{k}.")
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        out.append((prefix.rstrip("."), obj))
    return out


def training_curve(run: RunFolder) -> pd.DataFrame:
    """Training and validation FVU by step from the trainer's metrics.jsonl (empty when there is none):
    `fvu` is the logged batch's, `train_fvu` the training batches' since the previous evaluation,
    `val_fvu` the fixed held-out sample's."""
    path = run.metrics()
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                rows.append({k: rec.get(k) for k in ("step", "fvu", "train_fvu", "val_fvu")})
    df = pd.DataFrame(rows, columns=["step", "fvu", "train_fvu", "val_fvu"])
    return df.groupby("step", as_index=False).last() if not df.empty else df


def render_training_curve(run: RunFolder) -> None:
    """The validation curve beside the training one: held-out FVU rising while training FVU falls is
    memorisation (more documents, fewer epochs or a smaller width)."""
    df = training_curve(run)
    if df.empty or df["val_fvu"].isna().all():
        return
    st.markdown("**Training vs validation FVU** (validation: a fixed sample of held-out documents)")
    st.line_chart(df.set_index("step")[["fvu", "train_fvu", "val_fvu"]])


def _explanation_table(run: RunFolder):
    """The bundle's explanation table (saekit explain), None when there is none or it cannot be read."""
    path = run.bundle / EXPLANATIONS_TABLE
    try:
        return pd.read_parquet(path) if path.exists() else None
    except Exception as e:  # noqa: BLE001 - a damaged table is a message here; the bundle check names it
        st.error(f"{path} cannot be read ({e}); rerun `saekit explain {run.root}`.")
        return None


def eval_figures(run: RunFolder, rep: dict) -> list[tuple[str, object]]:
    """(caption, matplotlib figure) of every figure the run's reports can draw."""
    probe_path = run.probe / "report.json"
    probe = _read(probe_path) if probe_path.exists() else None
    figs = [("Feature density", eval_figures_mod.density_histogram(rep)),
            ("Description length", eval_figures_mod.description_length_curve(rep)),
            ("Probe accuracy vs k", eval_figures_mod.probe_accuracy_vs_k(probe) if isinstance(probe, dict) else None),
            ("Loss recovered", eval_figures_mod.loss_recovered(rep)),
            ("Explanation scores", eval_figures_mod.score_distribution(_explanation_table(run)))]
    return [(name, fig) for name, fig in figs if fig is not None]


def render_eval(run: RunFolder) -> None:
    st.subheader("Evaluation")
    path = eval_report(run)
    rep = _read(path) if path else None
    if not isinstance(rep, dict):
        st.info(f"No evaluation report in {run.eval}.")
        render_training_curve(run)
        return
    gen = rep.get("generalisation")
    if isinstance(gen, dict) and gen.get("warning"):
        st.warning(gen["warning"])
    render_training_curve(run)
    cols = st.columns(2)
    for i, (name, fig) in enumerate(eval_figures(run, rep)):
        with cols[i % 2]:
            st.markdown(f"**{name}**")
            st.pyplot(fig)
        plt.close(fig)
    txt = path.with_name("report.txt")
    if txt.exists():
        with st.expander("Report (text)"):
            st.code(txt.read_text())
    with st.expander("Every number of the report"):
        rows = [(k, v) for k, v in _scalars(rep) if not isinstance(v, str) or len(v) < 80]
        st.dataframe(pd.DataFrame(rows, columns=["metric", "value"]).astype({"value": str}), hide_index=True)
