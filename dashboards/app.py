"""saekit feature browser (Streamlit): `saekit browse RUN...` or
`streamlit run dashboards/app.py --server.address 127.0.0.1 -- RUN...` (or SAEKIT_RUNS=run1:run2).

Pages: feature list, feature page, type your text, steering, and probing / evaluation summaries
when the run has them. Ordinary pages read the precomputed bundle (`saekit analyze RUN`) only.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import streamlit as st  # noqa: E402

from views import feature_list, feature_page, live, reports, steering  # noqa: E402
from views import geometry, retrieval, twins  # noqa: E402
from views.common import guarded, load_bundle, run_folders, run_labels  # noqa: E402

BUNDLE_VIEWS = {"Features": feature_list, "Feature": feature_page, "Type your text": live, "Steering": steering}
FILE_VIEWS = {"Twins": twins, "Geometry": geometry, "Retrieval": retrieval}  # shown when the run has their files


def _apply_query_params() -> None:
    """A link like `?run=NAME&view=Feature&feature=12` opens that page (once per session)."""
    if st.session_state.get("_qp_applied"):
        return
    st.session_state["_qp_applied"] = True
    qp = st.query_params
    if "run" in qp:
        st.session_state["run"] = qp["run"]
    if "view" in qp:
        st.session_state["view"] = qp["view"]
    if qp.get("feature", "").isdigit():
        st.session_state["feature"] = int(qp["feature"])


def _views(run: Path) -> list[str]:
    names = list(BUNDLE_VIEWS)
    if reports.probe_files(run):
        names.append("Probing")
    if reports.eval_report(run):
        names.append("Evaluation")
    return names + [name for name, module in FILE_VIEWS.items() if module.available(run)]


def main() -> None:
    st.set_page_config(page_title="saekit feature browser", layout="wide")
    runs = run_labels(run_folders())
    if not runs:
        st.title("saekit feature browser")
        st.warning("No runs to show. Start it with `saekit browse RUN...` (or set SAEKIT_RUNS).")
        return
    _apply_query_params()
    if st.session_state.get("run") not in runs:
        st.session_state["run"] = next(iter(runs))
    label = st.sidebar.selectbox("Run", list(runs), key="run")
    run = runs[label]
    names = _views(run)
    if st.session_state.get("view") not in names:
        st.session_state["view"] = names[0]
    view = st.sidebar.radio("Page", names, key="view")
    st.query_params.update({"run": label, "view": view, "feature": str(st.session_state.get("feature", 0))})
    if view == "Probing":
        return guarded(reports.render_probing, run)
    if view == "Evaluation":
        return guarded(reports.render_eval, run)
    if view in FILE_VIEWS:
        return guarded(FILE_VIEWS[view].render, run)
    guarded(_bundle_view, view, run, label)


def _bundle_view(view: str, run: Path, label: str) -> None:
    bundle = load_bundle(run)
    m = bundle.manifest
    sae = m.get("sae", {})
    origin = f" (from {sae['origin']} files)" if sae.get("origin", "saekit") != "saekit" else ""
    st.sidebar.caption(f"{'LLM' if bundle.is_llm else 'embedding'} run · {m.get('model')} · hook `{m.get('hook')}` · "
                       f"{sae.get('architecture')} d_sae={bundle.d_sae}{origin}")
    module = BUNDLE_VIEWS[view]
    module.render(bundle, label if module in (feature_list, feature_page) else run)


main()
