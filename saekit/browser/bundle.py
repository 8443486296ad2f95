"""Reading a browser bundle: verified once, then one feature page's data by a seek and one JSON line.

A bundle (`RUN/bundle/`) is read-only and self-describing:

    saekit_manifest.json        format version, sha256 of every file, run facts (kind, rows, model...)
    features.parquet            one row per feature: the list page's table (stats + search text)
    features.jsonl              one JSON record per feature: everything its page shows
    features.offsets.safetensors  byte offset of every record (so a page reads one line, not the file)
    index/part-NNNNN.safetensors  the sparse latent index: indices [n, k] int32, values [n, k] float16

Reading needs numpy, pandas and safetensors only: the app never loads a model to show a feature
page. Any missing, altered or unreadable file raises `BundleError` naming it, which the app turns
into a message.

The types below are the bundle's contract: `browser/build.py` writes a `FeatureRecord` per feature,
a `FeatureRow` per table row and a `BundleManifest`; the app's pages read them by these names.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, TypedDict

import numpy as np

from saekit.artifacts import FORMAT_VERSION, MANIFEST, inside, read_json, sha256_file
from saekit.errors import CorruptArtifactError
from saekit.layout import BUNDLE
from saekit.safetensors_mmap import memmap_safetensors as _memmap

BUNDLE_DIR = BUNDLE  # the run folder's bundle sub-folder (saekit.layout owns the name)
FEATURES_TABLE = "features.parquet"
RECORDS = "features.jsonl"
OFFSETS = "features.offsets.safetensors"
INDEX_DIR = "index"
PROBE_FILE = "probe.json"  # the run's probe report, summarised: per class the best latents and their accuracy
EXPLANATIONS_TABLE = "explanations.parquet"  # `saekit explain`: one row per feature (explanation, scores, ledger)
EXPLANATION_COLUMNS = ("explanation", "score_detection", "score_fuzzing", "score_embedding")  # merged into `table`
N_PROBE_EXAMPLES = 3
BUNDLE_FORMAT = 1


class Example(TypedDict, total=False):
    """One example of a feature: always row, doc, act, labels; an LLM example adds its token window
    (`tokens`, the feature's `acts` on them, `center` = the example's position in the window, `pos`
    in its document); an embedding example adds the document `text`."""

    row: int
    doc: int
    act: float
    labels: dict[str, Any]
    text: str
    pos: int
    tokens: list[str]
    acts: list[float]
    center: int
    outlier: bool  # the row is a massive-activation outlier of the store (saekit.store.outliers)


class Interval(TypedDict):
    """Examples sampled from one activation interval `[lo, hi)` of `[0, max]`."""

    interval: int
    lo: float
    hi: float
    examples: list[Example]


class Histogram(TypedDict):
    max: float
    counts: list[int]  # equal-width bins of [0, max]


class LogitLens(TypedDict):
    promoted: list[tuple[str, float]]  # (token text, logit), strongest first; empty when not computed
    suppressed: list[tuple[str, float]]


class Family(TypedDict):
    parent: Optional[int]  # the denser feature whose firings contain this one's, or None
    p_parent: float  # P(parent fires | this fires)
    children: list[tuple[int, float]]  # (child, P(this fires | child fires))


class FeatureRecord(TypedDict):
    """Everything one feature page shows (one line of `features.jsonl`)."""

    feature: int
    count: int
    density: float
    mean: float
    max: float
    hist: Histogram
    top: list[Example]
    quantiles: list[Interval]  # only intervals with examples
    neighbours: list[tuple[int, float]]  # (feature, decoder cosine)
    cooccur: list[tuple[int, int, float]]  # (feature, firings together, P(other | this))
    logit_lens: LogitLens
    labels: dict[str, dict[str, int]]  # label key -> value -> count among the top examples
    family: Family
    outlier_examples: int  # top examples whose row is a massive-activation outlier
    mostly_outliers: bool  # more than half of the top examples are outliers (absent in older bundles)
    level: int  # prefix level of a nested (matryoshka) SAE's latent, 0 = most general; -1 not nested (absent in older bundles)
    refined_by: list[tuple[int, float, float]]  # (later-level latent, decoder cosine, P(this | it)); nested SAEs only


class FeatureRow(TypedDict):
    """One row of the list table (`features.parquet`): stats plus the search text."""

    feature: int
    count: int
    density: float
    mean: float
    max: float
    dead: bool
    parent: int  # -1 when none
    children: int
    mostly_outliers: bool  # its top examples are mostly massive-activation outliers (absent in older bundles)
    level: int  # prefix level (matryoshka), -1 when the SAE is not nested (absent in older bundles)
    top_tokens: str
    top_text: str
    top_labels: str
    promoted: str


FEATURE_COLUMNS = tuple(FeatureRow.__annotations__)


class SAEFacts(TypedDict):
    architecture: str
    k: Optional[int]
    origin: str  # "saekit", or the format the SAE was read from (saelens, sparsify, dictionary_learning, gemmascope)


class BundleManifest(TypedDict):
    """`saekit_manifest.json` of a bundle: file checksums plus the facts the app shows. `saekit explain`
    adds an `explanations` key later (its summary: backend, judge, explained, skipped, scores, ledger)."""

    format_version: int
    files: dict[str, str]  # relative name -> sha256
    bundle_format: int
    kind: str  # source kind: hf, lens or embedding
    run: str
    hook: str
    model: Optional[str]
    source: dict[str, Any]  # the store's source spec
    d_in: int
    d_sae: int
    n_rows: int
    n_docs: int
    index_parts: list[dict[str, Any]]
    sae: SAEFacts
    analyze: dict[str, Any]
    cooccurrence_exact: bool
    has_logit_lens: bool
    has_token_text: bool
    dead: int
    build_seconds: float
    store_format_version: int
    eval_report: bool
    probe: bool  # the bundle holds PROBE_FILE
    outliers: dict[str, Any]  # rule, store_outliers, median_norm, threshold_norm, excluded_in_training, ...
    preflight: Optional[dict[str, Any]]  # the SAE-vs-store check the run layer made before building (None: none)


class BundleError(CorruptArtifactError):
    """A bundle is missing, incomplete, altered or of an unknown format; the message says how to fix it."""


def _best(entry: dict) -> dict:
    """A k=1 winner, trimmed for the browser: feature, sign, accuracy, its interval, a few examples."""
    return {"feature": entry["feature"], "sign": entry.get("sign"), "accuracy": entry["accuracy"],
            "ci95": (entry.get("ci95") or {}).get("accuracy"),
            "top_examples": [{k: ex.get(k) for k in ("doc_id", "activation", "label", "text", "token")}
                             for ex in entry.get("top_examples", [])[:N_PROBE_EXAMPLES]]}


def probe_summary(report: dict) -> dict:
    """The bundle's `probe` section from a probe report: per class (one vs rest, or the report's positive
    class alone) the best single latent and neuron with accuracy and interval, plus the unit and pooling."""
    classes = {}
    for c, e in (report.get("per_class") or {}).items():
        if "best" in e:
            classes[str(c)] = {"count": e["count"], "majority_baseline": e["majority_baseline"],
                               "best": {fs: _best(b) for fs, b in e["best"].items()}}
    if not classes:
        first = (report.get("methods") or ["mean_diff"])[0]
        classes[str(report["positive"])] = {
            "count": (report.get("classes") or {}).get(str(report["positive"])),
            "majority_baseline": report["majority_baseline"],
            "best": {fs: _best(by_m[first]) for fs, by_m in report.get("winners", {}).items() if first in by_m}}
    return {"label": report.get("label"), "unit": report.get("unit", "token"), "pooling": report.get("pooling", "token"),
            "positive": report.get("positive"), "majority_baseline": report.get("majority_baseline"),
            "n_test_docs": report.get("n_test_docs"), "classes": classes, "macro": report.get("macro")}


def bundle_path(run_or_bundle: str | Path) -> Path:
    """The bundle folder of a run folder (or the folder itself when it is a bundle)."""
    p = Path(run_or_bundle)
    return p if (p / MANIFEST).exists() and (p / RECORDS).exists() else p / BUNDLE_DIR


class Bundle:
    """A verified, read-only view of one bundle."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = bundle_path(path)
        if not (self.path / MANIFEST).exists():
            raise BundleError(f"{self.path}: no browser bundle here (no {MANIFEST}); "
                              f"build it with `saekit analyze {self.path.parent}`")
        self.manifest: BundleManifest = read_json(self.path / MANIFEST)
        found = self.manifest.get("bundle_format")
        if found != BUNDLE_FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{self.path}: expected bundle format {BUNDLE_FORMAT}, found {found}; "
                              f"rebuild it with `saekit analyze {self.path.parent}`")
        if verify:
            self.verify()
        self.offsets = self._load_offsets()

    def verify(self) -> None:
        """Check every file against the manifest's sha256; raise naming the first damaged one."""
        for name, digest in self.manifest.get("files", {}).items():
            f = inside(self.path, name, str(self.path / MANIFEST))
            if not f.exists():
                raise BundleError(f"{f}: listed in the bundle manifest but missing; rebuild with `saekit analyze`")
            if sha256_file(f) != digest:
                raise BundleError(f"{f}: sha256 mismatch with the bundle manifest (truncated or altered); "
                                  f"rebuild with `saekit analyze {self.path.parent}`")

    def _load_offsets(self) -> np.ndarray:
        from safetensors.numpy import load_file

        try:
            off = load_file(str(self.path / OFFSETS))["offsets"]
        except Exception as e:  # safetensors raises several types for damaged files
            raise BundleError(f"{self.path / OFFSETS}: unreadable ({e})") from e
        if len(off) != self.d_sae + 1:
            raise BundleError(f"{self.path / OFFSETS}: expected {self.d_sae + 1} offsets, found {len(off)}")
        return off

    # -- facts ---------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def is_llm(self) -> bool:
        return self.kind != "embedding"

    @property
    def d_sae(self) -> int:
        return int(self.manifest["d_sae"])

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @cached_property
    def probe(self) -> dict | None:
        """The `probe` section (per class the best latents and their accuracy), None when the run had no probe."""
        p = self.path / PROBE_FILE
        return read_json(p) if p.exists() else None

    # -- tables ----------------------------------------------------------------------------------
    @cached_property
    def table(self):
        """The feature list (pandas DataFrame, one row per feature), with the explanation columns
        (`EXPLANATION_COLUMNS`) when `saekit explain` has run."""
        import pandas as pd

        try:
            df = pd.read_parquet(self.path / FEATURES_TABLE)
        except Exception as e:
            raise BundleError(f"{self.path / FEATURES_TABLE}: unreadable ({e})") from e
        ex = self.explanations
        if ex is None:
            return df
        return df.merge(ex[["feature", *[c for c in EXPLANATION_COLUMNS if c in ex]]], on="feature", how="left")

    @cached_property
    def explanations(self):
        """`saekit explain`'s table (feature, explanation, skipped, score_*, ledger columns), None before."""
        import pandas as pd

        p = self.path / EXPLANATIONS_TABLE
        if not p.exists():
            return None
        try:
            return pd.read_parquet(p)
        except Exception as e:
            raise BundleError(f"{p}: unreadable ({e})") from e

    def explanation(self, f: int) -> dict | None:
        """Feature f's explanation row (explanation or skipped reason, scores, ledger), None when none."""
        ex = self.explanations
        if ex is None:
            return None
        hit = ex[ex["feature"] == int(f)]
        return None if hit.empty else {k: (None if v != v else v) for k, v in hit.iloc[0].to_dict().items()}

    def iter_records(self, features=None):
        """Feature records one at a time (features.jsonl read line by line, or by seek for `features`),
        so a pass over every feature holds one record in memory."""
        if features is not None:
            for f in features:
                yield self.feature(int(f))
            return
        with open(self.path / RECORDS, "rb") as fh:
            for f, line in enumerate(fh):
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise BundleError(f"{self.path / RECORDS}: record of feature {f} is unreadable ({e})") from e
                yield rec

    def feature(self, f: int) -> FeatureRecord:
        """Everything one feature page shows: one seek and one JSON line."""
        if not 0 <= int(f) < self.d_sae:
            raise IndexError(f"feature {f} out of range: expected 0 <= f < {self.d_sae}")
        lo, hi = int(self.offsets[f]), int(self.offsets[f + 1])
        with open(self.path / RECORDS, "rb") as fh:
            fh.seek(lo)
            raw = fh.read(hi - lo)
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{self.path / RECORDS}: record of feature {f} is unreadable ({e})") from e
        if rec.get("feature") != int(f):
            raise BundleError(f"{self.path / RECORDS}: expected the record of feature {f}, found {rec.get('feature')}")
        return rec

    @cached_property
    def index(self) -> "LatentIndex":
        return LatentIndex(self.path / INDEX_DIR, self.manifest["index_parts"])


