"""Writing an activation store: sharded safetensors + manifest.json, resumable and atomic.

Layout of a cache folder (one store per hook, so each store is self-contained):

    <root>/cache.json                      hooks -> store folders, the source spec, the corpus fingerprint
    <root>/<hook>/manifest.json            format version, source spec, corpus fingerprint, rows, shards + sha256
    <root>/<hook>/shard-00000.safetensors  acts [n, d_in], doc_id [n], pos [n], token_id [n],
                                           norm [n] (float32), outlier [n] (uint8; saekit.store.outliers)
    <root>/<hook>/docs.jsonl               doc_id, text, labels of every document in the corpus slice

Shard s always holds documents [s·docs_per_shard, (s+1)·docs_per_shard) of the corpus order, so a
job killed at any point and run again redoes at most the unfinished shard and ends with exactly
the rows an uninterrupted run writes. A shard file is renamed into place before the manifest that
lists it; the manifest is rewritten (atomically) after every shard and marked complete at the end.
Every row is kept; massive-activation outliers are flagged in each shard's `outlier` column by the
manifest's `outlier_rule`, and a complete store's manifest records its row-norm statistics
(`norm_stats`: quantiles per position bucket, outlier counts and share).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from saekit.artifacts import (
    atomic_write_chunks,
    atomic_write_json,
    clean_stale_tmp,
    read_json,
    save_tensors,
)
from saekit.config import Config, param
from saekit.data.corpus import fingerprint
from saekit.errors import EmptyDataError, StoreExistsError
from saekit.sources.base import ActivationBatch, ActivationSource
from saekit.store.manifest import (
    CACHE_INDEX,
    DOCS,
    MANIFEST,
    ShardEntry,
    StoreIdentity,
    StoreManifest,
    cache_index,
    hook_slug,
    shard_name,
)
from saekit.store.outliers import DEFAULT_MULTIPLE, OutlierRule, describe_statistics, row_norms

log = logging.getLogger(__name__)


@dataclass
class StoreConfig(Config):
    """Where and how activations are stored."""

    path: str = param("", "cache folder (one store per hook inside); empty = <run folder>/store")
    docs_per_shard: int = param(256, "documents per shard (the unit of resume)", ge=1)
    dtype: str = param("float32", "dtype of stored activations", choices=["float32", "bfloat16", "float16"])
    overwrite: bool = param(False, "replace an existing store made from a different source or corpus")
    sort_by_length: bool = param(True, "order documents by length inside a shard (less padding, same rows)")
    outlier_multiple: float = param(DEFAULT_MULTIPLE, "flag rows whose norm exceeds this multiple of their shard's "
                                    "median row norm as massive-activation outliers (kept, marked in the "
                                    "`outlier` column); fixed when a store is created", gt=1)


def _identity(spec: dict, corpus_fp: str, n_docs: int, cfg: StoreConfig) -> StoreIdentity:
    return StoreIdentity(source=spec, corpus_fingerprint=corpus_fp, n_docs=n_docs,
                         docs_per_shard=cfg.docs_per_shard, dtype=cfg.dtype)


# What a store made before a source-spec key existed was made with (so those stores resume unchanged).
SPEC_DEFAULTS = {"forward_dtype": "float32"}


def identity_differences(stored: dict | None, wanted: StoreIdentity) -> list[str]:
    """'key: expected <the store's>, found <this job's>' for every identity field (source spec keys as
    `source.<key>`) that differs; empty when the job may resume or reuse the store. A source spec
    key missing from an older store counts as its SPEC_DEFAULTS value."""
    if not isinstance(stored, dict):
        return [f"identity: expected a mapping in {CACHE_INDEX}, found {json.dumps(stored)[:80]}"]
    old, new = _flat_identity(stored), _flat_identity(dict(wanted))
    return [f"{k}: expected {json.dumps(old.get(k))[:120]} (the store's), found {json.dumps(new.get(k))[:120]} "
            "(this job's)" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _flat_identity(identity: dict) -> dict:
    source = identity.get("source")
    source = {**SPEC_DEFAULTS, **source} if isinstance(source, dict) else {"": source}
    return {**{f"source.{k}": v for k, v in source.items()}, **{k: v for k, v in identity.items() if k != "source"}}


def _prepare(root: Path, spec: dict, docs: list[dict], cfg: StoreConfig, manifest_name: str,
             clean: bool = True) -> dict[str, StoreManifest]:
    """Create or reopen the per-hook stores; refuse to mix with a store made differently.

    `clean=False` leaves `.tmp` files alone: with several ranks writing into one folder, another
    rank's in-flight shard looks exactly like a killed write's leftover."""
    if not docs:
        raise EmptyDataError(f"{root}: the corpus yielded 0 documents; expected at least one to cache "
                             f"(check the corpus section: name, split, filters, max_docs)")
    identity = _identity(spec, fingerprint(docs), len(docs), cfg)
    index_path = root / CACHE_INDEX
    if index_path.exists():
        old = read_json(index_path)
        differ = identity_differences(old.get("identity"), identity)
        if differ:
            if not cfg.overwrite:
                raise StoreExistsError(
                    f"{root} already holds a store made from a different source or corpus: {'; '.join(differ)}; "
                    "choose another path or set store.overwrite")
            import shutil

            shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    if not index_path.exists():
        atomic_write_json(index_path, cache_index(identity, spec["hooks"]))
    manifests = {}
    for h in spec["hooks"]:
        folder = root / hook_slug(h)
        folder.mkdir(exist_ok=True)
        if clean:
            clean_stale_tmp(folder)
        mpath = folder / manifest_name
        if mpath.exists():
            manifests[h] = StoreManifest.load(mpath)
            _keep_rule(manifests[h], cfg)
        else:
            docs_sha256 = atomic_write_chunks(folder / DOCS, _docs_jsonl(docs))
            manifests[h] = StoreManifest(kind=spec["kind"], hook=h, d_in=spec["d_in"][h], dtype=cfg.dtype, source=spec,
                                         corpus_fingerprint=identity["corpus_fingerprint"], n_docs=len(docs),
                                         docs_per_shard=cfg.docs_per_shard,
                                         outlier_rule=OutlierRule(cfg.outlier_multiple).to_json(),
                                         docs_sha256=docs_sha256)
    return manifests


def _docs_jsonl(docs, chunk: int = 1024) -> Iterator[bytes]:
    """docs.jsonl in pieces of `chunk` documents: a streamed corpus (saekit.data.streaming) is never
    held as one string."""
    batch = []
    for d in docs:
        batch.append(json.dumps(d, default=str) + "\n")
        if len(batch) == chunk:
            yield "".join(batch).encode()
            batch = []
    if batch:
        yield "".join(batch).encode()


def _keep_rule(m: StoreManifest, cfg: StoreConfig) -> None:
    """A store keeps the outlier rule it was created with (its shards already follow it); a store
    cached before the rule existed takes the configured one for the shards still to write."""
    if m.outlier_rule is None:
        m.outlier_rule = OutlierRule(cfg.outlier_multiple).to_json()
    elif float(m.outlier_rule["multiple"]) != cfg.outlier_multiple:
        log.warning("%s keeps its outlier rule (multiple %s); store.outlier_multiple=%s applies to new stores only",
                    m.hook, m.outlier_rule["multiple"], cfg.outlier_multiple)


def _write_shard(folder: Path, index: int, batches: list[ActivationBatch], hook: str, dtype: torch.dtype,
                 doc_range: tuple[int, int], rule: OutlierRule | None = None) -> ShardEntry:
    acts = torch.cat([b.acts[hook] for b in batches]) if batches else torch.zeros(0, 0)
    cols = {"acts": acts.to(dtype)}
    for name in ("doc_id", "pos", "token_id"):
        cols[name] = torch.cat([getattr(b, name) for b in batches]) if batches else torch.zeros(0)
    # norms of the values as stored (after the dtype cast), so a reader deriving them gets the same
    cols["norm"] = row_norms(cols["acts"].float())
    cols["outlier"] = (rule or OutlierRule()).flag(cols["norm"]).to(torch.uint8)
    sha = save_tensors(folder / shard_name(index), cols)
    return ShardEntry(index=index, file=shard_name(index), rows=int(acts.shape[0]), sha256=sha,
                      doc_start=doc_range[0], doc_end=doc_range[1])


def _finish(folder: Path, m: StoreManifest, manifest_name: str) -> None:
    """Record the row-norm statistics of a complete store in its manifest (once). A rank's partial
    manifest is never complete; `merge_manifests` finishes the merged one."""
    if not m.complete or m.norm_stats is not None or manifest_name != MANIFEST:
        return
    from saekit.store.reader import ActivationStore

    m.save(folder / manifest_name)  # the reader reads the rule from the manifest on disk
    m.norm_stats = ActivationStore(folder, verify=False).compute_norm_statistics()
    m.save(folder / manifest_name)
    log.info("store %s: %s", m.hook, describe_statistics(m.norm_stats))


def cache_activations(source: ActivationSource, docs: Sequence[dict], root: str | Path, cfg: StoreConfig | None = None,
                      shard_range: range | None = None, stop_after_shards: int | None = None,
                      manifest_name: str = MANIFEST) -> dict[str, Path]:
    """Fill (or finish) the stores under `root`; returns hook -> store folder.

    `shard_range` restricts the job to some shards (distributed caching gives each rank its own);
    `stop_after_shards` ends early (used by tests to simulate an interruption); `manifest_name` lets
    each rank keep its own partial manifest (merged by `merge_manifests`).
    """
    cfg, root = cfg or StoreConfig(), Path(root)
    spec = source.spec()
    manifests = _prepare(root, spec, docs, cfg, manifest_name, clean=manifest_name == MANIFEST)
    n_shards = max(1, -(-len(docs) // cfg.docs_per_shard))
    todo = [s for s in (shard_range or range(n_shards)) if not all(m.has_shard(s) for m in manifests.values())]
    dtype = getattr(torch, cfg.dtype)
    bar = tqdm(total=len(todo), desc="caching", unit="shard", dynamic_ncols=True)
    tokens, t0 = 0, time.perf_counter()
    for n_done, s in enumerate(todo):
        lo, hi = s * cfg.docs_per_shard, min(len(docs), (s + 1) * cfg.docs_per_shard)
        shard_docs = docs[lo:hi]
        if cfg.sort_by_length:
            shard_docs = sorted(shard_docs, key=lambda d: len(d["text"]))
        batches = list(source.iter_batches(shard_docs))
        for h, m in manifests.items():
            m.add_shard(_write_shard(root / hook_slug(h), s, batches, h, dtype, (lo, hi),
                                     OutlierRule.from_json(m.outlier_rule)))
            m.save(root / hook_slug(h) / manifest_name)
        tokens += sum(b.n for b in batches)
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        if stop_after_shards is not None and n_done + 1 >= stop_after_shards:
            break
    bar.close()
    for h, m in manifests.items():
        _finish(root / hook_slug(h), m, manifest_name)
    return {h: root / hook_slug(h) for h in manifests}


def prepare_store(source: ActivationSource, docs: Sequence[dict], root: str | Path, cfg: StoreConfig | None = None) -> None:
    """Create (or check, or with `overwrite` replace) the cache index and hook folders, and clear
    leftovers of killed writes. Distributed caching runs this on rank 0 before the other ranks
    start, so no rank removes or rewrites what another is writing."""
    _prepare(Path(root), source.spec(), docs, cfg or StoreConfig(), MANIFEST, clean=True)


def merge_manifests(root: str | Path) -> None:
    """Re-read every shard listed by per-rank partial manifests into one manifest per hook.

    Used after distributed caching, where each rank wrote `manifest.rank-R.json`.
    """
    root = Path(root)
    index = read_json(root / CACHE_INDEX)
    for h, slug in index["stores"].items():
        folder = root / slug
        parts = [StoreManifest.load(p) for p in sorted(folder.glob("manifest.rank-*.json"))]
        if not parts:
            continue
        merged = parts[0]
        merged.set_shards([e for p in parts for e in p.shards])
        merged.norm_stats = None  # a rank's partial statistics are not the store's
        merged.save(folder / MANIFEST)
        _finish(folder, merged, MANIFEST)
