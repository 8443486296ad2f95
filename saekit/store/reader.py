"""Reading an activation store: verified, memory-mapped, shuffled deterministically.

Shards are memory-mapped straight from their safetensors files (header parsed by hand, data read
in place), so opening a store costs nothing in RAM and shuffled batches gather rows from the page
cache. Every shard is checked against the manifest's sha256 when first opened (`verify=True`), so
a truncated or altered shard raises `CorruptArtifactError` naming the file instead of returning
wrong rows.

Massive-activation outliers (`saekit.store.outliers`): every shard written since they exist has
`norm` and `outlier` columns. For a shard cached before (no such columns) the reader derives both
on the fly from the stored activations with the same function and the manifest's rule (the default
one when the manifest has none), so old stores open and give exactly the mask the writer would
have written; their manifest has no `norm_stats` until `compute_norm_statistics()` is asked for
(re-running `saekit cache` on the finished store records them).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saekit.artifacts import inside, read_json, sha256_bytes, sha256_file
from saekit.errors import (ConfigError, CorruptArtifactError, HookNotFoundError, StoreMissingError,
                           UnknownNameError)
from saekit.safetensors_mmap import memmap_safetensors
from saekit.store.batches import TensorBatches, epoch_permutation
from saekit.store.manifest import CACHE_INDEX, DOCS, MANIFEST, StoreManifest
from saekit.store.outliers import OutlierRule, norm_statistics, row_norms

COLUMNS = ("acts", "doc_id", "pos", "token_id")
NORM_COLUMNS = ("norm", "outlier")  # written since outliers are flagged; derived for older shards

def _map_shard(path: Path) -> dict:
    """The shard's arrays by name, plus `name.__dtype__` -> safetensors dtype (bf16 is raw uint16)."""
    out = {}
    for name, (arr, st_dtype) in memmap_safetensors(path).items():
        out[name], out[name + ".__dtype__"] = arr, st_dtype
    return out


def _to_torch(arr: np.ndarray, st_dtype: str) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(torch.bfloat16).float() if st_dtype == "BF16" else t.float()


def _check_column(column: str, valid: tuple[str, ...]) -> None:
    if column not in valid:
        raise UnknownNameError(f"store column '{column}': expected one of {valid}")


def _raise_no_store(path: Path) -> None:
    """No manifest: a store never cached (missing or empty folder) is StoreMissingError, naming the
    command that creates it; a folder holding shards but no manifest is damaged."""
    if path.is_dir() and any(path.glob("shard-*")):
        raise CorruptArtifactError(f"{path}: expected an activation store with {MANIFEST}, found shards "
                                   f"without one (an interrupted or damaged cache)")
    found = ("no such folder" if not path.exists() else "a file" if not path.is_dir()
             else "an empty folder" if not any(path.iterdir()) else "a folder that is not a store")
    raise StoreMissingError(f"{path}: expected an activation store ({MANIFEST}), found {found}",
                            fix="saekit cache CONFIG")


