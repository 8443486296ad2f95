import json

import pytest

from saekit.data.corpus import CorpusConfig, fingerprint, load_corpus, load_documents
from saekit.errors import ConfigError


def test_default_corpus_is_real_labelled_text():
    docs = load_documents(CorpusConfig(max_docs=300))
    assert len(docs) == 300
    assert {d["labels"]["sentiment"] for d in docs} == {"negative", "neutral", "positive"}
    assert len({d["labels"]["topic"] for d in docs}) >= 4
    assert all(len(d["text"]) >= 20 and d["text"].isascii() for d in docs)


def test_doc_ids_are_stable_across_max_docs():
    small = load_documents(CorpusConfig(max_docs=50))
    big = {d["doc_id"]: d["text"] for d in load_documents(CorpusConfig(max_docs=500))}
    assert all(big[d["doc_id"]] == d["text"] for d in small)
    assert fingerprint(small) == fingerprint(load_documents(CorpusConfig(max_docs=50)))


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("first document here\n\nsecond document here\n")
    docs = load_documents(CorpusConfig(name=str(tmp_path / "a.txt"), min_chars=1))
    assert sorted(d["text"] for d in docs) == ["first document here", "second document here"]
    rows = [{"body": f"text number {i}", "y": i % 2} for i in range(6)]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = load_documents(CorpusConfig(name=str(tmp_path / "b.jsonl"), text_field="body", label_fields=["y"], min_chars=1))
    assert {d["doc_id"]: d["labels"]["y"] for d in docs} == {i: i % 2 for i in range(6)}
    (tmp_path / "c.csv").write_text("body,y\nhello world,1\nbye world,0\n")
    ds = load_corpus(CorpusConfig(name=str(tmp_path / "c.csv"), text_field="body", label_fields=["y"], min_chars=1))
    assert set(ds.column_names) == {"doc_id", "text", "label_y"}
    with pytest.raises(ConfigError, match="no text column 'text'"):
        load_documents(CorpusConfig(name=str(tmp_path / "c.csv"), min_chars=1))
