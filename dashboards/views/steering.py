"""Steering: default vs steered generation (LLM runs) or steered search (embedding runs), live,
through `saekit.analysis.steering` (imported only when the page runs something); for LLM runs also
the measured sweep of the chosen feature: the one saved under the run's steer folder by
`saekit steer RUN --sweep`, or a small one run live (effect-vs-damage curve, table, samples)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from saekit.layout import RunFolder
from views.common import cached_corpus, cached_embedder, cached_lm, cached_sae

MODES = ["add", "clamp", "ablate"]


def _steering():
    """The steering API, or None with a message when it is not installed in this checkout."""
    try:
        from saekit.analysis import steering
    except ImportError as e:
        st.warning(f"Steering is unavailable here (saekit.analysis.steering could not be imported: {e}).")
        return None
    return steering


def _edit_controls(bundle) -> dict:
    c = st.columns(4)
    default = {} if "steer_feature" in st.session_state else \
        {"value": min(st.session_state.get("feature", 0), bundle.d_sae - 1)}  # set by "steer with this feature"
    f = int(c[0].number_input("Feature", 0, bundle.d_sae - 1, key="steer_feature", **default))
    mode = c[1].selectbox("Mode", MODES, key="steer_mode")
    alpha = float(c[2].number_input("alpha (add)", value=8.0 if bundle.is_llm else 0.5, key="steer_alpha"))
    value = float(c[3].number_input("value (clamp)", value=5.0, key="steer_value"))
    return {"feature": f, "mode": mode, "alpha": alpha, "value": value}


def open_steering(f: int) -> None:
    """Button callback (the feature page's "steer with this feature"): open this page on feature `f`."""
    st.session_state["feature"] = int(f)
    st.session_state["steer_feature"] = int(f)
    st.session_state["view"] = "Steering"


def render(bundle, run: RunFolder) -> None:
    st.subheader("Steering" + (" · generation" if bundle.is_llm else " · search"))
    edit = _edit_controls(bundle)
    if bundle.is_llm:
        generation(bundle, run, edit)
        sweep(bundle, run, edit["feature"])
    else:
        search(bundle, run, edit)


def _show_sweep(report: dict) -> None:
    """The effect-vs-damage curve, the table with intervals, the chosen strength and the samples."""
    from saekit.analysis.sweep_report import format_sweep_table, sweep_table

    metric = report["chosen"]["metric"]
    curve = pd.DataFrame({"KL (nats)": [r["kl"]["mean"] for r in report["rows"]],
                          metric: [r[metric]["mean"] for r in report["rows"]]})
    st.line_chart(curve, x="KL (nats)", y=metric)
    st.dataframe(pd.DataFrame(sweep_table(report)), hide_index=True)
    st.caption(format_sweep_table(report).splitlines()[-1])
    strength = st.selectbox("Samples at strength", [r["strength"] for r in report["rows"]], key="sweep_strength")
    row = next(r for r in report["rows"] if r["strength"] == strength)
    st.dataframe(pd.DataFrame({"prompt": report["prompts"], "continuation": row["samples"]}), hide_index=True)


def sweep(bundle, run: RunFolder, feature: int) -> None:
    st.markdown("**Measured sweep** (effect vs damage over strengths)")
    from saekit.analysis.sweep_report import saved_sweeps

    saved = {k: v for k, v in saved_sweeps(run.steer).items() if v.get("feature") == feature}
    if saved:
        name = st.selectbox("Saved sweep", list(saved), key="sweep_saved")
        return _show_sweep(saved[name])
    c = st.columns(3)
    strengths = c[0].text_input("Strengths", value="0,20,40,80", key="sweep_strengths")
    words = c[1].text_input("Target words", value="", key="sweep_words", placeholder=" flight, airline")
    n_new = int(c[2].number_input("New tokens", 1, 64, value=12, key="sweep_tokens"))
    if not st.button("Run a small sweep", key="sweep_go"):
        st.caption(f"No saved sweep of feature #{feature} (`saekit steer RUN --sweep --feature {feature}`); "
                   "a small one runs live on three prompts.")
        return
    api = _steering()
    if api is None:
        return
    from saekit.analysis.steering_sweep import steering_sweep

    model, tok = cached_lm(bundle.manifest["source"]["model"], bundle.kind)
    targets = api.topic_token_ids(tok, [" " + w.strip() for w in words.split(",") if w.strip()]) if words else []
    report = steering_sweep(model, tok, bundle.manifest["hook"], ["I think that", "Today I", "My favourite"],
                            [float(x) for x in strengths.split(",") if x.strip()], sae=cached_sae(run),
                            feature=feature, target_token_ids=targets, max_new_tokens=n_new, progress=False)
    _show_sweep(report)


def generation(bundle, run: RunFolder, edit: dict) -> None:
    prompt = st.text_input("Prompt", value="", key="steer_prompt", placeholder="I think that")
    c = st.columns(2)
    n_new = int(c[0].number_input("New tokens", 1, 200, value=24, key="steer_tokens"))
    seed = int(c[1].number_input("Seed", 0, 2**31 - 1, value=0, key="steer_seed"))
    if not (st.button("Generate", key="steer_go") and prompt.strip()):
        st.caption("Pick a feature and an edit, type a prompt and press Generate.")
        return
    api = _steering()
    if api is None:
        return
    model, tok = cached_lm(bundle.manifest["source"]["model"], bundle.kind)
    out = api.generate_steered(model, tok, prompt, bundle.manifest["hook"], sae=cached_sae(run),
                               edits=[api.FeatureEdit(**edit)], max_new_tokens=n_new, seed=seed)
    left, right = st.columns(2)
    left.markdown("**Default**")
    left.write(prompt + out["default"])
    right.markdown(f"**Steered** (#{edit['feature']} {edit['mode']})")
    right.write(prompt + out["steered"])


def search(bundle, run: RunFolder, edit: dict) -> None:
    query = st.text_input("Query", value="", key="steer_query", placeholder="a sentence to search the corpus with")
    top_n = int(st.number_input("Results", 1, 50, value=10, key="steer_top"))
    if not (st.button("Search", key="steer_go") and query.strip()):
        st.caption("Pick a feature and an edit, type a query and press Search.")
        return
    api = _steering()
    if api is None:
        return
    corpus_ND, doc_ids, docs = cached_corpus(run, bundle.manifest["hook"])
    q = cached_embedder(bundle.manifest["source"]["model"]).encode([query], convert_to_tensor=True).float().cpu()[0]
    out = api.steered_search(cached_sae(run), q, corpus_ND, [api.FeatureEdit(**edit)], top_n)

    def table(ranked):
        return pd.DataFrame([{"row": r, "cosine": round(s, 4), "moved": r in out["moved"],
                              "text": docs.get(int(doc_ids[r]), {}).get("text", "")} for r, s in ranked])

    left, right = st.columns(2)
    left.markdown("**Before**")
    left.dataframe(table(out["before"]), hide_index=True)
    right.markdown("**After**")
    right.dataframe(table(out["after"]), hide_index=True)
    st.caption(f"Feature contributions: {out['feature_contributions']}")
