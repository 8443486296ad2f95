"""Features explained in words: the ngram explainer names planted tokens, detection separates a true
explanation from shuffled ones, the OpenAI-compatible client retries (429, timeout) against a local test
judge, the cache makes a re-run send zero requests, skipped features are listed, the bundle gets the table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from saekit.analysis.explain.cache import CachedChat, ChatCache
from saekit.analysis.explain.llm import ChatJudge, parse_votes
from saekit.analysis.explain.ngram import NgramExplainer, build_background
from saekit.analysis.explain.openai import OpenAIChat
from saekit.analysis.explain.protocol import (Context, ExplainConfig, Explanation, balanced_accuracy,
                                              from_record, sample_across_intervals)
from saekit.analysis.explain.runner import NegativePool, Plan, explain_records
from saekit.analysis.explain.scorers import DetectionScorer, EmbeddingScorer, FuzzingScorer, KeywordJudge, auroc
from saekit.analysis.features import AnalyzeConfig
from saekit.browser.build import build_bundle
from saekit.browser.bundle import Bundle
from saekit.errors import ChatBackendError, ConfigError
from saekit.run.explain import explain_run, make_plan
from support.judge_server import JudgeServer
from support.planted_tokens import PLANTED_WORDS, planted_token_run

PLANTED = 5


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    run = planted_token_run(tmp_path_factory.mktemp("explain") / "planted", feature=PLANTED)
    build_bundle(run, AnalyzeConfig(top_examples=20, context=4))
    return run


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("explanations"))
    return dst


def _plan(bundle: Bundle, cfg: ExplainConfig, tmp: Path) -> Plan:
    return make_plan(bundle, cfg, tmp / "cache", embed=False)


# -- known answers --------------------------------------------------------------------------------
def test_balanced_accuracy_and_auroc_known_answers():
    assert balanced_accuracy([True, True], [False, False]) == 1.0
    assert balanced_accuracy([True, True], [True, True]) == 0.5  # always "yes" is chance
    assert balanced_accuracy([False], [True]) == 0.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5


def test_sampling_spreads_over_intervals_without_repeats():
    ex = [Context(act=10 - i, row=i) for i in range(5)] + \
         [Context(act=q + 0.1 * j, row=100 + 10 * q + j, interval=q) for q in range(4) for j in range(5)]
    got = sample_across_intervals(ex, 10, seed=0)
    assert len({c.row for c in got}) == 10
    assert {c.interval for c in got} == {-1, 0, 1, 2, 3}
    assert sample_across_intervals(ex, 10, seed=0) == got


def test_parse_votes_takes_the_first_list_of_the_right_length():
    assert parse_votes("sure: [1, 0, 1]", 3) == [True, False, True]
    assert parse_votes("[1, 0] then [0, 0, 1]", 3) == [False, False, True]
    assert parse_votes("no idea", 3) is None


# -- the ngram explainer and detection on planted data -------------------------------------------
def test_ngram_explanation_names_the_planted_tokens(planted, tmp_path):
    bundle = Bundle(planted / "bundle")
    plan = _plan(bundle, ExplainConfig(), tmp_path)
    e = plan.explainer.explain(from_record(bundle.feature(PLANTED)))
    assert set(PLANTED_WORDS) <= set(e.terms[:2]), e.text
    assert all(f'"{w}"' in e.text for w in PLANTED_WORDS)


def test_detection_true_explanation_vs_shuffled(planted, tmp_path):
    """Keyword judge: >= 0.9 for the planted feature's own explanation, <= 0.6 on average when every
    feature gets another feature's explanation."""
    bundle = Bundle(planted / "bundle")
    cfg = ExplainConfig(n_score=20)
    plan = _plan(bundle, cfg, tmp_path)
    live = [f for f in bundle.table.loc[bundle.table["count"] >= 5, "feature"]]
    fx = {f: from_record(bundle.feature(f)) for f in live}
    expl = {f: plan.explainer.explain(fx[f]) for f in live}
    det = DetectionScorer(KeywordJudge())

    def score(f, e):
        pos = sample_across_intervals(fx[f].examples, cfg.n_score, 1)
        return det.score(e, pos, plan.pool.negatives(f, cfg.n_score, 2))[0]

    assert score(PLANTED, expl[PLANTED]) >= 0.9
    shuffled = live[1:] + live[:1]
    wrong = [score(f, Explanation(f, expl[g].text, terms=expl[g].terms)) for f, g in zip(live, shuffled)]
    assert np.mean(wrong) <= 0.6, wrong


