"""Feature analysis and the browser bundle: known answers, exactness against a dense brute force,
chunking invariance, damage detection, embedding runs, and bounded memory on a 200k-row store."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from saekit.analysis.features import (
    AnalyzeConfig,
    feature_families,
    grouped_top,
    histogram_bins,
    merge_counts,
    row_pairs,
)
from saekit.browser.build import build_bundle
from saekit.browser.bundle import RECORDS, Bundle, BundleError
from support.runs import tiny_embedding_run, tiny_run
from saekit.sae.registry import load_sae
from saekit.store.reader import ActivationStore

DEAD, ONE_SHOT = (0, 1, 2), 3


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    run = tiny_run(tmp_path_factory.mktemp("browser") / "llm", dead=DEAD, one_shot=ONE_SHOT)
    build_bundle(run, AnalyzeConfig(chunk_rows=4096, top_examples=5, context=3))
    return run


@pytest.fixture(scope="module")
def dense_codes(llm_run):
    store, sae = ActivationStore(llm_run / "store"), load_sae(llm_run / "train")
    with torch.no_grad():
        return sae.encode(store[:]).dense()


# -- pure helpers ---------------------------------------------------------------------------------
def test_grouped_top_keeps_k_best_per_group_ties_to_first():
    g = torch.tensor([1, 0, 1, 1, 0, 2])
    s = torch.tensor([0.5, 0.1, 0.9, 0.5, 0.3, 0.0])
    keep = grouped_top(g, s, 2)
    assert sorted(keep.tolist()) == [0, 1, 2, 4, 5]  # group 1 keeps 0.9 and the first 0.5 (position 0)


def test_histogram_bins_put_max_in_last_bin_and_dead_features_nowhere_nan():
    v, m = torch.tensor([0.0, 0.5, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert histogram_bins(v, m, 4).tolist() == [0, 2, 3, 0]


def test_pair_counts_exact_and_lossy_beyond_cap():
    idx = torch.tensor([[0, 1, 2], [1, 2, 0]])
    val = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1: feature 0 inactive
    keys = row_pairs(idx, val, 10)
    k, c, cut = merge_counts(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), keys, 1000)
    assert dict(zip(k.tolist(), c.tolist())) == {1: 1, 2: 1, 12: 2} and not cut
    many = torch.arange(3000)
    k2, c2, cut2 = merge_counts(k, c, many, 1000)
    assert cut2 and len(k2) == 500 and 12 in k2.tolist()  # the most frequent pair survives


def test_families_parent_contains_child():
    count = torch.tensor([10, 4, 6, 0])
    # pairs (0,1) together 4 times: 1 always fires with 0; (0,2) 3 of 6: not nested enough
    keys, counts = torch.tensor([0 * 4 + 1, 0 * 4 + 2]), torch.tensor([4, 3])
    parent, p = feature_families(keys, counts, count, threshold=0.9, min_count=2)
    assert parent.tolist() == [-1, 0, -1, -1] and p[1] == 1.0


def test_table_row_keeps_feature_zero_as_a_parent():
    from saekit.browser.build import table_row

    rec = {"feature": 5, "count": 2, "density": 0.1, "mean": 1.0, "max": 2.0, "top": [], "labels": {},
           "logit_lens": {"promoted": [], "suppressed": []},
           "family": {"parent": 0, "p_parent": 1.0, "children": []}}
    assert table_row(rec)["parent"] == 0
    assert table_row({**rec, "family": {"parent": None, "p_parent": 0.0, "children": [[7, 1.0]]}})["parent"] == -1


# -- the bundle against a dense brute force --------------------------------------------------------
def test_stats_match_dense_brute_force(llm_run, dense_codes):
    b = Bundle(llm_run)
    z = dense_codes
    fires = z > 0
    for f in range(b.d_sae):
        rec = b.feature(f)
        assert rec["count"] == int(fires[:, f].sum())
        assert rec["density"] == pytest.approx(float(fires[:, f].float().mean()))
        assert rec["max"] == pytest.approx(float(z[:, f].max()), rel=1e-5)
        if rec["count"]:
            assert rec["mean"] == pytest.approx(float(z[fires[:, f], f].mean()), rel=1e-4)
            want = torch.topk(z[:, f], min(5, rec["count"])).values  # rows may tie (same token and prefix)
            assert [t["act"] for t in rec["top"]] == pytest.approx(want.tolist(), rel=1e-4)
            assert all(float(z[t["row"], f]) == pytest.approx(t["act"], rel=1e-4) for t in rec["top"])
            assert sum(rec["hist"]["counts"]) == rec["count"]


def test_dead_and_one_shot_features(llm_run):
    b = Bundle(llm_run)
    for f in DEAD:
        rec = b.feature(f)
        assert rec["count"] == 0 and rec["top"] == [] and rec["quantiles"] == []
        assert rec["hist"]["counts"] == [0] * len(rec["hist"]["counts"])
        assert all(math.isfinite(x) for x in (rec["density"], rec["mean"], rec["max"]))
    one = b.feature(ONE_SHOT)
    assert one["count"] == 1 and len(one["top"]) == 1
    ex = one["top"][0]
    assert ex["acts"][ex["center"]] == pytest.approx(ex["act"], rel=1e-2)  # fp16 index vs fp32 stats
    assert sum(a > 0 for a in ex["acts"]) == 1
    assert b.table.loc[list(DEAD), "dead"].all() and not b.table.loc[ONE_SHOT, "dead"]


def test_context_is_the_same_document_and_decoded(llm_run):
    b = Bundle(llm_run)
    store = ActivationStore(llm_run / "store")
    doc_ids, tok_ids = store.meta("doc_id"), store.meta("token_id")
    rec = next(b.feature(f) for f in range(b.d_sae) if b.feature(f)["count"] > 3)
    vocab = json.loads((llm_run.parent / "tiny_lm" / "tokenizer.json").read_text())["model"]["vocab"]
    inv = {i: w for w, i in vocab.items()}
    for ex in rec["top"]:
        r, c = ex["row"], ex["center"]
        rows = range(r - c, r - c + len(ex["tokens"]))
        assert all(int(doc_ids[i]) == ex["doc"] for i in rows)
        assert ex["tokens"] == [inv[int(tok_ids[i])] for i in rows]
        assert ex["labels"] == store.docs[ex["doc"]]["labels"]


def test_manifest_lists_every_file_and_logit_lens_uses_unembedding(llm_run):
    b = Bundle(llm_run)
    files = {p.relative_to(b.path).as_posix() for p in b.path.rglob("*") if p.is_file()}
    assert set(b.manifest["files"]) == files - {"saekit_manifest.json"}
    assert b.manifest["has_logit_lens"] and b.manifest["kind"] == "hf"
    from saekit.sources.models import load_lm

    model, tok = load_lm(b.manifest["model"])
    sae = load_sae(llm_run / "train")
    f = 10
    logits = (sae.W_dec[f] * model.transformer.ln_f.weight) @ model.lm_head.weight.T
    want = [tok.decode([int(i)]) for i in logits.topk(3).indices]
    assert [t for t, _ in b.feature(f)["logit_lens"]["promoted"][:3]] == want


def test_bundle_files_follow_the_declared_types(llm_run):
    """The writer and the app agree through browser.bundle's types: every record, table row and the
    manifest carry exactly the declared fields."""
    from saekit.browser.bundle import FEATURE_COLUMNS, BundleManifest, Example, FeatureRecord

    b = Bundle(llm_run)
    assert tuple(b.table.columns) == FEATURE_COLUMNS
    assert set(b.manifest) == set(BundleManifest.__annotations__)
    for f in (0, ONE_SHOT, 10):
        rec = b.feature(f)
        assert list(rec) == list(FeatureRecord.__annotations__)
        for ex in rec["top"] + [x for q in rec["quantiles"] for x in q["examples"]]:
            assert set(ex) <= set(Example.__annotations__) and {"row", "doc", "act", "labels", "tokens"} <= set(ex)


def test_latent_index_matches_sae_code(llm_run, dense_codes):
    idx, val = Bundle(llm_run).index.rows(np.array([0, 5, 700]))
    for j, r in enumerate([0, 5, 700]):
        got = {int(i): float(v) for i, v in zip(idx[j], val[j]) if v > 0}
        want = {int(i): float(dense_codes[r, i]) for i in dense_codes[r].nonzero().flatten()}
        assert got.keys() == want.keys()
        assert all(abs(got[i] - want[i]) <= 1e-3 * max(1, abs(want[i])) for i in want)


def test_chunking_does_not_change_the_bundle(llm_run, tmp_path):
    out = build_bundle(llm_run, AnalyzeConfig(chunk_rows=97, pair_chunk_rows=61, top_examples=5, context=3),
                       out=tmp_path / "b")
    a, b = Bundle(llm_run), Bundle(out)
    for f in range(a.d_sae):
        ra, rb = a.feature(f), b.feature(f)
        for key in ("count", "top", "hist", "cooccur", "family", "labels", "neighbours"):
            assert ra[key] == rb[key], (f, key)
        assert ra["max"] == rb["max"] and ra["mean"] == pytest.approx(rb["mean"], rel=1e-9)


# -- damage -------------------------------------------------------------------------------------------
def test_missing_and_damaged_bundles_raise_named_errors(llm_run, tmp_path):
    with pytest.raises(BundleError, match="saekit analyze"):
        Bundle(tmp_path)
    out = build_bundle(llm_run, AnalyzeConfig(top_examples=2, logit_lens=False), out=tmp_path / "b")
    raw = bytearray((out / RECORDS).read_bytes())
    raw[10] ^= 0x01
    (out / RECORDS).write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=RECORDS):
        Bundle(out)


def test_every_damaged_bundle_file_is_named(llm_run, tmp_path):
    """Promise 11 for the whole bundle: one changed byte in any file the manifest lists makes opening it
    raise BundleError naming that file."""
    import shutil

    out = build_bundle(llm_run, AnalyzeConfig(top_examples=2, logit_lens=False), out=tmp_path / "b")
    names = sorted(json.loads((out / "saekit_manifest.json").read_text())["files"])
    assert len(names) >= 3, names
    for name in names:
        copy = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, copy)
        raw = bytearray((copy / name).read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(raw))
        with pytest.raises(BundleError, match=rf"{name}: sha256 mismatch"):
            Bundle(copy)


# -- embedding runs ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_embedding_bundle_top_documents_and_labels(tmp_path, minilm, tweets):
    run = tiny_embedding_run(tmp_path / "emb", tweets[:150], model=minilm)
    b = Bundle(build_bundle(run, AnalyzeConfig(top_examples=5)))
    assert b.kind == "embedding" and not b.manifest["has_logit_lens"]
    store = ActivationStore(run / "store")
    docs = store.docs
    rec = next(b.feature(f) for f in range(b.d_sae) if b.feature(f)["count"] >= 5)
    for ex in rec["top"]:
        assert ex["text"] == docs[ex["doc"]]["text"] and "tokens" not in ex
    assert sum(rec["labels"]["sentiment"].values()) == len(rec["top"])
    assert b.feature(2)["count"] == 1


def test_synthetic_run_store_is_written_by_the_writer(tmp_path):
    """The model-free test store goes through `cache_activations`: a complete, verified store whose
    rows are the documents' tokens in order."""
    from support.runs import WORDS, synthetic_llm_run

    run = synthetic_llm_run(tmp_path / "syn", 600, d_sae=32, k=4, tokens_per_doc=20)
    store = ActivationStore(run / "store")
    assert store.complete and len(store) == 600 and store.manifest.n_docs == 30
    doc_id, tok = store.meta("doc_id"), store.meta("token_id")
    for d in (0, 17):
        words = store.docs[d]["text"].split()
        assert [WORDS[t - 2] for t in tok[doc_id == d].tolist()] == words


# -- memory does not grow with the store ----------------------------------------------------------------
@pytest.mark.slow
def test_peak_memory_does_not_grow_with_store_rows(tmp_path):
    """Bound: building a 200k-row bundle peaks at most 1.5× the 50k-row build's RSS growth (+32 MB slack)
    — rows grow 4× — and below 600 MB above the pre-build RSS."""
    from support.runs import synthetic_llm_run

    script = Path(__file__).resolve().parents[1] / "scripts"
    peaks = {}
    for rows in (50_000, 200_000):
        run = synthetic_llm_run(tmp_path / f"r{rows}", rows, d_sae=256, k=8)
        code = (f"import json, sys; sys.path.insert(0, {str(script)!r}); import bench_browser as b; "
                f"print(json.dumps(b.measure_build({str(run)!r}, 4096)))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peaks[rows] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mb"]
        assert Bundle(run).n_rows >= rows - 50
    assert peaks[200_000] <= 1.5 * peaks[50_000] + 32, peaks
    assert peaks[200_000] < 600, peaks
