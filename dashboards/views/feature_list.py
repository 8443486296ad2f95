"""Feature list: search by token / text / label, sort, density, dead-feature, outlier-feature and prefix-level
(matryoshka SAEs) filters."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from saekit.browser.bundle import Bundle
from views import explanations
from views.common import SORTS, filter_features, open_feature

# columns of the bundle's `FeatureRow` table (saekit.browser.bundle) shown in the list, in this order
SHOWN_COLUMNS = ["feature", "explanation", "score_detection", "density", "count", "max", "top_tokens", "top_text",
                 "top_labels", "promoted", "children", "mostly_outliers", "level"]
N_BUTTONS = 12


def render(bundle: Bundle, run_key: str) -> None:
    df = bundle.table
    st.subheader(f"Features · {bundle.d_sae} latents · {bundle.n_rows:,} rows · {bundle.manifest['dead']} dead")
    query = st.text_input("Search (token, text, label or promoted token; #id for a feature)", key="search")
    ex_query = explanations.search_box(df)
    c1, c2, c3 = st.columns([2, 1, 3])
    sort = c1.selectbox("Sort by", list(SORTS) + explanations.sort_options(df), key="sort")
    hide_dead = c2.checkbox("Hide dead", value=True, key="hide_dead")
    n_out = int(df["mostly_outliers"].sum()) if "mostly_outliers" in df else 0
    hide_outliers = c2.checkbox(f"Hide outlier features ({n_out})", value=False, key="hide_outliers",
                                help="Features whose top examples are mostly massive-activation outlier rows "
                                     "(row norm far above the store's median; see the store manifest's rule)")
    dmax = float(df["density"].max()) if len(df) else 0.0
    top = dmax if dmax > 0 else 1.0
    density = c3.slider("Density range", 0.0, top, (0.0, top), key=f"density_{run_key}", format="%.4f")
    shown = filter_features(df, query, density, hide_dead, sort if sort in SORTS else "feature id",
                            hide_outliers=hide_outliers)
    shown = filter_levels(explanations.filter_and_sort(shown, ex_query, sort), level_choice(df))
    st.caption(f"{len(shown)} of {len(df)} features match")
    if shown.empty:
        st.info("No feature matches: widen the density range, show dead features or change the search.")
        return
    cols = [c for c in SHOWN_COLUMNS if (bundle.is_llm or c not in ("top_tokens", "promoted")) and c in shown]
    st.dataframe(shown[cols].head(2000), hide_index=True, width="stretch")
    st.markdown("**Open a feature**")
    grid = st.columns(3)
    for i, row in enumerate(shown.head(N_BUTTONS).itertuples()):
        hint = (row.top_tokens if bundle.is_llm else row.top_text)[:40] or "—"
        grid[i % 3].button(f"#{row.feature} · {hint}", key=f"open_{row.feature}", on_click=open_feature,
                           args=(row.feature,))


def level_choice(df: pd.DataFrame) -> list[int] | None:
    """The prefix levels to show (a nested SAE's bundle only; None shows every latent)."""
    if "level" not in df or not (df["level"] >= 0).any():
        return None
    levels = sorted(int(v) for v in df["level"].unique() if v >= 0)
    return st.multiselect("Prefix level (0 = most general latents)", levels, default=levels, key="levels")


def filter_levels(df: pd.DataFrame, levels: list[int] | None) -> pd.DataFrame:
    """Rows whose prefix level is chosen (all rows when `levels` is None)."""
    return df if levels is None else df[df["level"].isin(levels)]
