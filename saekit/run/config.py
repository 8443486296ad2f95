"""The run configs: what one YAML file asks a run to do, and `load_run_config` that reads either kind.

Why here, in the run layer: a run config names every stage (corpus, model, store, SAE, trainer,
evaluation, probing, analysis), so it may import each stage's own config; keeping it at the top
means no lower layer ever needs to know what a run is. The single-SAE run (`RunConfig`) and the
multi-SAE run (`MultiConfig`, a config with a `saes:` list) cache and read activations the same way;
they share `ActivationRunConfig` and the `RunFolder` derived from it instead of declaring them twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saekit.analysis.explain.protocol import ExplainConfig
from saekit.analysis.features import AnalyzeConfig
from saekit.config import Config, param, read_yaml_mapping
from saekit.data.corpus import CorpusConfig
from saekit.errors import ConfigError
from saekit.layout import STORE, RunFolder, safe_name
from saekit.sae.registry import make_config
from saekit.sources.base import SourceConfig
from saekit.store.writer import StoreConfig
from saekit.train.config import TrainConfig


PLACEHOLDER_D_IN = 1  # stands in for the store's d_in when the `sae:` section is checked at load time


@dataclass
class ActivationRunConfig(Config):
    """Documents, model, store and run folder of a run."""

    name: str = param("run", "run name (used for the default output folder)")
    output_dir: str = param("", "run folder; empty = runs/<name>")
    seed: int = param(0, "seed for data order and initialisation")
    corpus: CorpusConfig = param(default_factory=CorpusConfig, doc="the documents")
    source: SourceConfig = param(default_factory=SourceConfig, doc="the model and its hook points")
    store: StoreConfig = param(default_factory=StoreConfig, doc="the activation cache")

    def validate(self) -> None:
        safe_name(self.name, "run config: name")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / safe_name(self.name, "run config: name")

    @property
    def folder(self) -> RunFolder:
        """Where this run's parts live (the store honours `store.path`)."""
        return RunFolder(self.run_dir, store_path=Path(self.store.path) if self.store.path else self.run_dir / STORE)

    @property
    def store_dir(self) -> Path:
        return self.folder.store


@dataclass
class EvalConfig(Config):
    """How a trained SAE is evaluated on held-out documents."""

    holdout: float = param(0.1, "fraction of documents held out of training for evaluation", ge=0, lt=1)
    max_rows: int = param(0, "evaluate on at most this many held-out rows (0 = all)", ge=0)
    batch_rows: int = param(4096, "rows per evaluation batch", ge=1)
    description_length: bool = param(True, "compute the MDL description-length sweep")
    splice_docs: int = param(2000, "at most this many held-out documents for the splice-in LM loss (LLM runs; "
                             "0 = skip)", ge=0)
    splice_tokens: int = param(20000, "held-out tokens for the splice-in LM loss: documents are added until their "
                               "tokens reach this (a narrower loss-recovered interval)", ge=1)
    splice_batch: int = param(8, "documents per splice-in forward pass", ge=1)
    retrieval_rows: int = param(2000, "held-out rows for recall@k (embedding runs)", ge=0)
    retrieval_k: int = param(10, "k of recall@k", ge=1)
    train_rows: int = param(4096, "training rows (evenly spaced, fixed) evaluated beside the held-out ones, for the "
                                   "generalisation gap (0 = skip)", ge=0)
    gap_ratio: float = param(1.5, "warn when held-out FVU exceeds this multiple of the training FVU ...", gt=1)
    gap_abs: float = param(0.05, "... and exceeds the training FVU by more than this", ge=0)


