"""The offline default explainer: contrastive n-grams and labels, written as a short phrase.

For each feature, the unigrams and bigrams at the positions it fires on (LLM runs: the firing tokens
and the token before each; embedding runs: the words of its documents) are compared with their rate
in a background sample of contexts. Terms are ranked by `p_feature * log(p_feature / p_background)`
(the term's contribution to the KL divergence of the feature's term distribution from the background),
so frequent-but-everywhere tokens (" the", ",") lose to tokens the feature is about. A label value
that is clearly over-represented among the feature's examples is added ("mostly sentiment=negative").

No model, no network: this is the explanation every run gets, and the baseline an LLM explainer has
to beat on the same scorers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from saekit.analysis.explain.protocol import Context, Explanation, FeatureExamples, sample_across_intervals

WORD = re.compile(r"[#@]?[\w'’]+", re.UNICODE)
LABEL_SHARE = 0.6  # a label value named in the phrase covers at least this share of the examples ...
LABEL_LIFT = 1.3  # ... and is this many times more common than in the background
MIN_SHARE = 0.1  # a term named covers at least this share of the examples (and two of them)


def _norm(token: str) -> str:
    return token.strip().lower()


def position_terms(ctx: Context, positions: Iterable[int]) -> set[str]:
    """Unigram and bigram (previous token + this one) terms at the given token positions. BPE pieces
    carry their own spaces; word-level tokens are joined with one."""
    sep = "" if any(t[:1].isspace() for t in ctx.tokens) else " "
    out = set()
    for i in positions:
        uni = _norm(ctx.tokens[i])
        if uni:
            out.add(uni)
        if i > 0 and uni and _norm(ctx.tokens[i - 1]):
            out.add(_norm(ctx.tokens[i - 1] + sep + ctx.tokens[i]))
    return out


def text_terms(text: str) -> set[str]:
    """Word unigrams and bigrams of a document (lower-cased)."""
    words = [w.lower() for w in WORD.findall(text)]
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}


def firing_terms(ctx: Context) -> set[str]:
    """The terms a feature example contributes: at its firing tokens, or its whole document."""
    if not ctx.tokens:
        return text_terms(ctx.text)
    fire = [i for i, a in enumerate(ctx.acts) if a > 0] or ([ctx.center] if 0 <= ctx.center < len(ctx.tokens) else [])
    return position_terms(ctx, fire)


def context_terms(ctx: Context) -> set[str]:
    """The terms of a background context: every position (tokens) or the whole document (text)."""
    return position_terms(ctx, range(len(ctx.tokens))) if ctx.tokens else text_terms(ctx.text)


def label_items(labels: dict) -> list[str]:
    return [f"{k}={v}" for k, v in (labels or {}).items() if v is not None and not isinstance(v, (dict, list))]


@dataclass
class Background:
    """Term and label rates in a background sample (unit: token positions for LLM runs, documents for
    embedding runs; labels per context)."""

    terms: Counter = field(default_factory=Counter)
    units: int = 0
    labels: Counter = field(default_factory=Counter)
    contexts: int = 0

    def add(self, ctx: Context) -> None:
        if ctx.tokens:
            for i in range(len(ctx.tokens)):
                self.terms.update(position_terms(ctx, [i]))
            self.units += len(ctx.tokens)
        else:
            self.terms.update(text_terms(ctx.text))
            self.units += 1
        self.labels.update(label_items(ctx.labels))
        self.contexts += 1

    def rate(self, term: str) -> float:
        """Smoothed background rate (add-half), so a term never seen still has a finite lift."""
        return (self.terms.get(term, 0) + 0.5) / (self.units + 1.0)

    def label_rate(self, item: str) -> float:
        return (self.labels.get(item, 0) + 0.5) / (self.contexts + 1.0)


def build_background(examples: Iterable[Context]) -> Background:
    bg = Background()
    for ctx in examples:
        bg.add(ctx)
    return bg


def ranked_terms(examples: list[Context], bg: Background) -> list[tuple[str, float, float]]:
    """(term, share of examples with it, score) of over-represented terms, best first."""
    n = len(examples)
    counts: Counter = Counter()
    for ctx in examples:
        counts.update(firing_terms(ctx))
    out = []
    for term, c in counts.items():
        p = c / n
        lift = p / bg.rate(term)
        if lift > 1.0 and p >= MIN_SHARE and c >= min(2, n):
            out.append((term, p, p * math.log(lift)))
    return sorted(out, key=lambda t: (-t[2], t[0]))


def pick_terms(ranked: list[tuple[str, float, float]], k: int) -> list[tuple[str, float]]:
    """The best `k` terms, skipping one that repeats a chosen term (contained in it or containing it)
    unless it covers clearly more examples."""
    chosen: list[tuple[str, float]] = []
    for term, p, _ in ranked:
        clash = [c for c in chosen if term in c[0] or c[0] in term]
        if clash and p <= 1.2 * max(c[1] for c in clash):
            continue
        chosen.append((term, p))
        if len(chosen) == k:
            break
    return chosen


def label_phrase(examples: list[Context], bg: Background) -> str:
    counts = Counter(item for ctx in examples for item in label_items(ctx.labels))
    best = [(item, c / len(examples)) for item, c in counts.most_common()
            if c / len(examples) >= LABEL_SHARE and (c / len(examples)) / bg.label_rate(item) >= LABEL_LIFT]
    return ", ".join(f"{item} ({p:.0%})" for item, p in best[:2])


class NgramExplainer:
    """Contrastive n-gram explanations against a fixed background sample."""

    name = "ngram"

    def __init__(self, background: Background, max_terms: int = 3, n_examples: int = 40, seed: int = 0):
        self.bg, self.max_terms, self.n_examples, self.seed = background, max_terms, n_examples, seed

    def explain(self, fx: FeatureExamples) -> Explanation:
        examples = sample_across_intervals(fx.examples, self.n_examples, self.seed + fx.feature)
        terms = pick_terms(ranked_terms(examples, self.bg), self.max_terms)
        words = ", ".join(f'"{t}"' for t, _ in terms) or "no distinctive tokens"
        labels = label_phrase(examples, self.bg)
        text = words + (f"; mostly {labels}" if labels else "")
        return Explanation(feature=fx.feature, text=text, terms=[t for t, _ in terms])
