"""The explain/score protocol: what an explainer reads, what it returns, what a judge answers.

Why records, not the code matrix: a feature's explanation needs only its activating contexts (top
examples plus samples across its activation intervals, as delphi samples them), which the browser
bundle already holds per feature. Working from one record at a time keeps memory flat in the number
of latents; the caller streams the records (`saekit.browser.bundle.Bundle.iter_records`).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Iterable, Protocol

from saekit.config import Config, param


@dataclass
class ExplainConfig(Config):
    """How features are explained and scored (the `explain:` section of a run config)."""

    backend: str = param("ngram", "explainer backend", choices=["ngram", "openai", "local"])
    judge: str = param("keyword", "judge of the detection/fuzzing scorers (keyword: offline, deterministic; "
                                  "or the explainer's chat backend)", choices=["keyword", "openai", "local"])
    min_examples: int = param(3, "activating examples a feature needs to be explained (fewer: listed as skipped)", ge=1)
    n_explain: int = param(20, "activating examples shown to the explainer, sampled across intervals", ge=1)
    n_score: int = param(10, "activating and as many non-activating examples per scorer", ge=1)
    max_terms: int = param(3, "n-grams named in an ngram explanation", ge=1)
    background: int = param(400, "feature records sampled for the ngram background", ge=1)
    scorers: list[str] = param(["detection", "fuzzing"], "scorers run on every explained feature")
    embedding_features: int = param(200, "features also scored by the embedding scorer (0: none)", ge=0)
    model: str = param("", "chat model name (openai) or local model (local; empty = the embedded SmolLM2)")
    base_url: str = param("https://api.openai.com/v1", "OpenAI-compatible endpoint")
    api_key_env: str = param("OPENAI_API_KEY", "environment variable holding the API key (never written to disk)")
    requests_per_minute: float = param(60.0, "rate limit of the chat endpoint", gt=0)
    concurrency: int = param(4, "requests in flight at once", ge=1)
    retries: int = param(5, "retries on 429 / 5xx / timeouts, with exponential backoff", ge=0)
    timeout_s: float = param(60.0, "seconds before a request is abandoned (then retried)", gt=0)
    backoff_s: float = param(1.0, "first backoff; doubles per retry (a Retry-After header wins)", ge=0)
    max_tokens: int = param(120, "response tokens per chat request", ge=1)
    price_prompt_per_mtok: float | None = param(None, "price per million prompt tokens (cost in the ledger)")
    price_completion_per_mtok: float | None = param(None, "price per million completion tokens")
    seed: int = param(0, "seed of example sampling")


@dataclass
class Context:
    """One example of a feature: LLM examples carry their token window and the feature's activation on
    each token (`center` is the example's token); embedding examples a document `text`."""

    act: float
    row: int = -1
    tokens: list[str] = field(default_factory=list)
    acts: list[float] = field(default_factory=list)
    center: int = -1
    text: str = ""
    labels: dict = field(default_factory=dict)
    interval: int = -1  # -1: a top example, else the activation interval it was sampled from

    @property
    def is_tokens(self) -> bool:
        return bool(self.tokens)

    def plain(self) -> str:
        """The example as text (BPE pieces carry their spaces; word tokens get them added)."""
        if not self.tokens:
            return self.text
        return "".join(self.tokens) if any(t[:1].isspace() for t in self.tokens) else " ".join(self.tokens)

    def highlighted(self, marks: list[bool] | None = None) -> str:
        """The text with the marked tokens (default: those the feature fires on) as <<token>>."""
        if not self.tokens:
            return f"<<{self.text}>>"
        marks = marks if marks is not None else [a > 0 for a in self.acts]
        spaced = any(t[:1].isspace() for t in self.tokens)
        parts = [f"{t[:len(t) - len(t.lstrip())]}<<{t.lstrip()}>>" if m else t for t, m in zip(self.tokens, marks)]
        return "".join(parts) if spaced else " ".join(parts)


@dataclass
class FeatureExamples:
    """A feature's examples as the explainer sees them."""

    feature: int
    count: int
    examples: list[Context]
    neighbours: list[int] = field(default_factory=list)


def context_from_example(ex: dict, interval: int = -1) -> Context:
    """A bundle `Example` record (saekit.browser.bundle) as a Context."""
    return Context(act=float(ex.get("act", 0.0)), row=int(ex.get("row", -1)), tokens=list(ex.get("tokens") or []),
                   acts=[float(a) for a in ex.get("acts") or []], center=int(ex.get("center", -1)),
                   text=ex.get("text", "") or "", labels=dict(ex.get("labels") or {}), interval=interval)


def from_record(rec: dict) -> FeatureExamples:
    """A bundle `FeatureRecord` (one line of features.jsonl) as FeatureExamples: top examples, then
    the interval samples."""
    examples = [context_from_example(x) for x in rec.get("top", [])]
    for q in rec.get("quantiles", []):
        examples += [context_from_example(x, int(q["interval"])) for x in q["examples"]]
    return FeatureExamples(feature=int(rec["feature"]), count=int(rec.get("count", 0)), examples=examples,
                           neighbours=[int(n[0]) for n in rec.get("neighbours", [])])


def sample_across_intervals(examples: list[Context], n: int, seed: int) -> list[Context]:
    """Up to `n` distinct examples, spread over the activation intervals as delphi does: round-robin
    over the groups (top examples first, then the intervals from the highest down), random within a group.

    Why not the top n: explanations from top activations alone describe the extreme case and miss
    what the weaker firings share (Bills et al. 2023; delphi's `quantiles` sampler)."""
    rng = random.Random(seed)
    groups: dict[int, list[Context]] = {}
    seen = set()
    for ex in examples:
        key = (ex.row, ex.text if ex.row < 0 else "")
        if key not in seen:
            seen.add(key)
            groups.setdefault(ex.interval, []).append(ex)
    order = sorted(groups, key=lambda q: (q >= 0, -q))
    for q in order:
        if q >= 0:
            rng.shuffle(groups[q])
    out: list[Context] = []
    while len(out) < n and any(groups[q] for q in order):
        for q in order:
            if groups[q] and len(out) < n:
                out.append(groups[q].pop(0))
    return out


@dataclass
class Usage:
    """What one explanation or score cost: requests, tokens, seconds, and money when priced."""

    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def add(self, other: "Usage") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def cost(self, cfg: ExplainConfig) -> float | None:
        if cfg.price_prompt_per_mtok is None and cfg.price_completion_per_mtok is None:
            return None
        return round((self.prompt_tokens * (cfg.price_prompt_per_mtok or 0.0)
                      + self.completion_tokens * (cfg.price_completion_per_mtok or 0.0)) / 1e6, 6)


@dataclass
class Explanation:
    feature: int
    text: str
    usage: Usage = field(default_factory=Usage)
    terms: list[str] = field(default_factory=list)  # the n-grams / words a keyword judge looks for


class Explainer(Protocol):
    """Writes a short phrase saying what a feature is about, from its examples."""

    name: str

    def explain(self, fx: FeatureExamples) -> Explanation: ...


class Judge(Protocol):
    """Answers, per example, whether it matches an explanation (detection: does the feature fire here;
    fuzzing: are the marked tokens the ones it fires on). Returns one bool per text and the usage."""

    name: str

    def judge(self, explanation: Explanation, texts: list[str], task: str) -> tuple[list[bool], Usage]: ...


class Scorer(Protocol):
    """A number per explained feature (higher: the explanation predicts the feature better)."""

    name: str

    def score(self, explanation: Explanation, positives: list[Context], negatives: list[Context]) -> tuple[float, Usage]: ...


def balanced_accuracy(pred_pos: Iterable[bool], pred_neg: Iterable[bool]) -> float:
    """Mean of the true-positive and true-negative rates (0.5 for a judge that always says the same)."""
    pos, neg = list(pred_pos), list(pred_neg)
    tpr = sum(pos) / len(pos) if pos else 0.0
    tnr = (len(neg) - sum(neg)) / len(neg) if neg else 0.0
    return 0.5 * (tpr + tnr)
