"""Streamed corpora (saekit.data.streaming): the documents, order and doc_ids of load_documents,
read from Arrow on demand, and a store cached from them identical to one cached from the list."""

from __future__ import annotations

import json

import pytest

from saekit.data.corpus import CorpusConfig, fingerprint, load_documents
from saekit.data.streaming import DocumentSequence, open_documents
from saekit.errors import ConfigError

from support.runs import TokenNoiseSource, llm_spec, synthetic_docs


def _jsonl(tmp_path, n=300):
    rows = [{"body": d["text"] * (1 + i % 3), "y": d["labels"]["sentiment"], "n": i}
            for i, d in enumerate(synthetic_docs(n, min_words=2, max_words=8))]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("extra", [{}, {"max_docs": 40}, {"shuffle_seed": 7, "min_chars": 30}])
def test_streamed_documents_equal_load_documents(tmp_path, extra):
    cfg = CorpusConfig(name=str(_jsonl(tmp_path)), text_field="body", label_fields=["y", "n"], **extra)
    listed, streamed = load_documents(cfg), open_documents(cfg)
    assert isinstance(streamed, DocumentSequence)
    assert len(streamed) == len(listed) and 0 < len(listed)
    assert list(streamed) == listed  # iteration, in chunks
    assert streamed[3:17] == listed[3:17] and streamed[-1] == listed[-1]
    assert fingerprint(streamed) == fingerprint(listed)


def test_parquet_and_shards(tmp_path):
    import datasets

    src = _jsonl(tmp_path)
    datasets.load_dataset("json", data_files=str(src), split="train").to_parquet(str(tmp_path / "c.parquet"))
    cfg = CorpusConfig(name=str(tmp_path / "c.parquet"), text_field="body", label_fields=["y"])
    docs = open_documents(cfg)
    assert list(docs) == load_documents(cfg)
    parts = [docs.shard(r, 3) for r in range(3)]
    ids = [d["doc_id"] for p in parts for d in p]
    assert sorted(ids) == sorted(d["doc_id"] for d in docs) and len(set(ids)) == len(ids)
    assert parts[1][0] == docs[1]
    with pytest.raises(ConfigError, match="rank"):
        docs.shard(3, 3)
    with pytest.raises(IndexError):
        docs[len(docs)]


def test_missing_columns_and_small_corpora_fall_back(tmp_path):
    path = _jsonl(tmp_path)
    with pytest.raises(ConfigError, match="no label column 'zzz'"):
        open_documents(CorpusConfig(name=str(path), text_field="body", label_fields=["zzz"]))
    with pytest.raises(ConfigError, match="no text column"):
        open_documents(CorpusConfig(name=str(path)))
    (tmp_path / "a.txt").write_text("first document here\nsecond document here\n")
    txt = CorpusConfig(name=str(tmp_path / "a.txt"), min_chars=1)
    assert open_documents(txt) == load_documents(txt)  # .txt: the list itself


def test_store_cached_from_a_stream_equals_the_list_one(tmp_path):
    from saekit.store.writer import StoreConfig, cache_activations

    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in synthetic_docs(70)))
    cfg = CorpusConfig(name=str(path), min_chars=1)
    hook, shas = "blocks.0", []
    for name, docs in (("list", load_documents(cfg)), ("stream", open_documents(cfg))):
        src = TokenNoiseSource(llm_spec("tiny", hook, 8), vocab_size=64)
        out = cache_activations(src, docs, tmp_path / name, StoreConfig(docs_per_shard=16))
        manifest = json.loads((out[hook] / "manifest.json").read_text())
        shas.append((manifest["docs_sha256"], manifest["corpus_fingerprint"], (out[hook] / "docs.jsonl").read_bytes()))
    assert shas[0] == shas[1]
