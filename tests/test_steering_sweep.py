"""Measured steering: sweeps (effect vs damage, calibrated strength, determinism), contrastive feature
search, conditional steering. Fast tests use tiny SAEs on identity modules; slow ones SmolLM2."""

import json
import math

import pytest
import torch

from saekit.analysis.conditional import detector_values, steer_conditional
from saekit.analysis.contrastive import rank_latents
from saekit.analysis.steering import FeatureEdit
from saekit.analysis.steering_sweep import choose_strength, edit_context
from saekit.analysis.sweep_report import format_sweep_table, saved_sweeps, write_sweep_report
from saekit.analysis.text_probe import fit_linear_probe
from saekit.errors import ConfigError
from saekit.eval.difference import difference_interval, difference_interval_fn
from saekit.sae.registry import create
from support.hooks import count_hooks

LAYER, PROBE_LAYER = "model.layers.15", "model.layers.20"
AIRLINE_WORDS = [" flight", " flights", " plane", " airline", " airport", " pilot", " gate", " delayed", " luggage",
                 " seat", " travel", " trip"]
PROMPTS = ["Yesterday I went to the", "My favourite thing about today is", "I just bought a new",
           "The best part of the weekend was the", "Let me tell you about my", "This morning I"]


def _topk(d_in=16, d_sae=64, k=4, seed=0):
    return create({"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k, "seed": seed}).eval()


# -- conditional steering (no model) ------------------------------------------------------------------------------


def test_conditional_edit_touches_only_positions_where_the_detector_fires():
    model = torch.nn.Sequential(torch.nn.Identity())
    sae = _topk()
    x = torch.randn(3, 9, 16)
    det = int(sae.encode(x).indices[0, 0, 0])  # a latent that fires somewhere
    z = detector_values(sae, x, det)
    thr = float(z[z > 0].median()) if (z > 0).sum() > 1 else 0.0
    gate = z > thr
    assert gate.any() and (~gate).any()
    with steer_conditional(model, "0", sae=sae, detector=det, threshold=thr, edits=[FeatureEdit(5, alpha=3.0)]) as st:
        out = model(x)
    assert torch.equal(out[~gate], x[~gate])  # silent positions: bitwise the input
    torch.testing.assert_close(out[gate], x[gate] + 3.0 * sae.W_dec[5].detach())
    assert st.fired == int(gate.sum()) and st.seen == gate.numel() and 0 < st.rate < 1
    assert count_hooks(model) == 0


def test_conditional_with_nothing_to_do_installs_no_hook_and_bad_detector_is_named():
    model = torch.nn.Sequential(torch.nn.Identity())
    sae = _topk()
    with steer_conditional(model, "0", sae=sae, detector=1, edits=[FeatureEdit(5, alpha=0.0)]):
        assert count_hooks(model) == 0
    with pytest.raises(ConfigError, match="d_sae=64"):
        with steer_conditional(model, "0", sae=sae, detector=64, edits=[FeatureEdit(5, alpha=1.0)]):
            pass


def test_edit_context_needs_exactly_one_of_feature_and_vector_and_strength_zero_is_no_hook():
    model = torch.nn.Sequential(torch.nn.Identity())
    sae = _topk()
    with pytest.raises(ConfigError, match="exactly one"):
        edit_context(model, "0", 1.0, sae=sae)
    with pytest.raises(ConfigError, match="exactly one"):
        edit_context(model, "0", 1.0, sae=sae, feature=1, vector=torch.ones(16))
    for mode in ("add", "clamp"):
        with edit_context(model, "0", 0.0, sae=sae, feature=3, mode=mode):
            assert count_hooks(model) == 0
    x = torch.randn(2, 4, 16)
    with edit_context(model, "0", 2.0, sae=sae, vector=torch.ones(16)):
        assert torch.equal(model(x), x + 2.0)


# -- contrastive ranking and its interval ----------------------------------------------------------------------


def test_rank_latents_finds_the_planted_latent_and_leaves_out_ubiquitous_ones():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(60, 20, generator=g) * (torch.rand(60, 20, generator=g) < 0.2)
    b = torch.rand(80, 20, generator=g) * (torch.rand(80, 20, generator=g) < 0.2)
    a[:, 7] += 1.0  # fires on A, rarely on B
    a[:, 3] += 5.0
    b[:, 3] += 3.0  # a larger raw difference (2.0) but it fires on every B document
    ranked = rank_latents(a, b, top_n=3, interval=difference_interval_fn(300, 0))
    assert ranked[0]["feature"] == 7 and all(r["feature"] != 3 for r in ranked)
    lo, hi = ranked[0]["ci95"]
    assert lo < ranked[0]["diff"] < hi and lo > 0.5
    everything = rank_latents(a, b, top_n=3, max_fires_b=1.0)
    assert everything[0]["feature"] == 3
    with pytest.raises(ConfigError, match=">= 2 documents"):
        rank_latents(a[:1], b)


def test_difference_interval_covers_the_truth_and_narrows_with_more_documents():
    g = torch.Generator().manual_seed(1)
    small = difference_interval(torch.randn(30, generator=g) + 1, torch.randn(30, generator=g), 500, 0)
    big = difference_interval(torch.randn(3000, generator=g) + 1, torch.randn(3000, generator=g), 500, 0)
    assert small[0] < 1 < small[1] and big[0] < 1 < big[1]
    assert big[1] - big[0] < (small[1] - small[0]) / 5
    assert difference_interval(torch.ones(1), torch.ones(5)) is None


def test_linear_probe_separates_planted_classes():
    g = torch.Generator().manual_seed(2)
    pos, neg = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g)
    pos[:, 2] += 3
    probe = fit_linear_probe(pos, neg, hook="h")
    assert float(probe(pos).mean()) > 0.8 and float(probe(neg).mean()) < 0.2
    with pytest.raises(ConfigError, match=">= 2 rows"):
        fit_linear_probe(pos[:1], neg, hook="h")


# -- choosing a strength and writing the report ------------------------------------------------------------------


def _row(s, mass, kl):
    fig = lambda m: {"mean": m, "ci95": None if m is None else [m * 0.9, m * 1.1]}  # noqa: E731
    return {"strength": s, "target_mass": fig(mass), "feature_act": fig(None), "probe_score": fig(None),
            "kl": fig(kl), "perplexity": fig(10.0), "samples": ["x"], "target_log_mass": math.log(mass)}


def test_choose_strength_maximises_effect_within_the_kl_budget(tmp_path):
    rows = [_row(0.0, 0.01, 0.0), _row(10.0, 0.02, 0.1), _row(20.0, 0.05, 0.45), _row(40.0, 0.2, 0.9)]
    ch = choose_strength(rows, "target_mass", 0.5)
    assert ch["strength"] == 20.0 and ch["ratio_to_unsteered"] == pytest.approx(5.0)
    assert choose_strength(rows, "target_mass", 1.0)["strength"] == 40.0
    assert choose_strength(rows, "target_mass", 0.05)["strength"] == 0.0  # only the unsteered model fits
    report = {"rows": rows, "chosen": ch, "kl_budget": 0.5, "feature": 3, "hook": "h", "mode": "add",
              "nan": float("nan")}
    table = format_sweep_table(report)
    assert "chosen strength 20" in table and "5.00x" in table and "probe" not in table
    paths = write_sweep_report(report, tmp_path / "sweep-f3")
    saved = json.loads(paths["json"].read_text())  # strict JSON: NaN written as null
    assert saved["nan"] is None and paths["png"].stat().st_size > 1000
    assert list(saved_sweeps(tmp_path)) == ["sweep-f3"]


# -- SmolLM2 -----------------------------------------------------------------------------------------------------


def _logits(model, ids):
    return model(ids).logits


@pytest.fixture(scope="module")
def airline_setup(smollm, tweets, tmp_path_factory):
    """A top-k SAE trained briefly on layer-15 activations of the 400 fixture tweets (positions >= 1), and
    the airline / other tweets split into a search half and a held-out half. (Trained on 120 tweets, the
    SAE's airline latents were mixed: its contrastive pick reached 2x only at KL 0.54.)"""
    from saekit.sae.registry import load_sae
    from saekit.sources.base import SourceConfig
    from saekit.sources.hf import HFSource
    from saekit.store.batches import TensorBatches
    from saekit.train import TrainConfig, train

    model, tok = smollm
    src = HFSource(SourceConfig(kind="hf", hooks=[LAYER], batch_size=20, max_length=32), model, tok)
    acts, pos = [], []
    for b in src.iter_batches(tweets):
        acts.append(b.acts[LAYER]), pos.append(b.pos)
    acts_ND = torch.cat(acts)[torch.cat(pos) > 0]
    sae = create({"architecture": "topk", "d_in": 576, "d_sae": 256, "k": 16, "seed": 0})
    folder = tmp_path_factory.mktemp("sae")
    train(sae, TensorBatches(acts_ND, 256, seed=0), TrainConfig(total_steps=400, batch_size=256, checkpoint_every=0,
          progress_bar=False, normalize_activations="expected_average_only_in", lr=2e-3), folder / "sae")
    air = [d["text"] for d in tweets if d["labels"]["topic"] == "airline"]
    other = [d["text"] for d in tweets if d["labels"]["topic"] != "airline"]
    return {"sae": load_sae(folder / "sae").eval(), "air": air, "other": other}


@pytest.mark.slow
@torch.no_grad()
def test_strength_zero_is_a_bitwise_noop_for_every_kind_of_edit(smollm, airline_setup):
    model, tok = smollm
    sae = airline_setup["sae"]
    ids = tok("The flight was delayed again", return_tensors="pt").input_ids
    ref = _logits(model, ids)
    kinds = [{"feature": 3}, {"feature": 3, "mode": "clamp"}, {"vector": torch.randn(576)},
             {"feature": 3, "condition": {"detector": 5, "threshold": -1.0}}]
    for kw in kinds:
        with edit_context(model, LAYER, 0.0, sae=sae, **kw):
            assert count_hooks(model) == 0
            assert torch.equal(_logits(model, ids), ref), kw
        with edit_context(model, LAYER, 40.0, sae=sae, **kw):
            assert not torch.equal(_logits(model, ids), ref), kw


@pytest.mark.slow
@torch.no_grad()
def test_conditional_steering_leaves_silent_positions_bitwise_unchanged(smollm, airline_setup):
    from saekit.sources.hooks import capture

    model, tok = smollm
    sae = airline_setup["sae"]
    ids = tok("@united my flight was delayed and the gate agent was rude. Anyway, lunch was nice today.",
              return_tensors="pt").input_ids
    clean = capture(model, [LAYER], lambda: model(ids))[LAYER]
    det = int(((sae.encode(clean).dense()[0] > 0).float().mean(0) - 0.5).abs().argmin())  # fires on about half
    z = detector_values(sae, clean, det)[0]
    gate = z > 0
    assert gate.any() and (~gate).any(), z
    with steer_conditional(model, LAYER, sae=sae, detector=det, threshold=0.0, edits=[FeatureEdit(7, alpha=30.0)]):
        edited = capture(model, [LAYER], lambda: model(ids))[LAYER][0]
    assert torch.equal(edited[~gate], clean[0][~gate])
    assert (edited[gate] - clean[0][gate]).abs().max() > 1.0


@pytest.mark.slow
def test_sweep_report_is_identical_across_runs_with_the_same_seed(smollm, airline_setup):
    from saekit.analysis.steering import topic_token_ids
    from saekit.analysis.steering_sweep import steering_sweep
    from saekit.artifacts import dumps_json, to_strict_json
    from saekit.eval.bootstrap import interval_fn

    model, tok = smollm
    kw = dict(sae=airline_setup["sae"], feature=7, target_token_ids=topic_token_ids(tok, AIRLINE_WORDS),
              max_new_tokens=6, seed=5, interval=interval_fn(100, 0), neutral_texts=["The cat sat on the mat."],
              progress=False)
    one = steering_sweep(model, tok, LAYER, PROMPTS[:3], [30.0], **kw)
    two = steering_sweep(model, tok, LAYER, PROMPTS[:3], [30.0], **kw)
    assert dumps_json(to_strict_json(one)) == dumps_json(to_strict_json(two))
    assert [r["strength"] for r in one["rows"]] == [0.0, 30.0]
    assert one["rows"][0]["kl"]["mean"] == 0.0 and one["rows"][1]["kl"]["mean"] > 0
    assert one["rows"][0]["samples"] != one["rows"][1]["samples"]
    other_seed = steering_sweep(model, tok, LAYER, PROMPTS[:3], [30.0], **{**kw, "seed": 6})
    assert other_seed["rows"][0]["samples"] != one["rows"][0]["samples"]


@pytest.mark.slow
def test_contrastive_feature_raises_airline_mass_within_budget_and_its_ablation_lowers_the_probe(
        smollm, airline_setup):
    """Pre-registered: the contrastive pick, swept, reaches >= 2x the unsteered airline-token mass at the
    calibrated strength with KL <= 0.5 nats; ablating it lowers a downstream airline probe on held-out
    airline tweets."""
    from saekit.analysis.contrastive import contrastive_search
    from saekit.analysis.steering import topic_token_ids
    from saekit.analysis.steering_sweep import steering_sweep
    from saekit.analysis.text_probe import pooled_activations, probe_scores
    from saekit.eval.bootstrap import interval_fn

    model, tok = smollm
    sae, air, other = airline_setup["sae"], airline_setup["air"], airline_setup["other"]
    half_a, half_b = len(air) // 2, len(other) // 2
    rep = contrastive_search(model, tok, LAYER, sae, air[:half_a], other[:half_b], top_n=5,
                             interval=difference_interval_fn(200, 0))
    f = rep["best"]
    best = rep["features"][0]
    assert best["ci95"][0] > 0 and best["fires_a"] > best["fires_b"]
    strengths = [10, 20, 40, 60, 80]  # the residual stream's scale at layer 15 (norms ~ 50-100), not the code's
    probe = fit_linear_probe(pooled_activations(model, tok, air[:half_a], PROBE_LAYER),
                             pooled_activations(model, tok, other[:half_b], PROBE_LAYER), hook=PROBE_LAYER)
    sweep = steering_sweep(model, tok, LAYER, PROMPTS, strengths, sae=sae, feature=f, probe=probe,
                           target_token_ids=topic_token_ids(tok, AIRLINE_WORDS), max_new_tokens=12, seed=0,
                           interval=interval_fn(200, 0), progress=False)
    ch = sweep["chosen"]
    print(f"\nfeature {f}: " + "; ".join(f"{r['strength']:g}: mass {r['target_mass']['mean']:.4f} "
                                          f"KL {r['kl']['mean']:.3f}" for r in sweep["rows"]))
    assert ch["kl"] <= 0.5 and ch["ratio_to_unsteered"] >= 2.0
    held_out = air[half_a:]
    clean = probe_scores(model, tok, held_out, probe)
    ablated = probe_scores(model, tok, held_out, probe, steer_hook=LAYER, sae=sae, edits=[FeatureEdit(f, "ablate")])
    print(f"airline probe on held-out airline tweets: {float(clean.mean()):.3f} -> {float(ablated.mean()):.3f}")
    assert float(ablated.mean()) < float(clean.mean())
    assert float((ablated < clean).float().mean()) >= 0.6


@pytest.mark.parametrize("kind", ["embedding", "hf"])
def test_contrast_store_finds_the_latent_of_a_label_in_embedding_and_token_stores(kind):
    from saekit.analysis.contrastive import contrast_store
    from saekit.analysis.probing import ArrayStore

    sae = _topk(k=4)
    g = torch.Generator().manual_seed(3)
    rows_per_doc = 1 if kind == "embedding" else 3
    docs = {d: {"text": f"doc {d}", "labels": {"topic": "air" if d % 3 == 0 else "other"}} for d in range(60)}
    doc_N = torch.arange(60).repeat_interleave(rows_per_doc)
    acts = 0.3 * torch.randn(len(doc_N), 16, generator=g)
    is_air_N = torch.tensor([docs[int(d)]["labels"]["topic"] == "air" for d in doc_N])
    acts[is_air_N] += 4.0 * sae.W_dec[9].detach()
    pos = torch.arange(len(doc_N)) % rows_per_doc if kind == "hf" else None
    store = ArrayStore(acts, doc_N, docs, pos_N=pos, kind=kind)
    rep = contrast_store(store, sae, "topic", "air", interval=difference_interval_fn(200, 0), top_n=3)
    assert rep["best"] == 9 and rep["n_a"] == 20 and rep["n_b"] == 40
    top = rep["features"][0]
    assert top["ci95"][0] > 0 and top["fires_a"] == 1.0 and top["examples"][0]["text"].startswith("doc ")
    with pytest.raises(ConfigError, match="label 'mood'"):
        contrast_store(store, sae, "mood", "x")
