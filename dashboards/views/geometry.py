"""Geometry: per-layer IsoScore, intrinsic dimension, effective rank, norms and pooled-probe accuracy,
and the SAE's decoder spectrum and co-occurrence lobes, as `saekit geometry RUN` wrote them (files only)."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from saekit.layout import RunFolder

LAYERS_JSON, LAYERS_PNG, SAE_JSON, SPECTRUM_PNG = "layers.json", "layers.png", "sae.json", "spectrum.png"


def _layers_dir(run: RunFolder):
    return RunFolder(run.root, run.store_path).geometry


def available(run: RunFolder) -> bool:
    return (_layers_dir(run) / LAYERS_JSON).is_file() or (run.geometry / SAE_JSON).is_file()


def _layer_table(layers: list[dict]) -> pd.DataFrame:
    rows = []
    for r in layers:
        p = r.get("probe") or {}
        ci = p.get("ci95")
        rows.append({"hook": r["hook"], "rows": r["rows"], "IsoScore": r["isoscore"], "φ (share of dims)": r["fraction"],
                     "TwoNN dim": r["twonn_dim"], "effective rank": r["effective_rank"],
                     "median norm": r["norm_median"], "mean cosine": r["mean_cosine"],
                     "probe acc.": p.get("accuracy"), "probe ci95": f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-",
                     "majority": p.get("majority")})
    return pd.DataFrame(rows)


def render(run: RunFolder) -> None:
    st.subheader("Layer geometry")
    layers_file = _layers_dir(run) / LAYERS_JSON
    if layers_file.is_file():
        st.dataframe(_layer_table(json.loads(layers_file.read_text())["layers"]), hide_index=True)
        if (_layers_dir(run) / LAYERS_PNG).is_file():
            st.image(str(_layers_dir(run) / LAYERS_PNG))
    sae_file = run.geometry / SAE_JSON
    if not sae_file.is_file():
        st.info(f"No SAE dictionary geometry yet: `saekit geometry {run.root}`.")
        return
    geo = json.loads(sae_file.read_text())
    pl = geo["power_law"]
    st.subheader("The SAE's dictionary")
    if pl.get("alpha") is not None:
        st.markdown(f"Decoder-direction covariance spectrum: power law **α = {pl['alpha']:.3f}** "
                    f"(R² {pl['r2']:.3f} over ranks {pl['fit_ranks'][0]}–{pl['fit_ranks'][1]}).")
    lob = geo.get("lobes")
    if lob:
        st.markdown(f"Co-occurrence lobes of the {len(lob['latents'])} most frequent latents over "
                    f"{lob['documents']:,} documents: sizes {lob['sizes']}; mean phi within a lobe "
                    f"{lob['within_phi']:.3f} vs between lobes {lob['between_phi']:.3f}.")
        df = pd.DataFrame({"latent": lob["latents"], "lobe": lob["lobe"], "frequency": lob["frequency"]})
        lobe = st.selectbox("Lobe", sorted(set(lob["lobe"])), key="geometry_lobe")
        st.dataframe(df[df["lobe"] == lobe].head(100), hide_index=True)
    if (run.geometry / SPECTRUM_PNG).is_file():
        st.image(str(run.geometry / SPECTRUM_PNG))
