"""The on-disk contract of an activation store, typed once for the writer and the reader.

A store folder holds `manifest.json` (a `StoreManifest`), its shards (`shard-NNNNN.safetensors`,
each listed as a `ShardEntry` with its sha256) and `docs.jsonl`; a cache root holds `cache.json`
(a `CacheIndex`), which maps hooks to store folders. The writer builds manifests only through `StoreManifest`, the
reader parses them only through `StoreManifest.from_json`, so a field added or renamed in one place
cannot silently go missing in the other: an unknown or missing key raises `CorruptArtifactError`.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypedDict

from saekit.artifacts import FORMAT_VERSION, atomic_write_json, read_json
from saekit.errors import CorruptArtifactError

MANIFEST = "manifest.json"
CACHE_INDEX = "cache.json"
DOCS = "docs.jsonl"


def hook_slug(hook: str) -> str:
    """The store folder name of a hook point (file-system safe)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", hook)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


class StoreIdentity(TypedDict):
    """What makes two caches the same: resuming or reusing a cache root requires an equal identity."""

    source: dict
    corpus_fingerprint: str
    n_docs: int
    docs_per_shard: int
    dtype: str


class CacheIndex(TypedDict):
    """`cache.json` of a cache root: its identity and, per hook, the folder of that hook's store."""

    format_version: int
    identity: StoreIdentity
    stores: dict[str, str]


def cache_index(identity: StoreIdentity, hooks: list[str]) -> CacheIndex:
    return CacheIndex(format_version=FORMAT_VERSION, identity=identity, stores={h: hook_slug(h) for h in hooks})


class ShardEntry(TypedDict):
    """One shard of a store: documents [doc_start, doc_end) of the corpus order."""

    index: int
    file: str
    rows: int
    sha256: str
    doc_start: int
    doc_end: int


@dataclass
class StoreManifest:
    """`manifest.json` of one hook's store: what was cached, from what, and which shards hold it."""

    kind: str
    hook: str
    d_in: int
    dtype: str
    source: dict
    corpus_fingerprint: str
    n_docs: int
    docs_per_shard: int
    shards: list[ShardEntry] = field(default_factory=list)
    rows: int = 0
    complete: bool = False
    format_version: int = FORMAT_VERSION
    # massive-activation outliers (saekit.store.outliers); absent in stores cached before they existed
    outlier_rule: dict | None = None  # OutlierRule.to_json(): the rule every shard's `outlier` column follows
    norm_stats: dict | None = None  # norm_statistics(): written when the store is complete
    docs_sha256: str | None = None  # sha256 of docs.jsonl; absent in stores cached before it was recorded

    @property
    def n_shards(self) -> int:
        """Shards a complete store has (one per `docs_per_shard` documents, at least one)."""
        return max(1, -(-self.n_docs // self.docs_per_shard))

    def has_shard(self, index: int) -> bool:
        return any(e["index"] == index for e in self.shards)

    def set_shards(self, entries: list[ShardEntry]) -> None:
        """Replace the shard list (kept in corpus order); rows and completeness follow from it."""
        by_index = {e["index"]: e for e in entries}
        self.shards = [by_index[i] for i in sorted(by_index)]
        self.rows = sum(e["rows"] for e in self.shards)
        self.complete = len(self.shards) == self.n_shards

    def add_shard(self, entry: ShardEntry) -> None:
        self.set_shards([*self.shards, entry])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = MANIFEST) -> "StoreManifest":
        """Parse a manifest; a missing or unknown key means another format, named in the error."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing, unknown = required - set(data), set(data) - names
        if missing or unknown:
            raise CorruptArtifactError(f"{where}: expected a store manifest with keys {sorted(names)}; "
                                       f"missing {sorted(missing)}, unknown {sorted(unknown)}")
        if data.get("format_version") != FORMAT_VERSION:
            raise CorruptArtifactError(f"{where}: expected store format version {FORMAT_VERSION}, "
                                       f"found {data.get('format_version')}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "StoreManifest":
        return cls.from_json(read_json(path), where=str(path))

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    def __getitem__(self, key: str) -> Any:
        """Read a field by its JSON name, for callers written against the plain manifest dict
        (`store.manifest["source"]`); new code reads the attributes."""
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

