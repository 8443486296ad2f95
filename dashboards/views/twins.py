"""Twins: each latent's best-matched latent in another run (`saekit compare-features A B` wrote
compare/<B>/compare.json into run A), with both latents' top examples side by side (files only)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from saekit.layout import RunFolder

COMPARE_JSON, COMPARE_PNG = "compare.json", "compare.png"


def comparisons(run: RunFolder) -> list[Path]:
    root = run.compare
    return sorted(p.parent for p in root.glob(f"*/{COMPARE_JSON}")) if root.is_dir() else []


def available(run: RunFolder) -> bool:
    return bool(comparisons(run))


def _summary(s: dict) -> str:
    return (f"{s['a']} vs {s['b']} · {s['level']} level · {s['aligned_rows']:,} aligned rows · "
            f"{s['share_matched']:.1%} of live latents matched at corr ≥ {s['threshold']} · "
            f"SVCCA {s['svcca']:.3f} (shuffled {s['svcca_permuted']:.3f}) · CKA {s['cka']:.3f} "
            f"(shuffled {s['cka_permuted']:.3f})")


def _examples(ex: dict) -> None:
    left, right = st.columns(2)
    for col, side in ((left, "a"), (right, "b")):
        for e in ex.get(side, []):
            where = f"doc {e['doc_id']}" + (f", token {e['pos']}" if "pos" in e else "")
            context = e.get("context", "").replace("[[", "**⟦").replace("]]", "⟧**")
            col.markdown(f"`{e['value']:.2f}` {where}: {context or e['text']}")
            if context:
                col.caption(e["text"])


def render(run: RunFolder) -> None:
    folders = comparisons(run)
    other = st.selectbox("Compared with", [p.name for p in folders], key="twins_other")
    data = json.loads((run.compare / other / COMPARE_JSON).read_text())
    s = data["summary"]
    st.subheader("This latent's twin in the other run")
    st.caption(_summary(s))
    pairs = pd.DataFrame(data["pairs"])
    feature = int(st.number_input("Latent (this run)", 0, value=int(st.session_state.get("feature", 0)),
                                  key="twins_feature"))
    hit = pairs[pairs["a"] == feature]
    if hit.empty:
        st.info(f"Latent {feature} has no twin: it does not fire on the aligned rows (or was left unmatched).")
    else:
        b, corr = int(hit.iloc[0]["b"]), float(hit.iloc[0]["corr"])
        verdict = "a twin" if corr >= s["threshold"] else "no twin above the threshold; the closest is"
        st.markdown(f"**Latent {feature}** has {verdict} **{s['b']} #{b}** (activation correlation {corr:.3f}).")
        ex = data.get("examples", {}).get(f"{feature}-{b}")
        if ex:
            _examples(ex)
    st.markdown("**Best-matched pairs**")
    st.dataframe(pairs.head(200), hide_index=True)
    png = run.compare / other / COMPARE_PNG
    if png.is_file():
        st.image(str(png))
    best = list(data.get("examples", {}).items())[:5]
    for key, ex in best:
        a, b = key.split("-")
        with st.expander(f"{s['a']} #{a}  ↔  {s['b']} #{b}"):
            _examples(ex)
