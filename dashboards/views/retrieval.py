"""Sparse retrieval: the recall/FLOPs Pareto table and plot `saekit index RUN` wrote into the run's
retrieval/ folder (files only: no model, no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from saekit.layout import RunFolder

PARETO_JSON, PARETO_PNG = "pareto.json", "pareto.png"


def available(run: RunFolder) -> bool:
    return (run.retrieval / PARETO_JSON).is_file()


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"


def render(run: RunFolder) -> None:
    data = json.loads(Path(run.retrieval / PARETO_JSON).read_text())
    st.subheader("Sparse retrieval from the SAE's codes")
    st.caption(f"Inverted index over {data['n_docs']:,} documents, d_sae {data['d_sae']}; exact dense search "
               f"costs {data['dense_flops_per_query']:.3g} FLOPs per query (recall 1 by definition).")
    rows = [{"k": p["k"], "re-rank": p["rerank"], "recall@10": p["recall@10"], "ci95": _ci(p.get("recall@10_ci95")),
             "nDCG@10": p["ndcg@10"], "FLOPs/query": p["flops_per_query"],
             "ms/query (index)": 1e3 * p["seconds_per_query"], "ms/query (dense)": 1e3 * p["dense_seconds_per_query"]}
            for p in data["points"]]
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    png = run.retrieval / PARETO_PNG
    if png.is_file():
        st.image(str(png))