def test_fuzzing_prefers_the_true_marks(planted, tmp_path):
    bundle = Bundle(planted / "bundle")
    plan = _plan(bundle, ExplainConfig(), tmp_path)
    fx = from_record(bundle.feature(PLANTED))
    e = plan.explainer.explain(fx)
    value, _ = FuzzingScorer(KeywordJudge()).score(e, sample_across_intervals(fx.examples, 10, 0), [])
    assert value >= 0.9


def test_negatives_never_contain_a_firing_of_the_feature(planted, tmp_path):
    bundle = Bundle(planted / "bundle")
    plan = _plan(bundle, ExplainConfig(), tmp_path)
    negs = plan.pool.negatives(PLANTED, 30, 0)
    assert negs
    for c in negs:
        assert not any(t.strip() in PLANTED_WORDS for t in c.tokens), c.tokens


def test_embedding_scorer_prefers_matching_examples():
    """With a bag-of-words embedder, an explanation naming the examples' words beats their hard negatives."""
    vocab = ["cat", "dog", "sun", "moon", "rain", "tree"]

    def embed(texts):
        v = np.array([[t.lower().count(w) for w in vocab] for t in texts], dtype=np.float32) + 1e-3
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    pos = [Context(act=1, text=t) for t in ("the cat sat", "a dog ran", "cat and dog")]
    neg = [Context(act=0, text=t) for t in ("the sun rose", "moon and rain", "a tree", "sun tree")]
    s = EmbeddingScorer(embed)
    assert s.score(Explanation(0, "cat or dog"), pos, neg)[0] == 1.0
    assert s.score(Explanation(0, "sun and moon"), pos, neg)[0] < 0.5


# -- the OpenAI-compatible client against a local test judge --------------------------------------
def _chat(server: JudgeServer, tmp: Path, **kw) -> CachedChat:
    kw = {"retries": 3, "timeout_s": 0.5, "backoff_s": 0.01, "requests_per_minute": 6000.0, **kw}
    return CachedChat(OpenAIChat(server.base_url, "judge-test", "SAEKIT_TEST_KEY", **kw), ChatCache(tmp / "cache"))


def test_openai_client_retries_429_and_timeout_then_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEKIT_TEST_KEY", "sk-test-secret")
    with JudgeServer(faults=["429", "slow"], max_requests=10) as server:
        chat = _chat(server, tmp_path)
        e = Explanation(0, '"cat"', terms=["cat"])
        votes, usage = ChatJudge(chat).judge(e, ["a cat here", "nothing"], "detection")
    assert votes == [True, False]
    assert len(server.requests) == 3  # 429, timed out, answered
    assert usage.requests == 1 and usage.prompt_tokens > 0
    assert all(h.get("Authorization") == "Bearer sk-test-secret" for h in server.headers)


def test_openai_client_keeps_to_its_concurrency_cap(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with JudgeServer(max_requests=20, delay_s=0.5) as server:
        chat = _chat(server, tmp_path, concurrency=2, timeout_s=5.0)
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda i: chat.complete([{"role": "user", "content": f"Examples:\n1. <<w{i}>>"}]), range(6)))
    assert len(server.requests) == 6 and server.max_in_flight == 2


def test_openai_client_gives_up_with_a_named_error(tmp_path):
    with JudgeServer(faults=["503"] * 10, max_requests=10) as server:
        chat = _chat(server, tmp_path, retries=2)
        with pytest.raises(ChatBackendError, match="no answer after 3 attempts"):
            chat.complete([{"role": "user", "content": "hello"}])
    assert len(server.requests) == 3


