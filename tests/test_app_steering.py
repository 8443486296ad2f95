"""The browser's measured sweep: "steer with this feature" on the feature page opens the steering page
on that feature, which shows a saved sweep (curve, table, samples) or runs a small one live."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from saekit.analysis.features import AnalyzeConfig
from saekit.analysis.sweep_report import write_sweep_report
from saekit.browser.build import build_bundle
from saekit.layout import RunFolder
from support.runs import tiny_run

APP = str(Path(__file__).resolve().parents[1] / "dashboards" / "app.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("app_steer")
    llm = tiny_run(root / "llm", dead=(0, 1, 2), one_shot=3)
    build_bundle(llm, AnalyzeConfig(top_examples=4, context=3))
    return llm


def _app(monkeypatch, run) -> AppTest:
    monkeypatch.setenv("SAEKIT_RUNS", str(run))
    monkeypatch.setattr(sys, "argv", ["app.py"])
    return AppTest.from_file(APP, default_timeout=120).run()


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert not at.warning, [w.value for w in at.warning]


def _open_steering_on(at: AppTest, f: int) -> AppTest:
    at.radio(key="view").set_value("Feature").run()
    at.number_input(key="feature").set_value(f).run()
    at.button(key="steer_with").click().run()
    _ok(at)
    assert at.radio(key="view").value == "Steering" and at.number_input(key="steer_feature").value == f
    return at


def test_steer_with_this_feature_then_a_live_sweep(monkeypatch, run):
    at = _open_steering_on(_app(monkeypatch, run), 5)
    assert any("No saved sweep of feature #5" in c.value for c in at.caption)
    at.text_input(key="sweep_strengths").input("0,4").run()
    at.number_input(key="sweep_tokens").set_value(3).run()
    at.button(key="sweep_go").click().run()
    _ok(at)
    table = at.dataframe[0].value
    assert list(table["strength"]) == [0.0, 4.0] and "KL (nats)" in table.columns
    assert any("chosen strength" in c.value for c in at.caption)


def _fig(m):
    return {"mean": m, "ci95": None}


def test_a_saved_sweep_of_the_feature_is_shown_with_its_samples(monkeypatch, run):
    rows = [{"strength": s, "target_mass": _fig(m), "feature_act": _fig(None), "probe_score": _fig(None),
             "kl": _fig(kl), "perplexity": _fig(9.0), "samples": [f"text at {s}"], "target_log_mass": None}
            for s, m, kl in ((0.0, 0.01, 0.0), (8.0, 0.03, 0.2), (16.0, 0.09, 0.9))]
    report = {"feature": 7, "hook": "transformer.h.1", "mode": "add", "kl_budget": 0.5, "prompts": ["Hello"],
              "rows": rows, "chosen": {"strength": 8.0, "metric": "target_mass", "effect": 0.03, "kl": 0.2,
                                       "ratio_to_unsteered": 3.0, "kl_budget": 0.5}}
    write_sweep_report(report, RunFolder(run).steer / "sweep-f7")
    at = _open_steering_on(_app(monkeypatch, run), 7)
    assert at.selectbox(key="sweep_saved").value == "sweep-f7"
    assert any("chosen strength 8: target_mass 0.03, 3.00x" in c.value for c in at.caption)
    at.selectbox(key="sweep_strength").set_value(16.0).run()
    _ok(at)
    assert at.dataframe[-1].value["continuation"].tolist() == ["text at 16.0"]
