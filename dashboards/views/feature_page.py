"""One feature: stats, highlighted top examples, interval samples, histogram, logit lens,
neighbours, co-firing features, label distribution and family — all from the bundle's
`FeatureRecord` (saekit.browser.bundle), read by the names that type declares."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from saekit.browser.bundle import Bundle, Example, FeatureRecord
from views import explanations
from views.common import highlight, highlight_doc, open_feature
from views.steering import open_steering


def render(bundle: Bundle, run_key: str) -> None:
    if st.session_state.get("feature", 0) >= bundle.d_sae:
        st.session_state["feature"] = 0
    f = int(st.number_input(f"Feature (0 – {bundle.d_sae - 1})", 0, bundle.d_sae - 1, step=1, key="feature"))
    rec = bundle.feature(f)
    stats_row(rec, bundle)
    explanations.feature_panel(bundle, f)
    st.button("Steer with this feature", key="steer_with", on_click=open_steering, args=(f,))
    tabs = st.tabs(["Top examples", "Interval samples", "Histogram", "Logit lens", "Neighbours", "Labels", "Family"])
    with tabs[0]:
        examples(rec["top"], rec["max"], bundle.is_llm, "top")
    with tabs[1]:
        intervals(rec, bundle.is_llm)
    with tabs[2]:
        histogram(rec)
    with tabs[3]:
        logit_lens(rec, bundle)
    with tabs[4]:
        neighbours(rec)
    with tabs[5]:
        labels(rec)
    with tabs[6]:
        family(rec)
        refined_by(rec)


def stats_row(rec: FeatureRecord, bundle: Bundle) -> None:
    c = st.columns(4)
    c[0].metric("Density", f"{rec['density']:.3%}")
    c[1].metric("Firings", f"{rec['count']:,}")
    c[2].metric("Mean activation", f"{rec['mean']:.4g}")
    c[3].metric("Max activation", f"{rec['max']:.4g}")
    if rec["count"] == 0:
        st.warning(f"Feature {rec['feature']} is dead: it never fired on the {bundle.n_rows:,} rows analysed.")
    elif rec["count"] == 1:
        st.info("This feature fired exactly once.")
    if rec.get("mostly_outliers"):
        rule = (bundle.manifest.get("outliers") or {}).get("rule", {}).get("description", "row norm far above the median")
        st.warning(f"Outlier feature: {rec['outlier_examples']} of its {len(rec['top'])} top examples are "
                   f"massive-activation outlier rows ({rule}). It mostly describes those few rows, not ordinary text.")


def examples(items: list[Example], vmax: float, is_llm: bool, key: str) -> None:
    if not items:
        st.caption("No examples.")
        return
    for i, it in enumerate(items):
        lab = ", ".join(f"{k}: {v}" for k, v in (it.get("labels") or {}).items())
        meta = f"act **{it['act']:.4g}** · doc {it['doc']}" + (f" · pos {it['pos']}" if "pos" in it else "")
        meta += " · **outlier row**" if it.get("outlier") else ""
        st.markdown(meta + (f" · {lab}" if lab else ""))
        body = (highlight(it["tokens"], it["acts"], vmax, it["center"]) if is_llm and "tokens" in it
                else highlight_doc(it.get("text", ""), it["act"], vmax))
        st.markdown(body, unsafe_allow_html=True)


def intervals(rec: FeatureRecord, is_llm: bool) -> None:
    if not rec["quantiles"]:
        st.caption("No samples (the feature never fired).")
        return
    for q in reversed(rec["quantiles"]):
        with st.expander(f"Activations {q['lo']:.4g} – {q['hi']:.4g} ({len(q['examples'])} samples)",
                         expanded=q is rec["quantiles"][-1]):
            examples(q["examples"], rec["max"], is_llm, f"q{q['interval']}")


def histogram(rec: FeatureRecord) -> None:
    counts = rec["hist"]["counts"]
    if rec["count"] == 0 or not any(counts):
        st.info("Empty histogram: the feature never fired.")
        return
    width = rec["hist"]["max"] / len(counts)
    df = pd.DataFrame({"activation": [round((i + 0.5) * width, 5) for i in range(len(counts))], "firings": counts})
    st.bar_chart(df, x="activation", y="firings")


def logit_lens(rec: FeatureRecord, bundle: Bundle) -> None:
    lens = rec["logit_lens"]
    if not bundle.is_llm:
        st.caption("The logit lens applies to language-model runs only.")
        return
    if not lens["promoted"]:
        st.caption("No logit lens in this bundle (the model's unembedding was not available when it was built).")
        return
    c1, c2 = st.columns(2)
    c1.markdown("**Promoted tokens**")
    c1.dataframe(pd.DataFrame(lens["promoted"], columns=["token", "logit"]), hide_index=True)
    c2.markdown("**Suppressed tokens**")
    c2.dataframe(pd.DataFrame(lens["suppressed"], columns=["token", "logit"]), hide_index=True)


def _jump_buttons(ids: list[int], prefix: str, labels: list[str]) -> None:
    cols = st.columns(max(min(len(ids), 5), 1))
    for i, (g, lab) in enumerate(zip(ids[:5], labels[:5])):
        cols[i].button(f"#{g} ({lab})", key=f"{prefix}_{g}", on_click=open_feature, args=(g,))


def neighbours(rec: FeatureRecord) -> None:
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Decoder-cosine neighbours**")
        if rec["neighbours"]:
            st.dataframe(pd.DataFrame(rec["neighbours"], columns=["feature", "cosine"]), hide_index=True)
            _jump_buttons([n[0] for n in rec["neighbours"]], "nb", [f"{n[1]:.2f}" for n in rec["neighbours"]])
        else:
            st.caption("No neighbours recorded.")
    with c2:
        st.markdown("**Co-firing features** (count, P(other | this))")
        if rec["cooccur"]:
            st.dataframe(pd.DataFrame(rec["cooccur"], columns=["feature", "together", "p_given_this"]), hide_index=True)
            _jump_buttons([c[0] for c in rec["cooccur"]], "co", [f"{c[2]:.0%}" for c in rec["cooccur"]])
        else:
            st.caption("Never fires together with another feature.")


def labels(rec: FeatureRecord) -> None:
    if not rec["labels"]:
        st.caption("No labels among the top examples (the corpus has none, or the feature never fired).")
        return
    cols = st.columns(len(rec["labels"]))
    for col, (key, dist) in zip(cols, rec["labels"].items()):
        col.markdown(f"**{key}** among the top {len(rec['top'])} examples")
        col.bar_chart(pd.DataFrame({"value": list(dist), "examples": list(dist.values())}), x="value", y="examples")


def family(rec: FeatureRecord) -> None:
    fam = rec["family"]
    if fam["parent"] is None and not fam["children"]:
        st.caption("Not part of a feature family (no feature's firing set nests with this one's).")
        return
    if fam["parent"] is not None:
        st.markdown(f"Parent: **#{fam['parent']}** fires on {fam['p_parent']:.0%} of this feature's firings.")
        st.button(f"Open parent #{fam['parent']}", key="fam_parent", on_click=open_feature, args=(fam["parent"],))
    if fam["children"]:
        st.markdown("Children (this feature fires whenever they do):")
        st.dataframe(pd.DataFrame(fam["children"], columns=["feature", "p_this_given_child"]), hide_index=True)
        _jump_buttons([c[0] for c in fam["children"]], "child", [f"{c[1]:.0%}" for c in fam["children"]])


def refined_by(rec: FeatureRecord) -> None:
    """A nested (matryoshka) SAE's general latent and the later-level latents that refine it."""
    level = rec.get("level", -1)
    if level < 0:
        return
    st.markdown(f"**Prefix level {level}** (0 = the most general latents)")
    refined = rec.get("refined_by") or []
    if not refined:
        st.caption("No later-level latent points the same way (decoder cosine below 0.3).")
        return
    st.caption("Refined by later-level latents: decoder cosine with this one, and how often this one fires when "
               "they do.")
    st.dataframe(pd.DataFrame(refined, columns=["feature", "decoder_cos", "p_this_given_it"]), hide_index=True)
    _jump_buttons([r[0] for r in refined], "refined", [f"cos {r[1]:.2f}" for r in refined])