class LatentIndex:
    """The sparse latent index: per store row, the active features and their values (memory-mapped)."""

    def __init__(self, folder: Path, parts: list[dict]):
        self.folder, self.parts = Path(folder), parts
        self.starts = np.array([p["row_start"] for p in parts] + [sum(p["rows"] for p in parts)], dtype=np.int64)
        self._maps: dict[int, dict] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _part(self, i: int) -> dict:
        if i not in self._maps:
            self._maps[i] = memmap_safetensors(inside(self.folder, self.parts[i]["file"], "the bundle's index_parts"))
        return self._maps[i]

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices [m, k] int32, values [m, k] float16) of the given global rows (padded to the widest part)."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        width = max((self._part(int(p))["indices"].shape[1] for p in np.unique(part_of)), default=1)
        idx = np.zeros((len(rows), width), dtype=np.int32)
        val = np.zeros((len(rows), width), dtype=np.float16)
        for p in np.unique(part_of):
            m = part_of == p
            t = self._part(int(p))
            local = rows[m] - self.starts[p]
            w = t["indices"].shape[1]
            idx[m, :w], val[m, :w] = t["indices"][local], t["values"][local]
        return idx, val


def memmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Map the tensors of a bundle part without reading them (pages come in on demand)."""
    return {name: arr for name, (arr, _) in _memmap(path, error=BundleError).items()}

