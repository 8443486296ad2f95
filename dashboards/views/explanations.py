"""Feature explanations in the browser (`saekit explain RUN`): the feature page's explanation and
scores, the list's search over explanations and sort by score. Kept apart from feature_list.py and
feature_page.py so those take one or two additive lines each; a bundle without explanations shows
nothing extra."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from saekit.browser.bundle import Bundle

SCORE_SORTS = {"explanation score: detection": "score_detection", "explanation score: fuzzing": "score_fuzzing",
               "explanation score: embedding": "score_embedding"}
SCORE_HELP = {"score_detection": "detection: balanced accuracy of the judge telling activating from non-activating "
                                 "examples given the explanation (0.5 = chance)",
              "score_fuzzing": "fuzzing: balanced accuracy of the judge telling the right marked tokens from "
                               "wrongly marked ones",
              "score_embedding": "embedding: AUROC of MiniLM similarity, explanation vs activating examples "
                                 "against their nearest non-activating neighbours"}


def sort_options(df: pd.DataFrame) -> list[str]:
    """The score sorts this table supports (none before `saekit explain`)."""
    return [name for name, col in SCORE_SORTS.items() if col in df and df[col].notna().any()]


def search_box(df: pd.DataFrame) -> str:
    """The explanation search box, shown only when the bundle has explanations."""
    if "explanation" not in df:
        return ""
    return st.text_input("Search explanations", key="search_explanations",
                         help="Words of the feature's explanation in words (saekit explain)")


def filter_and_sort(shown: pd.DataFrame, query: str, sort: str) -> pd.DataFrame:
    """Rows whose explanation contains `query` (case-insensitive), sorted by the chosen score (best first,
    unscored last) when `sort` is a score sort. Pure, so it is tested without Streamlit."""
    q = (query or "").strip()
    if q and "explanation" in shown:
        shown = shown[shown["explanation"].fillna("").str.contains(q, case=False, regex=False)]
    if sort in SCORE_SORTS and SCORE_SORTS[sort] in shown:
        shown = shown.sort_values(SCORE_SORTS[sort], ascending=False, kind="stable", na_position="last")
    return shown


def feature_panel(bundle: Bundle, f: int) -> None:
    """The feature's explanation and its scores (or why it was skipped) under its stats."""
    row = bundle.explanation(f)
    if row is None:
        return
    if row.get("skipped"):
        st.caption(f"No explanation: {row['skipped']}")
        return
    st.markdown(f"**Explanation** ({row.get('backend')}): {row.get('explanation')}")
    scores = {c: row.get(c) for c in SCORE_HELP if row.get(c) is not None}
    if scores:
        cols = st.columns(len(scores))
        for col, (c, v) in zip(cols, scores.items()):
            col.metric(c.replace("score_", "").capitalize() + " score", f"{v:.2f}", help=SCORE_HELP[c])
