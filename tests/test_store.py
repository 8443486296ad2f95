"""The activation store: resumable, atomic, verified, deterministic reads."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from saekit.errors import CorruptArtifactError, StoreExistsError
from saekit.sources.base import SourceConfig
from saekit.sources.embeddings import EmbeddingSource
from saekit.store.reader import ActivationStore
from saekit.store.writer import StoreConfig, cache_activations


@pytest.fixture(scope="module")
def emb_source(minilm):
    return EmbeddingSource(SourceConfig(kind="embedding", batch_size=32), minilm)


def _row_hashes(store: ActivationStore) -> list[str]:
    acts = store[:]
    meta = torch.stack([store.meta("doc_id"), store.meta("pos").long(), store.meta("token_id").long()], 1)
    return sorted(hashlib.sha256(a.numpy().tobytes() + m.numpy().tobytes()).hexdigest() for a, m in zip(acts, meta))


def test_interrupted_cache_resumes_to_identical_rows(tmp_path, emb_source, tweets):
    docs = tweets[:200]
    cfg = StoreConfig(docs_per_shard=25)
    full = ActivationStore(cache_activations(emb_source, docs, tmp_path / "full", cfg)["sentence_embedding"])
    part = tmp_path / "part"
    cache_activations(emb_source, docs, part, cfg, stop_after_shards=3)  # interrupted after 3 of 8 shards
    assert not ActivationStore(part).complete
    resumed = ActivationStore(cache_activations(emb_source, docs, part, cfg)["sentence_embedding"])
    assert resumed.complete and len(resumed) == len(full) == 200
    assert [s["sha256"] for s in resumed.shards] == [s["sha256"] for s in full.shards]
    assert _row_hashes(resumed) == _row_hashes(full)


SCRIPT = """
import sys
from saekit.data.corpus import CorpusConfig, load_documents
from saekit.sources.base import SourceConfig
from saekit.sources.embeddings import EmbeddingSource
from saekit.store.writer import StoreConfig, cache_activations
docs = load_documents(CorpusConfig(max_docs=400))[:240]
src = EmbeddingSource(SourceConfig(kind="embedding", batch_size=8))
cache_activations(src, docs, sys.argv[1], StoreConfig(docs_per_shard=8))
"""


def test_sigkill_during_caching_then_resume(tmp_path, emb_source, tweets):
    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(root)], stderr=subprocess.DEVNULL)
    manifest = root / "sentence_embedding" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(json.loads(manifest.read_text())["shards"])
    assert 2 <= done < 30, "the job should have been killed part-way"
    docs = tweets[:240]
    cfg = StoreConfig(docs_per_shard=8)
    resumed = ActivationStore(cache_activations(emb_source, docs, root, cfg)["sentence_embedding"])
    ref = ActivationStore(cache_activations(emb_source, docs, tmp_path / "ref", cfg)["sentence_embedding"])
    assert resumed.complete and len(resumed) == 240
    assert _row_hashes(resumed) == _row_hashes(ref)
    assert not [p for p in (root / "sentence_embedding").iterdir() if p.name.endswith(".tmp")]


def test_corrupted_or_truncated_shard_is_named(tmp_path, emb_source, tweets):
    path = cache_activations(emb_source, tweets[:64], tmp_path / "s", StoreConfig(docs_per_shard=16))["sentence_embedding"]
    shard = path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="shard-00001.safetensors"):
        ActivationStore(path)[:]
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(CorruptArtifactError, match="shard-00001.safetensors"):
        ActivationStore(path, verify=False)[:]  # even unverified, truncation is caught


def test_store_is_never_silently_overwritten(tmp_path, emb_source, tweets):
    cache_activations(emb_source, tweets[:32], tmp_path / "s", StoreConfig(docs_per_shard=16))
    with pytest.raises(StoreExistsError, match="different source or corpus"):
        cache_activations(emb_source, tweets[32:64], tmp_path / "s", StoreConfig(docs_per_shard=16))
    cache_activations(emb_source, tweets[32:64], tmp_path / "s", StoreConfig(docs_per_shard=16, overwrite=True))
    assert set(ActivationStore(tmp_path / "s").meta("doc_id").tolist()) == {d["doc_id"] for d in tweets[32:64]}


def test_shuffled_reader_is_deterministic_and_resumable(tmp_path, emb_source, tweets):
    store = ActivationStore(cache_activations(emb_source, tweets[:100], tmp_path / "s",
                                              StoreConfig(docs_per_shard=30))["sentence_embedding"])
    a, b = store.batches(16, seed=3), store.batches(16, seed=3)
    first = [a.next_batch() for _ in range(4)]
    assert all(torch.equal(x, b.next_batch()) for x in first)
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(10)]  # crosses an epoch boundary (100 rows / 16)
    c = store.batches(16, seed=3)
    c.load_state_dict(state)
    assert all(torch.equal(x, c.next_batch()) for x in expected)
    assert not torch.equal(store.batches(16, seed=4).next_batch(), first[0])
    # within an epoch rows are drawn without replacement: the first 6 batches (96 of 100 rows) are a
    # sub-multiset of the store's rows
    from collections import Counter

    def key(r):
        return r.numpy().tobytes()

    drawn = Counter(key(r) for r in torch.cat(first + expected[:2]))
    stored = Counter(key(r) for r in store[0:len(store)])
    assert sum(drawn.values()) == 96 and not drawn - stored


def test_rows_trace_back_to_documents(tmp_path, emb_source, tweets):
    store = ActivationStore(cache_activations(emb_source, tweets[:20], tmp_path / "s",
                                              StoreConfig(docs_per_shard=7))["sentence_embedding"])
    doc_ids = store.meta("doc_id")
    for row in (0, 13, 19):
        text = store.docs[int(doc_ids[row])]["text"]
        assert torch.allclose(store[[row]][0], emb_source.embed([text])[0], atol=1e-5)
    train, held = store.split_by_document(0.25, seed=0)
    assert set(doc_ids[train].tolist()).isdisjoint(doc_ids[held].tolist())
    assert os.path.exists(store.path / "docs.jsonl")


def test_manifest_is_typed_and_round_trips_through_the_reader(tmp_path, emb_source, tweets):
    from saekit.store.manifest import MANIFEST, StoreManifest

    path = cache_activations(emb_source, tweets[:40], tmp_path / "s", StoreConfig(docs_per_shard=16))["sentence_embedding"]
    store = ActivationStore(path)
    m = store.manifest
    assert isinstance(m, StoreManifest) and m.complete and m.rows == len(store) == 40
    assert [e["index"] for e in m.shards] == [0, 1, 2] and m.n_shards == 3
    assert StoreManifest.from_json(json.loads((path / MANIFEST).read_text())) == m
    raw = m.to_json() | {"extra_key": 1}
    with pytest.raises(CorruptArtifactError, match="unknown \\['extra_key'\\]"):
        StoreManifest.from_json(raw)
    del raw["extra_key"], raw["shards"]
    raw.pop("n_docs")
    with pytest.raises(CorruptArtifactError, match="missing \\['n_docs'\\]"):
        StoreManifest.from_json(raw)


def test_gather_returns_columns_in_the_order_asked(tmp_path, emb_source, tweets):
    store = ActivationStore(cache_activations(emb_source, tweets[:30], tmp_path / "s",
                                              StoreConfig(docs_per_shard=7))["sentence_embedding"])
    rows = [25, 3, 3, 14, 0]
    assert store.gather("doc_id", rows).tolist() == [int(store.meta("doc_id")[r]) for r in rows]
    assert torch.equal(store.gather("acts", rows), store[:][rows])
    with pytest.raises(KeyError, match="expected one of"):
        store.gather("labels", rows)


def _docs_store(tmp_path):
    from support.planted import planted_store

    return ActivationStore(planted_store(tmp_path / "cache", n_docs=30, every=0, docs_per_shard=10), hook="h")


def test_docs_jsonl_is_checksummed_and_a_changed_byte_is_named(tmp_path):
    store = _docs_store(tmp_path)
    f = store.path / "docs.jsonl"
    assert store.manifest.docs_sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert len(store.docs) == 30
    data = f.read_bytes()
    i = data.index(b'"text": "') + 9
    f.write_bytes(data[:i] + (b"X" if data[i:i + 1] != b"X" else b"Y") + data[i + 1:])  # still valid JSON
    with pytest.raises(CorruptArtifactError, match=r"docs\.jsonl: sha256 mismatch"):
        ActivationStore(store.path).docs


def test_a_damaged_docs_line_names_file_and_line(tmp_path):
    store = _docs_store(tmp_path)
    f = store.path / "docs.jsonl"
    lines = f.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:10] + b"\n"  # line 3 cut short
    f.write_bytes(b"".join(lines))
    with pytest.raises(CorruptArtifactError, match=r"docs\.jsonl: line 3 "):
        ActivationStore(store.path, verify=False).docs  # unverified: the parse itself names the line
    with pytest.raises(CorruptArtifactError, match=r"docs\.jsonl: sha256 mismatch"):
        ActivationStore(store.path).docs


def test_manifest_records_model_revision_tokenizer_hook_dtype_d_in_and_token_count(tmp_path):
    """Promise 27's manifest half: a store says what it was cached from, and its row count is the
    number of real (non-special) tokens of its documents, counted here with the tokenizer alone."""
    from support.runs import synthetic_docs, tiny_lm

    from saekit.sources.base import SourceConfig
    from saekit.sources.factory import make_source
    from saekit.sources.models import tokenizer_hash

    folder = tiny_lm(tmp_path / "lm", d_model=24)
    source = make_source(SourceConfig(kind="hf", model=str(folder), hooks=["transformer.h.0"], batch_size=8,
                                      dtype="float32", max_length=32))
    docs = synthetic_docs(20, seed=3)
    store = ActivationStore(cache_activations(source, docs, tmp_path / "cache", StoreConfig(docs_per_shard=8))
                            ["transformer.h.0"])
    src = store.manifest.source
    assert src["model"] and src["revision"]
    assert src["tokenizer_hash"] == tokenizer_hash(source.tok) and len(src["tokenizer_hash"]) >= 16
    assert src["hooks"] == ["transformer.h.0"] and store.hook == "transformer.h.0"
    assert src["dtype"] == "float32" and store.manifest.dtype == "float32"
    assert src["d_in"] == {"transformer.h.0": 24} and store.d_in == 24
    special = set(source.tok.all_special_ids)
    n_tokens = sum(sum(t not in special for t in source.tok(d["text"])["input_ids"][:32]) for d in docs)
    assert store.manifest.rows == len(store) == n_tokens > 0
    assert store.manifest.n_docs == 20 and store.complete
    again = ActivationStore(cache_activations(make_source(SourceConfig(
        kind="hf", model=str(folder), hooks=["transformer.h.0"], batch_size=8, dtype="float32", max_length=32)),
        docs, tmp_path / "again", StoreConfig(docs_per_shard=8))["transformer.h.0"])
    assert [s["sha256"] for s in again.shards] == [s["sha256"] for s in store.shards]  # same inputs, same bytes