@dataclass
class ProbeConfig(Config):
    """Sparse probing of a corpus label after training (SAE features vs neurons)."""

    label: str = param("", "document label to probe (e.g. sentiment); empty = skip probing")
    positive: str | None = param(None, "the positive class (one vs rest); None = the most frequent class")
    ks: list[int] = param([1, 2, 5, 10, 20], "numbers of features to probe with")
    max_rows: int = param(20000, "rows used (whole documents, sampled deterministically)", ge=100)
    test_frac: float = param(0.3, "fraction of documents in the probe's test split", gt=0, lt=1)
    pooling: str = param("mean", "LLM stores: one example per document by pooling its tokens' SAE codes and neurons "
                         "(mean, as SAEBench; max; last token) or 'token' (every token against its document's label)",
                         choices=["mean", "max", "last", "token"])
    one_vs_rest: bool = param(True, "also probe every class against the rest (best latent per class, macro summary)")
    resamples: int = param(1000, "bootstrap resamples (over test documents) for the accuracy intervals; 0 = none",
                           ge=0)


# keys of a run's `train:` section that the run layer consumes (with their defaults); the rest is TrainConfig's
RUN_TRAIN_KEYS = {"exclude_outliers": True}


@dataclass
class RunConfig(ActivationRunConfig):
    """One run: which text, which model and hooks, where to store, what SAE to train and how."""

    sae: dict[str, Any] = param({}, "the SAE: `architecture` plus that architecture's config fields, or "
                                    "`from: PATH` (an SAE you already have: saekit, SAELens, sparsify, "
                                    "dictionary_learning or Gemma Scope files; relative to the working "
                                    "directory; no training) with optional `force: true` (accept a "
                                    "model-name alias) and `strict: false`")
    train: dict[str, Any] = param({}, "trainer settings (see saekit.train.TrainConfig), plus the run's own "
                                      "`exclude_outliers` (default true: train without the store's "
                                      "massive-activation outlier rows)")
    eval: EvalConfig = param(default_factory=EvalConfig, doc="evaluation on held-out documents")
    analyze: dict[str, Any] = param({}, "feature-browser bundle settings (saekit.analysis.features.AnalyzeConfig)")
    probe: ProbeConfig = param(default_factory=ProbeConfig, doc="sparse probing after training")
    explain: dict[str, Any] = param({}, "feature explanations (saekit.analysis.explain.protocol.ExplainConfig)")

    def validate(self) -> None:
        super().validate()
        if self.explain:
            self.explain_config()
        if self.train:
            self.train_config()
            _ = self.exclude_outliers
        if self.analyze:
            self.analyze_config()
        if self.imports_sae:
            check_sae_from(self.sae)
        elif self.sae and "architecture" not in self.sae:
            raise ConfigError("sae: missing required key 'architecture' (e.g. topk, mp, mdl), or `from: PATH` "
                              "to use an SAE you already have")
        elif self.sae:
            check_sae_section(self.sae)

    @property
    def imports_sae(self) -> bool:
        """True when the run uses an existing SAE (`sae: {from: PATH}`) instead of training one."""
        return "from" in self.sae

    def train_config(self) -> TrainConfig:
        """The trainer's settings: the `train:` section without the run's own keys (RUN_TRAIN_KEYS)."""
        return TrainConfig.from_dict({k: v for k, v in self.train.items() if k not in RUN_TRAIN_KEYS}, where="train")

    @property
    def exclude_outliers(self) -> bool:
        """`train.exclude_outliers`: leave the store's massive-activation outlier rows out of training.

        It sits in the `train:` section because it is a training choice, but the run layer applies it
        (it picks the rows of the store's batch source); the trainer, which never sees stores, does not."""
        value = self.train.get("exclude_outliers", RUN_TRAIN_KEYS["exclude_outliers"])
        if not isinstance(value, bool):
            raise ConfigError(f"train.exclude_outliers: expected true or false, found {value!r}")
        return value

    def resolved_dict(self, redact: bool = True) -> dict:
        """`to_dict` with the run's own train keys filled in, so the run folder records the values used."""
        data = self.to_dict(redact=redact)
        if self.train:
            data["train"] = {**data["train"], "exclude_outliers": self.exclude_outliers}
        return data

    def analyze_config(self) -> AnalyzeConfig:
        return AnalyzeConfig.from_dict(self.analyze, where="analyze")

    def explain_config(self) -> ExplainConfig:
        return ExplainConfig.from_dict(self.explain, where="explain")