class ActivationStore:
    """One hook's store. Open a cache root with `hook=` (or leave it out when there is one hook)."""

    def __init__(self, path: str | Path, hook: str | None = None, verify: bool = True):
        path = Path(path)
        if not (path / MANIFEST).exists() and (path / CACHE_INDEX).exists():
            stores = read_json(path / CACHE_INDEX)["stores"]
            if hook is None and len(stores) != 1:
                raise ConfigError(f"{path}: expected one hook's store or hook=, found stores for {sorted(stores)}")
            hook = hook or next(iter(stores))
            if hook not in stores:
                raise HookNotFoundError(f"{path}: no store for hook '{hook}'; available: {sorted(stores)}")
            path = path / stores[hook]
        if not (path / MANIFEST).exists():
            _raise_no_store(path)
        self.path = path
        self.manifest = StoreManifest.load(path / MANIFEST)
        self.verify = verify
        self.shards = self.manifest.shards
        self.offsets = np.cumsum([0] + [s["rows"] for s in self.shards])
        self._maps: dict[int, dict] = {}

    # -- metadata ------------------------------------------------------------------------
    @property
    def hook(self) -> str:
        return self.manifest.hook

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def d_in(self) -> int:
        return int(self.manifest.d_in)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.complete)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.d_in)

    @property
    def fingerprint(self) -> str:
        return f"{self.manifest.corpus_fingerprint}:{self.hook}:{len(self)}"

    # -- shards --------------------------------------------------------------------------
    def _shard(self, i: int) -> dict:
        if i not in self._maps:
            entry = self.shards[i]
            f = inside(self.path, entry["file"], str(self.path / MANIFEST))
            if not f.exists():
                raise CorruptArtifactError(f"{f}: listed in {MANIFEST} but missing")
            if self.verify and sha256_file(f) != entry["sha256"]:
                raise CorruptArtifactError(f"{f}: sha256 mismatch with {MANIFEST}; the shard was truncated or altered")
            self._maps[i] = _map_shard(f)
        return self._maps[i]

    def gather(self, column: str, rows: np.ndarray) -> Tensor:
        """Values of `column` ('acts' as float32 [n, d_in]; 'doc_id', 'pos', 'token_id' as ints [n]) at
        the given global rows, in the order given (rows may repeat; shards are read in row order)."""
        if column in NORM_COLUMNS:
            return self._norm_column(column)[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
        _check_column(column, COLUMNS + NORM_COLUMNS)
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        shard_of = np.searchsorted(self.offsets, sorted_rows, side="right") - 1
        parts = []
        for s in np.unique(shard_of):
            sel = sorted_rows[shard_of == s] - self.offsets[s]
            m = self._shard(int(s))
            parts.append(_to_torch(m[column][sel], m[column + ".__dtype__"]) if column == "acts"
                         else torch.from_numpy(np.array(m[column][sel])))
        out = torch.cat(parts) if parts else torch.zeros(0, self.d_in)
        inv = torch.from_numpy(np.argsort(order, kind="stable"))
        return out[inv]

    def __getitem__(self, idx) -> Tensor:
        """Rows by global index: an int tensor/array, or a slice."""
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        rows = np.asarray(idx.numpy() if isinstance(idx, Tensor) else idx, dtype=np.int64)
        return self.gather("acts", rows)

    def meta(self, name: str) -> Tensor:
        """A whole provenance column: 'doc_id', 'pos' or 'token_id' (small: one int per row), or
        'norm' (float32) / 'outlier' (bool)."""
        if name in NORM_COLUMNS:
            return self._norm_column(name).clone()
        _check_column(name, COLUMNS[1:] + NORM_COLUMNS)
        parts = [torch.from_numpy(np.array(self._shard(i)[name])) for i in range(len(self.shards))]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def describe_rows(self, rows) -> str:
        """'store row R: doc D, position P' for each global row, so bad values can be traced to their text."""
        rows = np.asarray(rows.numpy() if isinstance(rows, Tensor) else rows, dtype=np.int64)
        doc_N, pos_N = self.gather("doc_id", rows), self.gather("pos", rows)
        return "; ".join(f"store row {int(r)}: doc {int(d)}, position {int(p)}"
                         for r, d, p in zip(rows, doc_N, pos_N))

    def iter_chunks(self, chunk_rows: int = 65536, start: int = 0, stop: int | None = None):
        """Sequential `(row_start, acts [n, d_in])` chunks, for streaming evaluation and analysis."""
        stop = len(self) if stop is None else stop
        for lo in range(start, stop, chunk_rows):
            hi = min(stop, lo + chunk_rows)
            yield lo, self[lo:hi]

    # -- row norms and massive-activation outliers (saekit.store.outliers) -------------------
    @property
    def outlier_rule(self) -> OutlierRule:
        """The rule the store's `outlier` column follows (the default for stores cached without one)."""
        return OutlierRule.from_json(self.manifest.outlier_rule)

    @property
    def has_outlier_column(self) -> bool:
        """Whether every shard carries the written `outlier` column (False: derived on the fly)."""
        return all("outlier" in self._shard(i) for i in range(len(self.shards)))

    def _shard_norms(self, i: int) -> tuple[Tensor, Tensor]:
        """(norm float32 [n], outlier bool [n]) of shard i: its columns, or derived from its activations."""
        m = self._shard(i)
        if "norm" in m and "outlier" in m:
            return torch.from_numpy(np.array(m["norm"])).float(), torch.from_numpy(np.array(m["outlier"])).bool()
        norm = row_norms(_to_torch(np.array(m["acts"]), m["acts.__dtype__"]))
        return norm, self.outlier_rule.flag(norm)

    @cached_property
    def _norms(self) -> tuple[Tensor, Tensor]:
        parts = [self._shard_norms(i) for i in range(len(self.shards))]
        if not parts:
            return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _norm_column(self, name: str) -> Tensor:
        return self._norms[0] if name == "norm" else self._norms[1]

    def outlier_mask(self) -> Tensor:
        """bool [N]: the rows flagged as massive-activation outliers (kept in the store, marked)."""
        return self._norm_column("outlier").clone()

    def compute_norm_statistics(self) -> dict:
        """The row-norm statistics the manifest records (`norm_stats`), from the columns (or derived)."""
        norm, outlier = self._norms
        return norm_statistics(norm.numpy(), self.meta("pos").numpy(), outlier.numpy(), self.outlier_rule)

    @cached_property
    def norm_stats(self) -> dict:
        """The manifest's norm statistics, computed on the fly for a store cached without them."""
        return self.manifest.norm_stats or self.compute_norm_statistics()

    def outlier_threshold(self) -> float:
        """The norm above which a row counts as an outlier where no shard applies (splice-in, live
        pages): the rule's multiple x the store's median row norm."""
        return float(self.norm_stats["outlier_threshold_norm"])

    @cached_property
    def docs(self) -> dict[int, dict]:
        """doc_id -> {'text', 'labels'} for every document of the corpus slice, checked against the
        manifest's sha256 of docs.jsonl (stores cached before it was recorded have none)."""
        f = self.path / DOCS
        if not f.is_file():
            raise CorruptArtifactError(f"{f}: missing; the store lists its documents there")
        data = f.read_bytes()
        want = self.manifest.docs_sha256
        if self.verify and want is not None and sha256_bytes(data) != want:
            raise CorruptArtifactError(f"{f}: sha256 mismatch with {MANIFEST} (expected {want[:12]}…, found "
                                       f"{sha256_bytes(data)[:12]}…); the file was truncated or altered")
        return _parse_docs(f, data)

    # -- splits and batches ----------------------------------------------------------------
    def split_by_document(self, holdout: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
        """(train_rows, heldout_rows): whole documents go to one side, chosen deterministically."""
        doc_ids = self.meta("doc_id")
        uniq = torch.unique(doc_ids)
        perm = uniq[epoch_permutation(len(uniq), seed, -1)]
        held = perm[: max(1, int(round(holdout * len(uniq))))] if holdout > 0 else perm[:0]
        is_held = torch.isin(doc_ids, held)
        return (~is_held).nonzero().squeeze(1), is_held.nonzero().squeeze(1)

    def batches(self, batch_size: int, seed: int = 0, rows: Tensor | None = None,
                rank: int = 0, world_size: int = 1) -> TensorBatches:
        """Endless shuffled batches (a trainer BatchSource) over all rows or a subset."""
        view = self if rows is None else RowSubset(self, rows)
        return TensorBatches(view, batch_size, seed=seed, rank=rank, world_size=world_size)


def _parse_docs(f: Path, data: bytes) -> dict[int, dict]:
    """docs.jsonl's records by doc_id; a damaged line is named (file and line), never a raw decode error."""
    out = {}
    for n, line in enumerate(data.splitlines(), start=1):
        try:
            d = json.loads(line)
            out[int(d["doc_id"])] = d
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptArtifactError(f"{f}: line {n} is not a document record "
                                       f"(expected JSON with a doc_id): {e}") from e
    return out


class RowSubset:
    """A view of some rows of a store that indexes like a tensor."""

    def __init__(self, store: ActivationStore, rows: Tensor):
        self.store, self.rows = store, rows.to(torch.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.store.d_in)

    def __getitem__(self, idx) -> Tensor:
        return self.store[self.rows[idx]]

    def describe_rows(self, rows) -> str:
        """The store's description of the subset's rows (global store rows, doc and position)."""
        return self.store.describe_rows(self.rows[torch.as_tensor(rows, dtype=torch.int64)])

