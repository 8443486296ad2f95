"""Corpora that stream: the documents of a file or hub corpus read from Arrow on demand.

    docs = open_documents(CorpusConfig(name="big.parquet"))   # nothing read into Python objects yet
    cache_activations(source, docs, "runs/x/store")          # reads each shard's documents when it caches it

Why: `load_documents` builds one Python dict per document (text, labels), so caching a 10M-token
corpus holds the whole corpus as Python objects (several times its size on disk) for the whole
run. `open_documents` keeps the `datasets` table memory-mapped (Arrow, outside the Python heap) and
only an int64 row index per document; a slice (one cache shard) or an iteration chunk becomes
dicts only while it is used, so memory stays flat as the corpus grows.

Same documents, same order, same `doc_id`s as `load_documents` (the `min_chars` filter is
computed in Arrow, the shuffle is Python's `random.Random(shuffle_seed)` over the same length), so
a store cached either way has the same fingerprint. The packaged default corpus and `.txt` files
are small or line-based and come back as `load_documents`' list. `shard(rank, world_size)` gives a
rank every world_size-th document (by position), for ranks that each cache their own documents.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from saekit.data.corpus import DEFAULT_CORPUS, CorpusConfig, hub_dataset, local_dataset, load_documents
from saekit.errors import ConfigError

CHUNK = 1024  # documents turned into dicts at a time while iterating


class DocumentSequence(Sequence):
    """`{doc_id, text, labels}` dicts in corpus order, built on access from an Arrow-backed
    `datasets.Dataset`; `rows_N` are the table rows in order (the row is the `doc_id`)."""

    def __init__(self, ds, rows_N: np.ndarray, text_field: str, label_fields: list[str]):
        self.ds, self.rows_N = ds, np.asarray(rows_N, dtype=np.int64)
        self.text_field, self.label_fields = text_field, list(label_fields)

    def __len__(self) -> int:
        return len(self.rows_N)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._docs(self.rows_N[i])
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} of a corpus of {len(self)}")
        return self._docs(self.rows_N[[i]])[0]

    def __iter__(self) -> Iterator[dict]:
        for lo in range(0, len(self), CHUNK):
            yield from self._docs(self.rows_N[lo: lo + CHUNK])

    def shard(self, rank: int, world_size: int) -> "DocumentSequence":
        """Every `world_size`-th document from position `rank`: one rank's disjoint part."""
        if not 0 <= rank < world_size:
            raise ConfigError(f"shard: expected 0 <= rank < world_size, found rank={rank}, world_size={world_size}")
        return DocumentSequence(self.ds, self.rows_N[rank::world_size], self.text_field, self.label_fields)

    def _docs(self, rows: np.ndarray) -> list[dict]:
        if len(rows) == 0:
            return []
        cols = self.ds[rows.tolist()]  # one Arrow `take` for the batch
        texts = cols[self.text_field]
        return [{"doc_id": int(r), "text": str(texts[j]),
                 "labels": {lf: cols[lf][j] for lf in self.label_fields}} for j, r in enumerate(rows)]


def open_documents(cfg: CorpusConfig | None = None) -> Sequence[dict]:
    """The corpus `load_documents(cfg)` returns, as a lazy `DocumentSequence` for .jsonl/.json/.csv/
    .parquet files and hub datasets (the packaged corpus and .txt files: the list itself)."""
    cfg = cfg or CorpusConfig()
    path = Path(cfg.name)
    if cfg.name == DEFAULT_CORPUS or (path.exists() and path.suffix.lower() == ".txt"):
        return load_documents(cfg)
    ds = _dataset(cfg, path)
    rows = _kept_rows(ds, cfg)
    if rows is None:  # a text column that is not plain strings: load_documents' str() conversion decides
        return load_documents(cfg)
    order = list(range(len(rows)))
    random.Random(cfg.shuffle_seed).shuffle(order)  # the permutation load_documents applies to its list
    rows = rows[np.asarray(order, dtype=np.int64)]
    del order
    if cfg.max_docs:
        rows = rows[: cfg.max_docs]
    return DocumentSequence(ds, rows, cfg.text_field, cfg.label_fields)


def _dataset(cfg: CorpusConfig, path: Path):
    """The Arrow-backed dataset (memory-mapped from `datasets`' cache), columns checked."""
    import datasets

    ds = local_dataset(path) if path.exists() else hub_dataset(cfg)
    where = str(path) if path.exists() else cfg.name
    for col in [cfg.text_field, *cfg.label_fields]:
        if col not in ds.column_names:
            what = "text" if col == cfg.text_field else "label"
            raise ConfigError(f"corpus {where}: no {what} column '{col}'; columns are {ds.column_names}")
    assert isinstance(ds, datasets.Dataset)
    return ds


def _kept_rows(ds, cfg: CorpusConfig) -> np.ndarray | None:
    """Rows whose text has at least `min_chars` characters (code points, like `len(str)`), computed
    in Arrow; None when the column is not a null-free string column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.data.column(cfg.text_field)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)) or col.null_count:
        return None
    lengths = pc.utf8_length(col).to_numpy()
    return np.flatnonzero(lengths >= cfg.min_chars).astype(np.int64)