SAE_FROM_KEYS = {"from": str, "force": bool, "strict": bool}
"""The keys of `sae: {from: PATH}`: the SAE's own files define its architecture, so no other key is read."""


def check_sae_from(sae: dict[str, Any]) -> None:
    """`sae: {from: PATH, force: bool, strict: bool}`; architecture fields are the SAE files' business."""
    extra = sorted(set(sae) - set(SAE_FROM_KEYS))
    if extra:
        raise ConfigError(f"sae: with `from` the SAE's own files define it; expected only keys "
                          f"{sorted(SAE_FROM_KEYS)}, found {extra}")
    for key, kind in SAE_FROM_KEYS.items():
        if key in sae and not isinstance(sae[key], kind):
            raise ConfigError(f"sae.{key}: expected {kind.__name__}, found {sae[key]!r}")
    if not sae["from"]:
        raise ConfigError("sae.from: expected the path of an SAE folder or file, found an empty string")


@dataclass
class SAESpec(Config):
    """One SAE of a multi-run."""

    name: str = param(doc="folder name under <run>/train/")
    sae: dict[str, Any] = param(doc="`architecture` plus its config fields (d_in is taken from the hook)")
    hook: str = param("", "hook the SAE reads; empty = the source's only hook")
    train: dict[str, Any] = param({}, "overrides of the shared train settings for this SAE")


    def validate(self) -> None:
        safe_name(self.name, "saes[].name")
        check_sae_section(self.sae, where=f"saes[{self.name}].sae")


def check_sae_section(fields: dict[str, Any], where: str = "sae") -> None:
    """Build the architecture's config now, with a placeholder d_in (the store's is known only after
    caching), so a typo or a bad value in `sae:` fails when the config loads, not after hours of caching."""
    if "architecture" not in fields:
        raise ConfigError(f"{where}: missing required key 'architecture' (e.g. topk, mp, mdl)")
    try:
        make_config({"d_in": PLACEHOLDER_D_IN, **fields})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


@dataclass
class BufferConfig(Config):
    """The streaming shuffle buffer (one per hook)."""

    capacity_rows: int = param(65536, "rows held per hook", ge=1)
    max_gb: float = param(8.0, "refuse buffers larger than this in total (GiB), checked before allocating", gt=0)


@dataclass
class MultiConfig(ActivationRunConfig):
    """Several SAEs trained from one model pass (a run config with a `saes:` list)."""

    name: str = param("multi", "run name (default output folder runs/<name>)")
    mode: str = param("store", "store: cache once, read each batch once; stream: no disk, shuffle buffers",
                      choices=["store", "stream"])
    buffer: BufferConfig = param(default_factory=BufferConfig, doc="shuffle buffers (mode: stream)")
    train: dict[str, Any] = param({}, "trainer settings shared by every SAE (saekit.train.TrainConfig)")
    analyze: dict[str, Any] = param({}, "feature-browser bundle settings, shared by every SAE's bundle")
    saes: list[SAESpec] = param([], "the SAEs")

    def validate(self) -> None:
        super().validate()
        if not self.saes:
            raise ConfigError("multi config: expected at least one entry in `saes`, found none")
        names = [s.name for s in self.saes]
        if len(set(names)) != len(names):
            raise ConfigError(f"multi config: SAE names must be unique, found {names}")
        if self.analyze:
            self.analyze_config()

    def analyze_config(self) -> AnalyzeConfig:
        return AnalyzeConfig.from_dict(self.analyze, where="analyze")


AnyRunConfig = RunConfig | MultiConfig


def load_run_config(path: str | Path, strict: bool = True) -> AnyRunConfig:
    """The config of a YAML file or of a run folder (its resolved config.yaml): a `MultiConfig` when
    it has a `saes:` list, else a `RunConfig`."""
    path = Path(path)
    if path.is_dir():
        path = RunFolder(path).config
    if not path.exists():
        raise ConfigError(f"{path}: expected a run config YAML file (or a run folder holding config.yaml), found none")
    data = read_yaml_mapping(path, "a run config")
    kind = MultiConfig if "saes" in data else RunConfig
    return kind.from_dict(data, strict=strict)
