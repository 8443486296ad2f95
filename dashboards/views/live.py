"""Type your text: which features fire on each token (LLM runs) or on the document (embedding runs).

Computed live: the text is tokenised by `saekit.sources.hf.tokenize` with the store's own source
settings (the same BOS rule as caching), the model runs up to the run's hook through
`saekit.sources.hooks.capture` and the SAE encodes the activations. Models and the SAE are cached once per process.
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
            "values": code.values.tolist()}


def _top_features(indices, values) -> pd.DataFrame:
    rows = [(int(i), float(v)) for ri, rv in zip(indices, values) for i, v in zip(ri, rv) if v > 0]
    if not rows:
        return pd.DataFrame(columns=["feature", "max_act", "tokens"])
    df = pd.DataFrame(rows, columns=["feature", "act"])
    return (df.groupby("feature").agg(max_act=("act", "max"), tokens=("act", "size"))
            .reset_index().sort_values("max_act", ascending=False))


def show(bundle, res: dict) -> None:
    top = _top_features(res["indices"], res["values"])
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
        st.dataframe(pd.DataFrame({"token": res["tokens"], "features": per_tok}), hide_index=True)
    st.markdown("**Features firing most**")
    st.dataframe(top.head(50), hide_index=True)
    cols = st.columns(4)
    for i, f in enumerate(top["feature"].head(8)):
        cols[i % 4].button(f"Open #{f}", key=f"live_open_{f}", on_click=open_feature, args=(int(f),))
