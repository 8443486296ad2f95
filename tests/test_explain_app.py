"""Explanations in the browser (AppTest, no real browser): the feature page shows the explanation and its
scores, the list searches explanations and sorts by score, and the evaluation page draws its figures
(density, description length, probe accuracy vs k, loss recovered, explanation scores)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from saekit.analysis.explain.protocol import ExplainConfig
from saekit.analysis.features import AnalyzeConfig
from saekit.browser.build import build_bundle
from saekit.browser.bundle import Bundle
from saekit.run.explain import explain_run
from support.planted_tokens import planted_token_run

APP = str(Path(__file__).resolve().parents[1] / "dashboards" / "app.py")
sys.path.insert(0, str(Path(APP).parent))
from views import eval_figures  # noqa: E402
from views.explanations import filter_and_sort  # noqa: E402

PLANTED = 5
REPORT = {
    "sparsity": {"density_histogram": {"log10_edges": [-4 + 0.5 * i for i in range(9)], "counts": [0, 1, 3, 9, 7, 2, 1, 0],
                                       "dead": 2, "live": 23}},
    "description_length": {"sweep": [{"bits": b, "dl_bits_per_row": 300 + 10 * b, "fvu": 0.2 - 0.01 * b} for b in (2, 3, 4)],
                           "selected_bits": 3},
    "downstream": {"splice_in": {"n_tokens": 900, "loss_recovered_vs_mean": 0.95, "loss_recovered_vs_zero": 0.99,
                                 "ci95": {"loss_recovered_vs_mean": [0.93, 0.97], "loss_recovered_vs_zero": [0.98, 0.995]}}},
    "reconstruction": {"fvu": 0.2}}
PROBE = {"label": "sentiment", "positive": "negative", "ks": [1, 2], "majority_baseline": 0.6,
         "results": {"sae": {"mean_diff": {"1": {"accuracy": 0.61, "ci95": {"accuracy": [0.55, 0.67]}},
                                           "2": {"accuracy": 0.64, "ci95": {"accuracy": [0.58, 0.7]}}}}}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = planted_token_run(tmp_path_factory.mktemp("explain_app") / "planted", feature=PLANTED)
    build_bundle(run, AnalyzeConfig(top_examples=20, context=4))
    explain_run(run, ExplainConfig(embedding_features=0))
    for part, data in (("eval", REPORT), ("probe", PROBE)):
        (run / part).mkdir()
        (run / part / "report.json").write_text(json.dumps(data))
    return run


def app(monkeypatch, run) -> AppTest:
    monkeypatch.setenv("SAEKIT_RUNS", str(run))
    monkeypatch.setattr(sys, "argv", ["app.py"])
    return AppTest.from_file(APP, default_timeout=120).run()


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_every_figure_is_drawn_from_a_report_and_none_without():
    import pandas as pd

    table = pd.DataFrame({"score_detection": [0.5, 0.9, None], "score_fuzzing": [0.6, 0.8, 0.7]})
    for fig in (eval_figures.density_histogram(REPORT), eval_figures.description_length_curve(REPORT),
                eval_figures.probe_accuracy_vs_k(PROBE), eval_figures.loss_recovered(REPORT),
                eval_figures.score_distribution(table)):
        assert fig is not None and fig.axes and (fig.axes[0].patches or fig.axes[0].lines)
    assert eval_figures.density_histogram({}) is None and eval_figures.loss_recovered({}) is None
    assert eval_figures.probe_accuracy_vs_k({}) is None and eval_figures.score_distribution(None) is None


def test_explanation_search_and_score_sort_are_pure(run):
    df = Bundle(run).table
    hit = filter_and_sort(df, "CAT", "feature id")
    assert PLANTED in set(hit["feature"]) and len(hit) < len(df)
    best = filter_and_sort(df, "", "explanation score: detection")
    scores = best["score_detection"].dropna().tolist()
    assert scores == sorted(scores, reverse=True) and best["score_detection"].isna().sum() == df["score_detection"].isna().sum()


def test_feature_page_shows_explanation_and_scores(monkeypatch, run):
    at = app(monkeypatch, run)
    at.radio(key="view").set_value("Feature").run()
    at.number_input(key="feature").set_value(PLANTED).run()
    ok(at)
    assert any("**Explanation** (ngram)" in m.value and '"cat"' in m.value for m in at.markdown)
    assert {m.label for m in at.metric} >= {"Detection score", "Fuzzing score"}
    at.number_input(key="feature").set_value(0).run()  # dead: the reason, no scores
    ok(at)
    assert any("No explanation: dead" in c.value for c in at.caption)


def test_list_searches_explanations_and_sorts_by_score(monkeypatch, run):
    at = app(monkeypatch, run)
    at.text_input(key="search_explanations").input("dog").run()
    ok(at)
    assert any(b.key == f"open_{PLANTED}" for b in at.button)
    assert "explanation score: detection" in at.selectbox(key="sort").options
    at.selectbox(key="sort").set_value("explanation score: detection").run()
    ok(at)


def test_evaluation_page_is_figures(monkeypatch, run):
    at = app(monkeypatch, run)
    at.radio(key="view").set_value("Evaluation").run()
    ok(at)
    names = [m.value for m in at.markdown]
    for name in ("Feature density", "Description length", "Probe accuracy vs k", "Loss recovered", "Explanation scores"):
        assert f"**{name}**" in names
