"""Where a run's parts live on disk: the one owner of the run-folder layout.

Why here, in the base layer: every layer that touches a run (the trainer writing `final_sae/`,
the browser build, the CLI, the dashboard) needs the same answer to "where is the store, the SAE,
the bundle?". Spelled out as string joins in each of them, the answers drifted apart (a config's
`store.path` was honoured by caching and ignored by analysis; multi-SAE runs were read as if they
were single). `RunFolder` answers once, and imports nothing above the base.

    <root>/config.yaml                 the resolved run config
    <root>/store/                      the activation cache (or the config's `store.path`)
    <root>/train/                      a single run: checkpoints, metrics.jsonl, final_sae/, summary.json,
                                       val_curve.png (training vs validation FVU), data.json (the rows
                                       trained on: outliers excluded, the rule)
    <root>/train/<name>/               a multi-SAE run: one such folder per SAE
    <root>/eval/[<name>/]              report.json, report.txt, figures
    <root>/probe/[<name>/]             probe reports
    <root>/steer/[<name>/]             saved steering results
    <root>/explanations/[<name>/]      feature explanations
    <root>/bundle/[<name>/]            the feature-browser bundle
    <root>/retrieval|compare|geometry/[<name>/]  sparse-index sweep, feature comparisons, geometry

The bracketed `<name>` level exists for multi-SAE runs only: a `RunFolder` scoped to one SAE
(`folder.for_sae(name)`) answers every per-SAE question for that SAE.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from saekit.errors import ConfigError, UnsafeNameError

CONFIG = "config.yaml"
STORE = "store"
TRAIN = "train"
FINAL_SAE = "final_sae"
EVAL = "eval"
PROBE = "probe"
STEER = "steer"
EXPLANATIONS = "explanations"
BUNDLE = "bundle"
RETRIEVAL = "retrieval"  # sparse-index Pareto sweep (saekit index)
COMPARE = "compare"      # cross-run feature comparisons, one folder per other run (saekit compare-features)
GEOMETRY = "geometry"    # layer geometry and dictionary structure (saekit geometry)
CHECKPOINTS = "checkpoints"
TRAIN_DATA = "data.json"
METRICS = "metrics.jsonl"
TRAIN_SUMMARY = "summary.json"
VAL_CURVE = "val_curve.png"

SEEDS = "seeds"  # seeds/seed-<s>/: a whole run folder per extra seed of `--seeds N` (sharing the store)
SEED_SPREAD = "spread.json"


def safe_name(name: object, what: str) -> str:
    """A run or SAE name that becomes one folder name: refused (UnsafeNameError) when it is empty,
    '.' or '..', absolute, or holds a path separator, since it would then leave or replace the folder
    it is meant to live in."""
    if not isinstance(name, str) or not name.strip():
        raise UnsafeNameError(f"{what}: expected a non-empty name (it becomes a folder name), found {name!r}")
    bad = [c for c in ("/", "\\", "\0") if c in name]
    if name in (".", "..") or bad or name != name.strip():
        raise UnsafeNameError(f"{what}: expected a plain folder name (letters, digits, '-', '_', '.'; no path "
                              f"separators, not '.' or '..', no surrounding spaces), found {name!r}")
    return name


@dataclass(frozen=True)
class RunFolder:
    """A run folder, optionally scoped to one SAE of a multi-SAE run.

    `store_path` is the config's `store.path` when the caller holds the config; when it is None the
    resolved `config.yaml` in the folder is read for it, and without one the store is `<root>/store`."""

    root: Path
    store_path: Path | None = None
    sae: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if self.sae is not None:
            safe_name(self.sae, "SAE name")
        if self.store_path is not None:
            object.__setattr__(self, "store_path", Path(self.store_path))

    # -- run-wide parts --------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def store(self) -> Path:
        """The activation cache: the config's `store.path` when set, else `<root>/store`."""
        if self.store_path is not None:
            return self.store_path
        configured = _configured_store_path(self.config)
        return Path(configured) if configured else self.root / STORE

    def train(self, name: str | None = None) -> Path:
        """`<root>/train` of a single run, `<root>/train/<name>` of one SAE of a multi-SAE run."""
        name = name or self.sae
        return self.root / TRAIN / safe_name(name, "SAE name") if name else self.root / TRAIN

    def final_sae(self, name: str | None = None) -> Path:
        return self.train(name) / FINAL_SAE

    def train_data(self, name: str | None = None) -> Path:
        """What the SAE was trained on (rows used, massive-activation outliers excluded, the rule)."""
        return self.train(name) / TRAIN_DATA

    def metrics(self, name: str | None = None) -> Path:
        """The trainer's metrics.jsonl (training and validation rows)."""
        return self.train(name) / METRICS

    def train_summary(self, name: str | None = None) -> Path:
        """What the finished training did: steps, rows, epochs, the selected checkpoint, validation."""
        return self.train(name) / TRAIN_SUMMARY

    def val_curve(self, name: str | None = None) -> Path:
        """The plot of training vs validation FVU over the steps."""
        return self.train(name) / VAL_CURVE

    # -- the SAEs of the run ----------------------------------------------------------------
    def sae_names(self) -> list[str]:
        """Names of the SAEs of a multi-SAE run (folders under train/ holding a final SAE or
        checkpoints); empty for a single run."""
        train = self.root / TRAIN
        if not train.is_dir() or (train / FINAL_SAE).exists() or (train / CHECKPOINTS).exists():
            return []
        return sorted(p.name for p in train.iterdir()
                      if p.is_dir() and ((p / FINAL_SAE).exists() or (p / CHECKPOINTS).exists()))

    @property
    def is_multi(self) -> bool:
        return bool(self.sae_names())

    def for_sae(self, name: str) -> "RunFolder":
        """This run scoped to one SAE of a multi-SAE run (per-SAE eval, probe, steer, bundle)."""
        names = self.sae_names()
        if name not in names:
            raise ConfigError(f"{self.root}: expected one of the run's SAEs {names}, found {name!r}")
        return replace(self, sae=name)

    def per_sae(self) -> list["RunFolder"]:
        """One folder per SAE: itself for a single run, one scoped folder per SAE of a multi run."""
        names = self.sae_names()
        return [replace(self, sae=n) for n in names] if names else [self]

    def require_one_sae(self) -> "RunFolder":
        """Itself when it names one SAE (a single run, or already scoped); else a ConfigError that
        lists the SAEs to choose from."""
        if self.sae is None and self.is_multi:
            raise ConfigError(f"{self.root} is a multi-SAE run with SAEs {self.sae_names()}; choose one (--sae NAME)")
        return self

    # -- per-SAE outputs --------------------------------------------------------------------
    def _per_sae(self, part: str) -> Path:
        return self.root / part / self.sae if self.sae else self.root / part

    @property
    def eval(self) -> Path:
        return self._per_sae(EVAL)

    @property
    def probe(self) -> Path:
        return self._per_sae(PROBE)

    @property
    def steer(self) -> Path:
        return self._per_sae(STEER)

    @property
    def explanations(self) -> Path:
        return self._per_sae(EXPLANATIONS)

    @property
    def bundle(self) -> Path:
        return self._per_sae(BUNDLE)

    @property
    def retrieval(self) -> Path:
        return self._per_sae(RETRIEVAL)

    @property
    def compare(self) -> Path:
        return self._per_sae(COMPARE)

    @property
    def geometry(self) -> Path:
        return self._per_sae(GEOMETRY)

    def seed_run(self, seed: int) -> Path:
        """The run folder of one extra seed of a seed sweep (`saekit run --seeds N`)."""
        return self.root / SEEDS / f"seed-{int(seed)}"

    @property
    def seed_spread(self) -> Path:
        """The seed sweep's spread report (per headline figure: per-seed values, mean, std, range)."""
        return self.root / SEEDS / SEED_SPREAD

    @property
    def label(self) -> str:
        """A readable name: the folder's, plus `/<sae>` for one SAE of a multi-SAE run."""
        return f"{self.root.name}/{self.sae}" if self.sae else self.root.name

    def looks_like_run(self) -> bool:
        return self.root.is_dir() and any((self.root / d).exists() for d in (BUNDLE, TRAIN, STORE, CONFIG))

    def require_run(self) -> "RunFolder":
        """Itself when the folder is a run; else a ConfigError saying what the path is instead (a typo,
        a store or an SAE folder given where a run is expected)."""
        if self.looks_like_run():
            return self
        raise ConfigError(f"{self.root}: expected a run folder (with {CONFIG}, {STORE}/, {TRAIN}/ or {BUNDLE}/), "
                          f"found {_what_is(self.root)}")


# Names of the files that mark other artifacts; only read to say what a wrong path is instead.
_MARKERS = {"manifest.json": "an activation store", "cache.json": "an activation store (cache root)",
            "cfg.json": "an SAE folder"}


def _what_is(path: Path) -> str:
    if not path.exists():
        return "no such folder"
    if not path.is_dir():
        return "a file"
    kind = next((what for name, what in _MARKERS.items() if (path / name).exists()), None)
    return kind or "a folder with none of them"


def _configured_store_path(config: Path) -> str:
    """`store.path` of a resolved run config ("" when absent). Only that key is read: the config's
    types belong to the run layer above, the store's location belongs here."""
    if not config.exists():
        return ""
    import yaml

    data = yaml.safe_load(config.read_text()) or {}
    store = data.get("store") if isinstance(data, dict) else None
    return str((store or {}).get("path") or "") if isinstance(store, dict) else ""
