"""Shared pieces of the browser app: which runs, cached bundles, highlighting, guarded rendering.

A "run" in the app is a `saekit.layout.RunFolder`: one per single run, and one per SAE of a
multi-SAE run, so every page (bundle, probing, evaluation, live model) reads that SAE's own folders
and the store the run's config names. The app reads bundles only; the few views that run a model
(type your text, steering) load it lazily through `cached_lm` / `cached_embedder` / `cached_sae`
(all through `saekit.sources.models.load_for_spec`), once per process.
"""

from __future__ import annotations

import html
import logging
import os
import sys
from pathlib import Path

import pandas as pd
import streamlit as st

from saekit.artifacts import MANIFEST
from saekit.browser.bundle import Bundle, BundleError
from saekit.errors import SaekitError
from saekit.layout import RunFolder

log = logging.getLogger("saekit.dashboards")
RUNS_ENV = "SAEKIT_RUNS"


def looks_like_run(p: Path) -> bool:
    return RunFolder(p).looks_like_run()


def run_folders() -> list[RunFolder]:
    """Runs from $SAEKIT_RUNS (os.pathsep-separated) or else the script arguments (`-- RUN...`); a
    multi-SAE run contributes one entry per SAE."""
    env = os.environ.get(RUNS_ENV)
    paths = [Path(p) for p in env.split(os.pathsep) if p] if env else \
        [Path(a) for a in sys.argv[1:] if looks_like_run(Path(a))]
    return [f for p in paths for f in RunFolder(p).per_sae()]


def run_labels(runs: list[RunFolder]) -> dict[str, RunFolder]:
    """Unique, readable labels: the run's label, with its parent folder's name when labels repeat."""
    labels = [r.label for r in runs]
    return {(f"{r.root.parent.name}/{r.label}" if labels.count(r.label) > 1 else r.label): r for r in runs}


@st.cache_resource(show_spinner="Checking the bundle…")
def _cached_bundle(path: str, stamp: float) -> Bundle:
    return Bundle(path, verify=True)


def load_bundle(run: RunFolder) -> Bundle:
    """The run's verified bundle (cached until its manifest changes); BundleError when unusable."""
    manifest = run.bundle / MANIFEST
    if not manifest.exists():
        raise BundleError(f"No browser bundle in {run.bundle}. Build it with `saekit analyze {run.root}`.")
    return _cached_bundle(str(run.bundle), manifest.stat().st_mtime)


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
                    sort: str, hide_outliers: bool = False) -> pd.DataFrame:
    """The list page's search, filters and sort, as a pure function of the table. `hide_outliers`
    drops features whose top examples are mostly massive-activation outliers (a table without the
    `mostly_outliers` column, from an older bundle, has none to drop)."""
    out = df
    if hide_dead:
        out = out[~out["dead"]]
    if hide_outliers and "mostly_outliers" in out:
        out = out[~out["mostly_outliers"].astype(bool)]
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


def cached_sae(run: RunFolder):
    """The run's SAE (eval mode), loaded once per process."""
    return _cached_sae(str(run.train()))


@st.cache_resource(show_spinner="Loading the SAE…")
def _cached_sae(train_dir: str):
    from saekit.sae.registry import load_sae

    return load_sae(train_dir).eval()


@st.cache_resource(show_spinner="Loading the language model…")
def cached_lm(model: str, kind: str):
    """(model to hook, tokenizer) of an LLM run's source: the HF model, or its TransformerLens
    wrapper for 'lens' runs."""
    from saekit.sources.models import load_for_spec

    return load_for_spec({"kind": kind, "model": model})


@st.cache_resource(show_spinner="Loading the embedding model…")
def cached_embedder(model: str):
    from saekit.sources.models import load_for_spec

    return load_for_spec({"kind": "embedding", "model": model})[0]


def cached_corpus(run: RunFolder, hook: str | None = None):
    """(acts [N, d], doc ids [N], docs) of an embedding run's store, for steered search."""
    return _cached_corpus(str(run.store), hook)


@st.cache_resource(show_spinner="Reading the corpus embeddings…")
def _cached_corpus(store_root: str, hook: str | None):
    from saekit.store.locate import store_for_hook

    store = store_for_hook(store_root, hook)
    return store[:], store.meta("doc_id"), store.docs
