"""Steering: exact no-op at alpha = 0, hook cleanup, SAE-consistent clamps, topic steering on SmolLM2,
and steered embedding search."""

import pytest
import torch

from saekit.analysis.steering import (
    FeatureEdit,
    class_mean_direction,
    clamp_edit,
    decoder_alignment,
    generate_steered,
    steer,
    steered_search,
    topic_token_ids,
    topic_token_probability,
)
from saekit.errors import ConfigError, ShapeMismatchError
from saekit.sae.registry import create
from support.hooks import count_hooks

LAYER, LENS_HOOK = "model.layers.16", "blocks.16.hook_resid_post"
TOPIC_WORDS = [" flight", " flights", " plane", " airline", " airport", " pilot", " travel", " trip"]
PROMPTS = ["Yesterday I went to the", "My favourite thing about today is", "I just bought a new",
           "The best part of the weekend was the", "Let me tell you about my"]


def _topk(d_in=16, d_sae=64, k=4, seed=0):
    sae = create({"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k, "seed": seed})
    return sae.eval()


# -- fast unit tests (no model) ---------------------------------------------------------------------------------


def test_clamp_keeps_the_error_term_and_changes_only_the_edited_feature():
    sae = _topk()
    x = torch.randn(5, 7, 16)
    code = sae.encode(x)
    f = int(code.indices[0, 0, 0])
    z_f = code.dense()[..., f]
    # clamping to a value changes x by exactly (value - z_f) * W_dec[f]; ablating removes z_f * W_dec[f]
    out = clamp_edit(sae, x, [FeatureEdit(f, "clamp", value=3.0)])
    torch.testing.assert_close(out, x + (3.0 - z_f)[..., None] * sae.W_dec[f].detach(), atol=1e-5, rtol=0)
    ablated = clamp_edit(sae, x, [FeatureEdit(f, "ablate")])
    torch.testing.assert_close(ablated, x - z_f[..., None] * sae.W_dec[f].detach(), atol=1e-5, rtol=0)
    assert (ablated - x).norm() > 0 and sae.encode(ablated).dense()[0, 0, f] < z_f[0, 0]


def test_steer_on_a_plain_module_adds_alpha_times_direction_at_chosen_positions():
    model = torch.nn.Sequential(torch.nn.Identity())
    sae = _topk()
    x = torch.randn(2, 6, 16)
    with steer(model, "0", sae=sae, edits=[FeatureEdit(3, alpha=2.0)], positions=[1, 4]):
        out = model(x)
    delta = out - x
    torch.testing.assert_close(delta[:, [1, 4]], (2.0 * sae.W_dec[3].detach()).expand(2, 2, 16))
    assert delta[:, [0, 2, 3, 5]].abs().max() == 0
    v = torch.randn(16)
    with steer(model, "0", vector=v, alpha=0.5, positions=slice(-2, None)):
        out = model(x)
    torch.testing.assert_close((out - x)[:, -2:], (0.5 * v).expand(2, 2, 16))
    assert (out - x)[:, :-2].abs().max() == 0


def test_positions_are_absolute_across_kv_cached_forwards():
    model = torch.nn.Sequential(torch.nn.Identity())
    v = torch.ones(4)
    with steer(model, "0", vector=v, alpha=1.0, positions=[2, 4]):
        prompt = model(torch.zeros(1, 3, 4))  # positions 0..2
        step3 = model(torch.zeros(1, 1, 4))  # position 3
        step4 = model(torch.zeros(1, 1, 4))  # position 4
    assert prompt[0, :, 0].tolist() == [0, 0, 1] and step3.sum() == 0 and step4.sum() == 4


def test_bad_edits_are_named():
    with pytest.raises(ConfigError, match="mode"):
        FeatureEdit(1, "boost")
    with pytest.raises(ConfigError, match="need an SAE"):
        with steer(torch.nn.Sequential(torch.nn.Identity()), "0", edits=[FeatureEdit(1, alpha=1.0)]):
            pass
    with pytest.raises(ConfigError, match="d_sae=64"):
        with steer(torch.nn.Sequential(torch.nn.Identity()), "0", sae=_topk(), edits=[FeatureEdit(64, alpha=1.0)]):
            pass


def test_class_mean_direction_is_unit_and_points_to_the_positive_class():
    acts = torch.randn(200, 8)
    labels = ["a" if i % 4 == 0 else "b" for i in range(200)]
    acts[::4, 2] += 5.0
    v = class_mean_direction(acts, labels, "a")
    assert abs(float(v.norm()) - 1) < 1e-6 and int(v.abs().argmax()) == 2 and v[2] > 0
    with pytest.raises(Exception, match="both classes"):
        class_mean_direction(acts, labels, "zzz")


# -- SmolLM2 (HF and TransformerLens) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def topic_setup(smollm, tweets):
    """Layer-16 activations of 100 tweets (positions >= 1: the first token is an attention sink with huge
    norm that would dominate the class means), the airline-vs-rest direction and its raw scale."""
    from saekit.sources.base import SourceConfig
    from saekit.sources.hf import HFSource

    model, tok = smollm
    docs = tweets[:100]
    src = HFSource(SourceConfig(kind="hf", hooks=[LAYER], batch_size=20, max_length=32), model, tok)
    acts, dids, pos = [], [], []
    for b in src.iter_batches(docs):
        acts.append(b.acts[LAYER]), dids.append(b.doc_id), pos.append(b.pos)
    keep = torch.cat(pos) > 0
    acts_ND, dids = torch.cat(acts)[keep], torch.cat(dids)[keep]
    topic = {d["doc_id"]: d["labels"]["topic"] for d in docs}
    labels = [topic[int(i)] for i in dids]
    is_air = torch.tensor([lab == "airline" for lab in labels])
    raw_norm = float((acts_ND[is_air].mean(0) - acts_ND[~is_air].mean(0)).norm())
    return {"acts": acts_ND, "labels": labels, "direction": class_mean_direction(acts_ND, labels, "airline"),
            "scale": raw_norm, "token_ids": topic_token_ids(tok, TOPIC_WORDS)}


def _logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.slow
@torch.no_grad()
def test_alpha_zero_is_bitwise_noop_hf_and_lens(smollm, smollm_lens):
    model, tok = smollm
    ids = tok("The flight was delayed again", return_tensors="pt").input_ids
    sae = _topk(d_in=576, d_sae=128)
    v = torch.randn(576)
    for m, hook in ((model, LAYER), (smollm_lens, LENS_HOOK)):
        ref = _logits(m, ids)
        before = count_hooks(m)
        with steer(m, hook, sae=sae, edits=[FeatureEdit(5, "add", alpha=0.0)], vector=v, alpha=0.0):
            assert count_hooks(m) == before
            same = _logits(m, ids)
        assert torch.equal(same, ref), hook
        with steer(m, hook, vector=v, alpha=20.0):
            moved = _logits(m, ids)
        assert not torch.equal(moved, ref)
    # the same edit through both backends gives the same logits (they share weights and the residual stream)
    with steer(model, LAYER, sae=sae, edits=[FeatureEdit(5, alpha=30.0)]):
        hf = _logits(model, ids)
    with steer(smollm_lens, LENS_HOOK, sae=sae, edits=[FeatureEdit(5, alpha=30.0)]):
        lens = _logits(smollm_lens, ids)
    torch.testing.assert_close(hf, lens, atol=2e-3, rtol=0)


@pytest.mark.slow
@torch.no_grad()
def test_hooks_removed_when_body_or_forward_raises(smollm, smollm_lens):
    model, tok = smollm
    ids = tok("hello there", return_tensors="pt").input_ids
    wrong_sae = _topk(d_in=16)  # its encode raises ShapeMismatchError inside the hooked forward
    for m, hook in ((model, LAYER), (smollm_lens, LENS_HOOK)):
        _logits(m, ids)  # the bridge installs its own capture hooks on its first forward
        before = count_hooks(m)
        with pytest.raises(RuntimeError, match="boom"):
            with steer(m, hook, vector=torch.randn(576), alpha=1.0):
                assert count_hooks(m) == before + 1
                raise RuntimeError("boom")
        assert count_hooks(m) == before
        with pytest.raises(ShapeMismatchError):
            with steer(m, hook, sae=wrong_sae, edits=[FeatureEdit(0, "clamp", value=1.0)]):
                _logits(m, ids)
        assert count_hooks(m) == before


@pytest.mark.slow
def test_class_mean_vector_raises_topic_token_probability(smollm, topic_setup):
    model, tok = smollm
    ids = topic_setup["token_ids"]
    base = topic_token_probability(model, tok, PROMPTS, ids)
    steered = topic_token_probability(model, tok, PROMPTS, ids, hook=LAYER, vector=topic_setup["direction"],
                                      alpha=topic_setup["scale"])
    print(f"\nRepE vector at {LAYER}: topic mass {base:.5f} -> {steered:.5f} (alpha {topic_setup['scale']:.1f})")
    assert steered > 1.5 * base
    away = topic_token_probability(model, tok, PROMPTS, ids, hook=LAYER, vector=topic_setup["direction"],
                                   alpha=-topic_setup["scale"])
    assert away < base


@pytest.mark.slow
def test_sae_feature_raises_topic_token_probability(smollm, topic_setup, tmp_path):
    """A top-k SAE trained briefly on the layer's activations; the feature is the one a researcher would
    pick: the largest difference of mean activation between airline and other rows, its top examples
    checked to be mostly airline tweets. It is added at the strength it reaches on real data (its
    largest activation; decoder rows are unit norm). Choosing by decoder alignment with the class-mean
    direction and adding the class-mean norm was not robust: the best-aligned row (cos ~0.3) can be a
    mixed feature that fires on half the rows, and the class-mean norm (27) is below the peak
    activations of these features (about 50-85), so pick and effect moved with training's float noise."""
    from saekit.store.batches import TensorBatches
    from saekit.train import TrainConfig, train

    model, tok = smollm
    acts = topic_setup["acts"]
    sae = create({"architecture": "topk", "d_in": 576, "d_sae": 256, "k": 16, "seed": 0})
    cfg = TrainConfig(total_steps=300, batch_size=256, checkpoint_every=0, progress_bar=False,
                      normalize_activations="expected_average_only_in", lr=2e-3)
    train(sae, TensorBatches(acts, 256, seed=0), cfg, tmp_path / "sae")
    from saekit.sae.registry import load_sae

    sae = load_sae(tmp_path / "sae").eval()
    is_air_N = torch.tensor([lab == "airline" for lab in topic_setup["labels"]])
    with torch.no_grad():
        z_NF = sae.encode(acts).dense()
    f = int((z_NF[is_air_N].mean(0) - z_NF[~is_air_N].mean(0)).argmax())
    z_N = z_NF[:, f]
    top = z_N.topk(20).indices.tolist()
    airline_share = sum(topic_setup["labels"][i] == "airline" for i in top) / len(top)
    ids = topic_setup["token_ids"]
    base = topic_token_probability(model, tok, PROMPTS, ids)
    edits = [FeatureEdit(f, "add", alpha=float(z_N.max()))]
    steered = topic_token_probability(model, tok, PROMPTS, ids, hook=LAYER, sae=sae, edits=edits)
    print(f"\nSAE feature {f} (cos {float(decoder_alignment(sae, topic_setup['direction'])[f]):.2f}, "
          f"{airline_share:.0%} of top-20 airline, alpha {float(z_N.max()):.1f}): "
          f"topic mass {base:.5f} -> {steered:.5f}")
    assert airline_share >= 0.6
    assert steered > 1.3 * base


@pytest.mark.slow
def test_generate_steered_same_seed_and_lens_generates_through_hf(smollm, smollm_lens, topic_setup):
    model, tok = smollm
    kw = dict(max_new_tokens=8, seed=3)
    noop = generate_steered(model, tok, "I am going to", LAYER, vector=topic_setup["direction"], alpha=0.0, **kw)
    assert noop["default"] == noop["steered"] and set(noop) >= {"prompt", "default", "steered"}
    again = generate_steered(model, tok, "I am going to", LAYER, **kw)
    assert again["default"] == noop["default"]  # same seed, same text
    _logits(smollm_lens, tok("warm up", return_tensors="pt").input_ids)  # the bridge wires its own hooks lazily
    before = count_hooks(smollm_lens)
    lens = generate_steered(smollm_lens, tok, "I am going to", LENS_HOOK, vector=topic_setup["direction"],
                            alpha=topic_setup["scale"] * 3, **kw)
    assert lens["default"] == noop["default"] and lens["steered"] != lens["default"]
    assert count_hooks(smollm_lens) == before


# -- embedding search -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_adding_a_feature_moves_documents_that_activate_it_up(minilm, tweets, tmp_path):
    from saekit.store.batches import TensorBatches
    from saekit.train import TrainConfig, train

    emb = torch.as_tensor(minilm.encode([d["text"] for d in tweets], convert_to_tensor=True)).float().cpu()
    sae = create({"architecture": "topk", "d_in": emb.shape[1], "d_sae": 128, "k": 8, "seed": 0})
    train(sae, TensorBatches(emb, 100, seed=0), TrainConfig(total_steps=200, batch_size=100, checkpoint_every=0,
                                                           progress_bar=False, lr=3e-3), tmp_path / "sae")
    sae.eval()
    with torch.no_grad():
        z_NF = sae.encode(emb).dense()
    counts = (z_NF > 0).sum(0)
    f = int(torch.where((counts >= 10) & (counts <= 60), counts, 0).argmax())  # a feature of a minority of docs
    active = set((z_NF[:, f] > 0).nonzero().squeeze(1).tolist())
    q = next(i for i in range(len(tweets)) if i not in active)
    res = steered_search(sae, emb[q], emb, [FeatureEdit(f, "add", alpha=float(z_NF[:, f].max()) * 2)], top_n=10)
    share = lambda ranking: sum(r in active for r, _ in ranking) / len(ranking)
    assert share(res["after"]) > share(res["before"])
    assert res["entered"] and all(r in res["moved"] for r in res["entered"])
    assert sum(r in active for r in res["entered"]) > sum(r in active for r in res["left"])
    assert res["feature_contributions"][f] > 0
    # no edits: the ranking does not change
    same = steered_search(sae, emb[q], emb, [], top_n=10)
    assert same["before"] == same["after"] and same["moved"] == []


@pytest.mark.slow
def test_steer_cli_on_an_llm_run_folder(smollm, tweets, tmp_path, capsys):
    import argparse
    import json

    from saekit.cli.analysis import add_steer_arguments, cmd_steer
    from saekit.sae.registry import save_sae
    from saekit.sources.base import SourceConfig
    from saekit.sources.hf import HFSource
    from saekit.store.reader import ActivationStore
    from saekit.store.writer import cache_activations

    model, tok = smollm
    run = tmp_path / "run"
    cache_activations(HFSource(SourceConfig(kind="hf", hooks=[LAYER], batch_size=8, max_length=24), model, tok),
                      tweets[:8], run / "store")
    sae = _topk(d_in=576, d_sae=64)
    with torch.no_grad():  # centred on the rows: the preflight refuses an SAE worse than their mean (FVU > 1)
        sae.b_dec.copy_(ActivationStore(run / "store")[:].mean(0))
    save_sae(sae, run / "train" / "final_sae")
    p = argparse.ArgumentParser()
    add_steer_arguments(p)
    args = p.parse_args([str(run), "--prompt", "I am going to", "--feature", "3", "--alpha", "80", "--clamp", "5=2.5",
                         "--max-new-tokens", "5", "--seed", "1"])
    assert cmd_steer(args) == 0
    printed = capsys.readouterr().out
    assert "default:" in printed and "steered:" in printed
    (saved,) = (run / "steer").glob("*.json")
    out = json.loads(saved.read_text())
    assert out["hook"] == LAYER and out["seed"] == 1 and out["default"] != out["steered"]
    assert [e["mode"] for e in out["edits"]] == ["add", "clamp"] and out["edits"][1]["value"] == 2.5
    with pytest.raises(ConfigError, match="one --alpha per --feature"):
        cmd_steer(p.parse_args([str(run), "--prompt", "x", "--feature", "1", "--feature", "2", "--alpha", "1",
                                "--alpha", "2", "--alpha", "3"]))
