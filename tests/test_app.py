"""The Streamlit app under `streamlit.testing.v1.AppTest`: every page of an LLM run and an embedding
run side by side (tiny bundles with dead features, empty histograms and a one-example feature), the
live pages computing for real, and missing / damaged bundles turning into messages."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest  # streamlit is a runtime dependency: these tests never skip

from saekit.analysis.features import AnalyzeConfig
from saekit.browser.build import build_bundle
from support.runs import tiny_embedding_run, tiny_run

APP = str(Path(__file__).resolve().parents[1] / "dashboards" / "app.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, minilm, tweets):
    root = tmp_path_factory.mktemp("app")
    llm = tiny_run(root / "llm", dead=(0, 1, 2), one_shot=3)
    emb = tiny_embedding_run(root / "emb", tweets[:120], model=minilm, dead=(0, 1), one_shot=2)
    for run in (llm, emb):
        build_bundle(run, AnalyzeConfig(top_examples=4, context=3))
    (llm / "probe").mkdir()
    (llm / "probe" / "report.json").write_text(json.dumps({
        "label": "sentiment", "positive": "negative", "ks": [1, 2], "n_train_docs": 80, "n_test_docs": 20,
        "majority_baseline": 0.6, "dense": {"sae": {"accuracy": 0.7, "n_features": 48}},
        "results": {"sae": {"mean_diff": {"1": {"accuracy": 0.61}, "2": {"accuracy": 0.64}}}}}))
    (emb / "eval").mkdir()
    (emb / "eval" / "report.json").write_text(json.dumps({"reconstruction": {"fvu": 0.3, "l0": 4.0}, "sae": {"d_sae": 64}}))
    return {"llm": llm, "emb": emb}


def app(monkeypatch, *runs) -> AppTest:
    monkeypatch.setenv("SAEKIT_RUNS", ":".join(str(r) for r in runs))
    monkeypatch.setattr(sys, "argv", ["app.py"])
    return AppTest.from_file(APP, default_timeout=120).run()


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def goto(at: AppTest, view: str) -> AppTest:
    at.radio(key="view").set_value(view).run()
    ok(at)
    return at


def html_examples(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if "saekit-example" in m.value]


def test_every_page_of_both_runs_renders(monkeypatch, runs):
    at = app(monkeypatch, runs["llm"], runs["emb"])
    ok(at)
    assert at.selectbox(key="run").options == ["llm", "emb"]
    for label, extra in (("llm", "Probing"), ("emb", "Evaluation")):
        at.selectbox(key="run").set_value(label).run()
        ok(at)
        assert extra in at.radio(key="view").options
        for view in at.radio(key="view").options:
            goto(at, view)
        goto(at, "Feature")
        for f in (0, 1, 2, 3, 10):  # dead, one-example and ordinary features
            at.number_input(key="feature").set_value(f).run()
            ok(at)


def test_dead_feature_page_says_so_and_draws_no_nan(monkeypatch, runs):
    at = goto(app(monkeypatch, runs["llm"]), "Feature")
    at.number_input(key="feature").set_value(0).run()
    ok(at)
    assert any("dead" in w.value for w in at.warning)
    assert any("Empty histogram" in i.value for i in at.info)
    assert not html_examples(at)


def test_search_opens_feature_with_highlighted_example(monkeypatch, runs):
    from saekit.browser.bundle import Bundle

    token = Bundle(runs["llm"]).feature(3)["top"][0]["tokens"][Bundle(runs["llm"]).feature(3)["top"][0]["center"]]
    at = app(monkeypatch, runs["llm"])
    at.text_input(key="search").input(token).run()
    at.selectbox(key="sort").set_value("density (low first)").run()  # the one-example feature comes first
    ok(at)
    assert at.button[0].key == "open_3"
    at.button(key="open_3").click().run()
    ok(at)
    assert at.radio(key="view").value == "Feature" and at.number_input(key="feature").value == 3
    examples = html_examples(at)
    assert examples and "saekit-tok" in examples[0] and "rgba(255,130,0,1.00)" in examples[0]


def test_search_filters_and_dead_toggle(monkeypatch, runs):
    at = app(monkeypatch, runs["llm"])
    assert not any(b.key == "open_0" for b in at.button)  # dead features hidden by default
    at.text_input(key="search").input("#0").run()
    assert any("No feature matches" in i.value for i in at.info)
    at.checkbox(key="hide_dead").uncheck().run()
    ok(at)
    assert any(b.key == "open_0" for b in at.button)


def test_type_your_text_llm_and_embedding(monkeypatch, runs):
    at = goto(app(monkeypatch, runs["llm"], runs["emb"]), "Type your text")
    at.text_area(key="live_text").input("the happy cat runs").run()
    at.button(key="live_go").click().run()
    ok(at)
    assert html_examples(at) and at.selectbox(key="live_feature").options
    at.selectbox(key="run").set_value("emb").run()
    goto(at, "Type your text")
    at.text_area(key="live_text").input("I love this so much").run()
    at.button(key="live_go").click().run()
    ok(at)
    assert any(b.key and b.key.startswith("live_open_") for b in at.button)


def test_steering_generation_and_search(monkeypatch, runs):
    at = goto(app(monkeypatch, runs["llm"], runs["emb"]), "Steering")
    at.text_input(key="steer_prompt").input("the cat").run()
    at.button(key="steer_go").click().run()
    ok(at)
    md = [m.value for m in at.markdown]
    assert not at.warning, [w.value for w in at.warning]  # e.g. "Steering is unavailable": a failure here
    assert "**Default**" in md and any(m.startswith("**Steered**") for m in md)
    at.selectbox(key="run").set_value("emb").run()
    goto(at, "Steering")
    at.text_input(key="steer_query").input("great food").run()
    at.button(key="steer_go").click().run()
    ok(at)
    assert not at.warning, [w.value for w in at.warning]
    assert len(at.dataframe) == 2  # nearest documents before and after the edit


def test_missing_and_damaged_bundles_show_messages(monkeypatch, runs, tmp_path):
    """A missing or damaged bundle is an expected state: a message on every page that needs the
    bundle (and no crash, which `guarded` would report through `at.exception`)."""
    missing = tmp_path / "missing"
    shutil.copytree(runs["llm"], missing, ignore=shutil.ignore_patterns("bundle"))
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["llm"], damaged)
    rec = damaged / "bundle" / "features.jsonl"
    rec.write_bytes(rec.read_bytes()[:-100])
    at = app(monkeypatch, missing, damaged)
    assert not at.exception, [e.value for e in at.exception]
    assert [e.value for e in at.error] == [f"This run's browser bundle cannot be used: No browser bundle in {missing / 'bundle'}. "
                                           f"Build it with `saekit analyze {missing}`."]
    at.selectbox(key="run").set_value("damaged").run()
    for view in at.radio(key="view").options:
        at.radio(key="view").set_value(view).run()
        assert not at.exception, (view, [e.value for e in at.exception])
        if view == "Probing":  # reads probe/report.json, not the bundle
            ok(at)
            continue
        errors = [e.value for e in at.error]
        assert len(errors) == 1 and errors[0].startswith("This run's browser bundle cannot be used"), (view, errors)
        assert "features.jsonl" in errors[0] and "sha256 mismatch" in errors[0], errors


def test_a_crashing_view_is_reported_as_an_exception(monkeypatch, runs):
    """`guarded` keeps the page up but must not turn a bug into an ordinary message."""
    sys.path.insert(0, str(Path(APP).parent))
    try:
        import views.feature_list as feature_list
    finally:
        sys.path.remove(str(Path(APP).parent))

    def broken(*args):
        raise ZeroDivisionError("a bug in a view")

    monkeypatch.setattr(feature_list, "render", broken)
    at = app(monkeypatch, runs["llm"])
    assert [e.value for e in at.exception] == ["a bug in a view"]
    assert not at.error


def test_no_runs_gives_a_message(monkeypatch):
    monkeypatch.delenv("SAEKIT_RUNS", raising=False)
    monkeypatch.setattr(sys, "argv", ["app.py"])
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and any("saekit browse" in w.value for w in at.warning)


def test_bundle_pages_load_no_model(runs, tmp_path):
    """Feature list and feature pages read the bundle only: no transformers / sentence-transformers import."""
    import subprocess

    code = f"""
