"""Type your text: which features fire on each token (LLM runs) or on the document (embedding runs).

Computed live: the text is tokenised by `saekit.sources.hf.tokenize` with the store's own source
settings (the same BOS rule as caching), the model runs up to the run's hook through
`saekit.sources.hooks.capture` and the SAE encodes the activations. Models and the SAE are cached once per process.

The ranking leaves out the positions the store leaves out: special tokens (BOS) when the store
excluded them, and, when the run trained without them, massive-activation outliers (activation norm
above the bundle's `outliers.threshold_norm`). The page says how many it left out and why.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from saekit.layout import RunFolder
from views.common import cached_embedder, cached_lm, cached_sae, highlight, open_feature


def render(bundle, run: RunFolder) -> None:
    st.subheader("Type your text")
    text = st.text_area("Text", value="", key="live_text", placeholder="Type a sentence and press Find features")
    go = st.button("Find features", key="live_go")
    if go and text.strip():
        st.session_state["live_result"] = (str(run), text, encode_text(bundle, run, text))
    res = st.session_state.get("live_result")
    if not res or res[0] != str(run) or res[1] != text:
        st.caption("The features are computed with the run's model and SAE when you press the button.")
        return
    show(bundle, res[2])


def encode_text(bundle, run: RunFolder, text: str) -> dict:
    import torch

    spec, sae = bundle.manifest["source"], cached_sae(run)
    with torch.no_grad():
        if not bundle.is_llm:
            emb = cached_embedder(spec["model"]).encode([text], convert_to_tensor=True).float().cpu()
            code = sae.encode(emb)
            return {"tokens": None, "indices": code.indices.tolist(), "values": code.values.tolist()}
        from saekit.sources.base import SourceConfig
        from saekit.sources.hf import tokenize
        from saekit.sources.hooks import capture

        model, tok = cached_lm(spec["model"], bundle.kind)
        ids = tokenize(tok, [text], SourceConfig.from_spec(spec))["input_ids"]  # the caching's own BOS rule
        hook = bundle.manifest["hook"]
        acts = capture(model, [hook], lambda: model(ids))[hook][0].float()
        code = sae.encode(acts)
    return {"tokens": [tok.decode([int(t)]) for t in ids[0]], "indices": code.indices.tolist(),
            "values": code.values.tolist(), "excluded": excluded_positions(bundle, ids[0], acts, tok)}


def excluded_positions(bundle, ids_T, acts_TD, tok) -> list[str]:
    """Per position, why the ranking leaves it out ("" = ranked): 'special' (the store excludes special
    tokens such as BOS) or 'outlier' (norm above the threshold, when the run trained without outliers)."""
    spec, facts = bundle.manifest["source"], bundle.manifest.get("outliers") or {}
    special = set(tok.all_special_ids) if spec.get("exclude_special", True) else set()
    threshold = facts.get("threshold_norm") if facts.get("excluded_in_training") else None
    norm_T = acts_TD.double().pow(2).sum(-1).sqrt()
    out = []
    for t, n in zip(ids_T.tolist(), norm_T.tolist()):
        out.append("special" if int(t) in special else "outlier" if threshold is not None and n > threshold else "")
    return out


def ranked_positions(res: dict) -> tuple[list, list]:
    """(indices, values) of the positions the ranking uses (all for an embedding or an older result)."""
    why = res.get("excluded") or [""] * len(res["indices"])
    keep = [i for i, w in enumerate(why) if not w]
    return [res["indices"][i] for i in keep], [res["values"][i] for i in keep]


def exclusion_note(res: dict) -> str:
    why = [w for w in (res.get("excluded") or []) if w]
    if not why:
        return ""
    parts = [f"{why.count('special')} special token(s) such as BOS (the store excludes them)"] if "special" in why else []
    if "outlier" in why:
        parts.append(f"{why.count('outlier')} massive-activation outlier position(s) (the run trained without them)")
    return "The ranking below leaves out " + " and ".join(parts) + "."


def _top_features(indices, values) -> pd.DataFrame:
    rows = [(int(i), float(v)) for ri, rv in zip(indices, values) for i, v in zip(ri, rv) if v > 0]
    if not rows:
        return pd.DataFrame(columns=["feature", "max_act", "tokens"])
    df = pd.DataFrame(rows, columns=["feature", "act"])
    return (df.groupby("feature").agg(max_act=("act", "max"), tokens=("act", "size"))
            .reset_index().sort_values("max_act", ascending=False))


def show(bundle, res: dict) -> None:
    note = exclusion_note(res)
    if note:
        st.caption(note)
    top = _top_features(*ranked_positions(res))
    if top.empty:
        st.info("No feature fires on this text.")
        return
    table = bundle.table.set_index("feature")
    top["top_tokens" if bundle.is_llm else "top_text"] = [
        table.loc[f, "top_tokens" if bundle.is_llm else "top_text"] for f in top["feature"]]
    if res["tokens"] is not None:
        f = st.selectbox("Highlight feature", top["feature"].tolist(), key="live_feature")
        acts = [sum(v for i, v in zip(ri, rv) if i == f) for ri, rv in zip(res["indices"], res["values"])]
        st.markdown(highlight(res["tokens"], acts, max(acts) or 1.0), unsafe_allow_html=True)
        per_tok = [", ".join(f"#{i} {v:.3g}" for i, v in sorted(zip(ri, rv), key=lambda p: -p[1]) if v > 0)
                   for ri, rv in zip(res["indices"], res["values"])]
        excluded = res.get("excluded") or [""] * len(per_tok)
        st.dataframe(pd.DataFrame({"token": res["tokens"], "features": per_tok, "left out": excluded}), hide_index=True)
    st.markdown("**Features firing most**")
    st.dataframe(top.head(50), hide_index=True)
    cols = st.columns(4)
    for i, f in enumerate(top["feature"].head(8)):
        cols[i % 4].button(f"Open #{f}", key=f"live_open_{f}", on_click=open_feature, args=(int(f),))