def test_openai_explain_and_judge_through_the_run_and_zero_requests_on_rerun(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("SAEKIT_TEST_KEY", "sk-never-on-disk")
    run = _copy_run(planted, tmp_path / "run")
    feats = [PLANTED, 6, 7, 0]
    with JudgeServer(max_requests=60) as server:
        cfg = ExplainConfig(backend="openai", judge="openai", model="judge-test", base_url=server.base_url,
                            api_key_env="SAEKIT_TEST_KEY", requests_per_minute=6000.0, embedding_features=0,
                            price_prompt_per_mtok=2.0, price_completion_per_mtok=8.0)
        first = explain_run(run, cfg, features=feats)[0]
        n_first = len(server.requests)
        second = explain_run(run, cfg, features=feats)[0]
        assert len(server.requests) == n_first  # the cache answered everything
    assert first["requests_sent"] == n_first > 0 and second["requests_sent"] == 0
    assert second["cache_hits"] == n_first
    lines = [json.loads(x) for x in (run / "explanations" / "explanations.jsonl").read_text().splitlines()]
    assert [r["feature"] for r in lines] == feats
    planted_line = lines[0]
    assert set(PLANTED_WORDS) <= set(json.loads("[" + planted_line["explanation"] + "]"))
    assert planted_line["scores"]["detection"] >= 0.9
    led = planted_line["ledger"]
    assert led["backend"] == "openai" and led["prompt_tokens"] > 0
    assert led["cached"] == 3 and led["requests"] == 0  # explain, detect, fuzz: all from the cache on the re-run
    assert led["cost"] == pytest.approx((2.0 * led["prompt_tokens"] + 8.0 * led["completion_tokens"]) / 1e6, abs=1e-6)
    assert lines[-1]["skipped"].startswith("dead")  # feature 0 never fires: listed, not dropped
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert b"sk-never-on-disk" not in f.read_bytes(), f


# -- ledger, skips, bundle ---------------------------------------------------------------------------
def test_skipped_features_are_listed_with_the_reason(tmp_path):
    recs = [{"feature": 0, "count": 0, "top": [], "quantiles": []},
            {"feature": 1, "count": 2, "top": [{"act": 1.0, "row": 3, "text": "a cat"}], "quantiles": []},
            {"feature": 2, "count": 9, "top": [{"act": 1.0, "row": i, "text": f"{w} cat"}
                                                       for i, w in enumerate(("one", "two", "red", "big", "old"))],
             "quantiles": []}]
    bg = build_background(Context(act=0, text=t) for t in ("the sun", "a moon", "the cat", "rain"))
    cfg = ExplainConfig(price_prompt_per_mtok=1.0)
    plan = Plan(NgramExplainer(bg), [DetectionScorer(KeywordJudge())], NegativePool([]), cfg)
    summary = explain_records(recs, plan, tmp_path / "out.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["feature"] for r in lines] == [0, 1, 2]
    assert lines[0]["skipped"].startswith("dead") and "too few examples: 1 < 3" in lines[1]["skipped"]
    assert '"cat"' in lines[2]["explanation"] and lines[2]["ledger"]["cost"] == 0.0
    assert summary["explained"] == 1 and summary["skipped"] == {"dead": 1, "too few examples": 1}


def test_cli_writes_run_and_bundle_and_bundle_still_verifies(planted, tmp_path, capsys):
    from saekit.cli import main

    run = _copy_run(planted, tmp_path / "run")
    assert main(["explain", str(run), "--embedding-features", "0"]) == 0
    out = capsys.readouterr().out
    assert "features explained (ngram, judge keyword)" in out and "requests sent 0" in out
    bundle = Bundle(run / "bundle", verify=True)
    table = bundle.table
    assert "explanation" in table and "score_detection" in table
    hit = table[table["explanation"].str.contains('"cat"', na=False)]
    assert PLANTED in set(hit["feature"])
    assert bundle.explanation(PLANTED)["score_detection"] >= 0.9
    assert bundle.manifest["explanations"]["backend"] == "ngram"
    summary = json.loads((run / "explanations" / "summary.json").read_text())
    assert summary["explained"] + sum(summary["skipped"].values()) == bundle.d_sae


def test_config_section_is_strict_and_features_are_checked(planted, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'bakend'"):
        ExplainConfig.from_dict({"bakend": "ngram"}, where="explain")
    with pytest.raises(ConfigError, match="expected ids in"):
        explain_run(_copy_run(planted, tmp_path / "run"), ExplainConfig(embedding_features=0), features=[10_000])


def test_local_backend_generates_deterministically_and_counts_tokens(tmp_path):
    from saekit.analysis.explain.local import LocalChat
    from support.runs import tiny_lm

    folder = tiny_lm(tmp_path / "lm")
    chat = CachedChat(LocalChat(str(folder), max_tokens=5), ChatCache(tmp_path / "cache"))
    a, ua = chat.complete([{"role": "user", "content": "the cat runs"}])
    b, ub = chat.complete([{"role": "user", "content": "the cat runs"}])
    assert a.text == b.text and ua.requests == 1 and ub.cached == 1 and chat.sent == 1
    assert a.prompt_tokens == 3 and 0 < a.completion_tokens <= 5


def test_damaged_cache_entry_is_asked_again(tmp_path):
    with JudgeServer(max_requests=5) as server:
        chat = _chat(server, tmp_path)
        msgs = [{"role": "user", "content": "Examples:\n1. a <<cat>>\nExplanation:"}]
        chat.complete(msgs)
        entry = next((tmp_path / "cache").rglob("*.json"))
        entry.write_text("{not json")
        res, usage = chat.complete(msgs)
    assert usage.requests == 1 and len(server.requests) == 2 and '"cat"' in res.text


def test_mean_interval_brackets_the_mean_and_is_seeded():
    from saekit.analysis.explain.runner import mean_interval

    v = list(np.random.default_rng(0).uniform(0.4, 0.9, size=500))
    a, b = mean_interval(v), mean_interval(v)
    assert a == b and a["ci95"][0] < a["mean"] < a["ci95"][1] and a["ci95"][1] - a["ci95"][0] < 0.05
    assert mean_interval([]) == {"n": 0, "mean": None, "ci95": None}


@pytest.mark.slow
def test_local_backend_with_the_embedded_smollm2(planted, tmp_path):
    """The `local` backend through saekit's model loader (embedded SmolLM2): an explanation is written,
    its tokens counted, and the re-run is answered by the cache."""
    run = _copy_run(planted, tmp_path / "run")
    cfg = ExplainConfig(backend="local", max_tokens=24, embedding_features=0)
    first = explain_run(run, cfg, features=[PLANTED])[0]
    line = json.loads((run / "explanations" / "explanations.jsonl").read_text().splitlines()[0])
    assert line["explanation"].strip() and line["ledger"]["backend"] == "local"
    assert line["ledger"]["completion_tokens"] > 0 and first["requests_sent"] == 1
    assert explain_run(run, cfg, features=[PLANTED])[0]["requests_sent"] == 0


@pytest.mark.slow
def test_embedding_scorer_with_minilm_on_planted_data(planted, tmp_path):
    run = _copy_run(planted, tmp_path / "run")
    summary = explain_run(run, ExplainConfig(embedding_features=50), features=[PLANTED, 6, 7, 8])[0]
    assert summary["scores"]["embedding"]["n"] >= 1
    score = Bundle(run / "bundle").explanation(PLANTED)["score_embedding"]
    assert score is not None and score >= 0.7


def test_rebuilt_bundle_keeps_explanations_of_the_same_sae_only(planted, tmp_path):
    """`saekit analyze` rebuilds the bundle and then calls `reattach_explanations`: the explanations
    written for this SAE come back; once the SAE's weights change they are left out (they describe
    another SAE)."""
    import torch

    from saekit.layout import RunFolder
    from saekit.run.explain import reattach_explanations
    from saekit.sae.registry import load_sae, save_sae

    run = _copy_run(planted, tmp_path / "run")
    folder = RunFolder(run)
    explain_run(run, ExplainConfig(embedding_features=0), embed=False)
    build_bundle(run, AnalyzeConfig(top_examples=20, context=4))
    assert "explanation" not in Bundle(run / "bundle").table  # a rebuilt bundle starts without them
    assert reattach_explanations(folder)
    assert "explanation" in Bundle(run / "bundle", verify=True).table

    sae = load_sae(folder.final_sae())
    with torch.no_grad():
        sae.W_dec.mul_(1.01)
    save_sae(sae, folder.final_sae())
    build_bundle(run, AnalyzeConfig(top_examples=20, context=4))
    assert not reattach_explanations(folder)
    assert "explanation" not in Bundle(run / "bundle", verify=True).table