import os, sys
os.environ["SAEKIT_RUNS"] = {str(runs["llm"])!r}
sys.argv = ["app.py"]
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({APP!r}, default_timeout=60).run()
at.radio(key="view").set_value("Feature").run()
at.number_input(key="feature").set_value(10).run()
assert not at.exception and not at.error
print(sorted(m for m in ("transformers", "sentence_transformers", "transformer_lens") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _listening(port: int) -> list[str]:
    """Local addresses listening on `port`, from /proc/net/tcp{,6} (hex, as the kernel writes them)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                found.append(addr)
    return found


def test_plain_streamlit_run_listens_on_localhost_only(tmp_path):
    """`streamlit run dashboards/app.py` without saekit's flags, from any directory, binds 127.0.0.1
    (dashboards/.streamlit/config.toml): the live and steering pages run models on any input."""
    import os
    import socket
    import subprocess
    import time

    assert Path("/proc/net/tcp").exists(), "this check reads the kernel's socket table (Linux)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env["SAEKIT_RUNS"] = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP, "--server.port", str(port),
                             "--server.headless", "true"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # wait for the server to listen (bounded; not a timing assertion)
            if _listening(port) or proc.poll() is not None:
                break
            time.sleep(0.1)
        addrs = _listening(port)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert addrs == ["0100007F"], addrs  # 127.0.0.1 only; 00000000 or :: would mean every interface


@pytest.fixture(scope="module")
def outlier_run(tmp_path_factory):
    from support.planted import planted_run

    run, feature = planted_run(tmp_path_factory.mktemp("outliers") / "planted")
    build_bundle(run, AnalyzeConfig(top_examples=4, context=2, logit_lens=False))
    return run, feature


def test_feature_list_can_hide_outlier_features_and_the_page_marks_them(monkeypatch, outlier_run):
    run, f = outlier_run
    at = app(monkeypatch, run)
    ok(at)
    at.text_input(key="search").input(f"#{f}").run()
    ok(at)
    assert any(b.key == f"open_{f}" for b in at.button)
    from saekit.browser.bundle import Bundle

    n_marked = int(Bundle(run).table["mostly_outliers"].sum())
    assert 1 <= n_marked < Bundle(run).d_sae
    assert at.checkbox(key="hide_outliers").label == f"Hide outlier features ({n_marked})"
    at.checkbox(key="hide_outliers").check().run()
    ok(at)
    assert not any(b.key == f"open_{f}" for b in at.button)
    assert any("No feature matches" in i.value for i in at.info)
    at.checkbox(key="hide_outliers").uncheck().run()
    at.button(key=f"open_{f}").click().run()
    ok(at)
    assert any("Outlier feature" in w.value for w in at.warning)
    assert any("outlier row" in m.value for m in at.markdown)


def test_live_ranking_leaves_out_special_and_outlier_positions():
    import torch

    sys.path.insert(0, str(Path(APP).parent))
    from views.live import excluded_positions, exclusion_note, ranked_positions

    class Tok:
        all_special_ids = [1]

    class FakeBundle:
        manifest = {"source": {"exclude_special": True},
                    "outliers": {"threshold_norm": 10.0, "excluded_in_training": True}}

    acts = torch.ones(4, 9)  # norms 3
    acts[2] *= 100  # norm 300: an outlier
    why = excluded_positions(FakeBundle(), torch.tensor([1, 5, 6, 7]), acts, Tok())
    assert why == ["special", "", "outlier", ""]
    res = {"indices": [[0], [1], [2], [3]], "values": [[1.0], [2.0], [9.0], [4.0]], "excluded": why}
    assert ranked_positions(res) == ([[1], [3]], [[2.0], [4.0]])
    note = exclusion_note(res)
    assert "1 special token" in note and "1 massive-activation outlier" in note
    FakeBundle.manifest["outliers"]["excluded_in_training"] = False  # the run kept them: rank them too
    assert excluded_positions(FakeBundle(), torch.tensor([1, 5, 6, 7]), acts, Tok()) == ["special", "", "", ""]
