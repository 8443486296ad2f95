"""Shared pieces of the browser app: which runs, cached bundles, highlighting, guarded rendering.

The app reads bundles only; the few views that run a model (type your text, steering) load it
lazily through `cached_lm` / `cached_embedder` / `cached_sae`, once per process.
"""

from __future__ import annotations

import html
import logging
import os
import sys
from pathlib import Path

import pandas as pd
import streamlit as st

from saekit.browser.bundle import BUNDLE_DIR, Bundle, BundleError
from saekit.errors import SaekitError

log = logging.getLogger("saekit.dashboards")
RUNS_ENV = "SAEKIT_RUNS"


def looks_like_run(p: Path) -> bool:
    return p.is_dir() and any((p / d).exists() for d in (BUNDLE_DIR, "train", "store"))


def run_folders() -> list[Path]:
    """Runs from $SAEKIT_RUNS (os.pathsep-separated) or else the script arguments (`-- RUN...`)."""
    env = os.environ.get(RUNS_ENV)
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return [Path(a) for a in sys.argv[1:] if looks_like_run(Path(a))]


def run_labels(runs: list[Path]) -> dict[str, Path]:
    """Unique, readable labels: the folder name, with its parent when names repeat."""
    names = [r.name for r in runs]
    return {(f"{r.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name): r for r in runs}


@st.cache_resource(show_spinner="Checking the bundle…")
def _cached_bundle(path: str, stamp: float) -> Bundle:
    return Bundle(path, verify=True)


def load_bundle(run: Path) -> Bundle:
    """The run's verified bundle (cached until its manifest changes); BundleError when unusable."""
    manifest = run / BUNDLE_DIR / "saekit_manifest.json"
    if not manifest.exists():
        raise BundleError(f"No browser bundle in {run}. Build it with `saekit analyze {run}`.")
    return _cached_bundle(str(run / BUNDLE_DIR), manifest.stat().st_mtime)


def guarded(fn, *args) -> None:
    """Render a view. A named saekit error (a missing or damaged bundle, a bad run folder) is a
    state the app expects: it becomes a message on the page. Anything else is a bug in a view: it
    is shown with its trace through `st.exception`, so the rest of the app stays up while the
    crash stays visible (AppTest records it in `at.exception`; tests then fail instead of seeing
    a polite error box)."""
    try:
        fn(*args)
    except BundleError as e:
        st.error(f"This run's browser bundle cannot be used: {e}")
    except SaekitError as e:
        st.error(str(e))
    except Exception as e:  # noqa: BLE001 - shown as a crash, with its trace, not as a message
        log.exception("view %s crashed", getattr(fn, "__name__", fn))
        st.exception(e)


def open_feature(f: int) -> None:
    """Button callback: show feature `f` on the feature page."""
    st.session_state["feature"] = int(f)
    st.session_state["view"] = "Feature"


def highlight(tokens: list[str], acts: list[float], vmax: float, center: int | None = None) -> str:
    """HTML of a token window, each token's background as strong as its activation."""
    word_level = not any(t[:1].isspace() for t in tokens)
    spans = []
    for i, (t, a) in enumerate(zip(tokens, acts)):
        alpha = min(max(a / vmax, 0.0), 1.0) if vmax > 0 else 0.0
        style = f"background-color: rgba(255,130,0,{alpha:.2f});"
        if i == center:
            style += " outline: 1px solid #b30000;"
        text = html.escape(t.replace("\n", "⏎"))
        spans.append(f'<span class="saekit-tok" style="{style}" title="{a:.4g}">{text}</span>')
    sep = " " if word_level else ""
    return f'<div class="saekit-example" style="white-space: pre-wrap; line-height: 1.8">{sep.join(spans)}</div>'


def highlight_doc(text: str, act: float, vmax: float) -> str:
    """HTML of a whole document shaded by its activation (embedding runs)."""
    alpha = min(max(act / vmax, 0.0), 1.0) if vmax > 0 else 0.0
    return (f'<div class="saekit-example"><span class="saekit-tok" style="background-color: '
            f'rgba(255,130,0,{alpha:.2f})" title="{act:.4g}">{html.escape(text)}</span></div>')


def filter_features(df: pd.DataFrame, query: str, density: tuple[float, float], hide_dead: bool,
                    sort: str) -> pd.DataFrame:
    """The list page's search, filters and sort, as a pure function of the table."""
    out = df
    if hide_dead:
        out = out[~out["dead"]]
    out = out[(out["density"] >= density[0]) & (out["density"] <= density[1])]
    q = (query or "").strip()
    if q:
        if q.lstrip("#").isdigit():
            out = out[out["feature"] == int(q.lstrip("#"))]
        else:
            text = (out["top_tokens"] + " ␞ " + out["top_text"] + " ␞ " + out["top_labels"] + " ␞ " + out["promoted"])
            out = out[text.str.contains(q, case=False, regex=False)]
    key, asc = SORTS[sort]
    return out.sort_values(key, ascending=asc, kind="stable")


SORTS = {"density (high first)": ("density", False), "max activation": ("max", False),
         "mean activation": ("mean", False), "feature id": ("feature", True), "density (low first)": ("density", True),
         "children (families)": ("children", False)}


@st.cache_resource(show_spinner="Loading the SAE…")
def cached_sae(run: str):
    from saekit.sae.registry import load_sae

    return load_sae(Path(run) / "train").eval()


@st.cache_resource(show_spinner="Loading the language model…")
def cached_lm(model: str, kind: str):
    """(model to hook, tokenizer): the HF model, or its TransformerLens wrapper for 'lens' runs."""
    from saekit.sources.models import load_lens, load_lm

    hf, tok = load_lm(model)
    return (load_lens(model) if kind == "lens" else hf), tok


@st.cache_resource(show_spinner="Loading the embedding model…")
def cached_embedder(model: str):
    from saekit.sources.models import load_embedder

    return load_embedder(model)


@st.cache_resource(show_spinner="Reading the corpus embeddings…")
def cached_corpus(run: str):
    """(acts [N, d], doc ids [N], docs) of an embedding run's store, for steered search."""
    from saekit.store.reader import ActivationStore

    store = ActivationStore(Path(run) / "store")
    return store[:], store.meta("doc_id"), store.docs
