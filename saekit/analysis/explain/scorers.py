"""Scorers: a number per explained feature saying how well the explanation predicts it.

- **detection**: a judge sees activating and non-activating examples (as many of each) and says which
  ones the feature fires on; the score is the balanced accuracy (0.5: no better than chance).
- **fuzzing**: a judge sees activating examples twice, once with the tokens the feature fires on
  marked, once with as many other tokens marked, and says which markings fit; balanced accuracy.
  Token-level, so LLM runs only (None for embedding runs).
- **embedding** (no LLM): MiniLM similarity of the explanation to activating examples vs to hard
  negatives — for each activating example the most similar non-activating one — as an AUROC.

The keyword judge is the offline, deterministic judge: an example matches when it contains one of the
explanation's terms (the quoted n-grams of an ngram explanation, else its content words).
"""

from __future__ import annotations

import random
import re
from typing import Callable

import numpy as np

from saekit.analysis.explain.protocol import Context, Explanation, Judge, Usage, balanced_accuracy

STOPWORDS = set("a an the of to in on at for and or but is are was were be been it its this that these those with "
                "by from as about feature fires mostly words word tokens token text texts".split())
MARK = re.compile(r"<<(.*?)>>")


def explanation_terms(e: Explanation) -> list[str]:
    """The terms a keyword judge looks for: the explainer's own, else quoted strings, else content words."""
    if e.terms:
        return [t.lower() for t in e.terms]
    quoted = re.findall(r'"([^"]+)"', e.text)
    if quoted:
        return [q.strip().lower() for q in quoted if q.strip()]
    return [w for w in re.findall(r"[\w']+", e.text.lower()) if w not in STOPWORDS and len(w) > 2]


class KeywordJudge:
    """Deterministic offline judge: detection = the text contains a term; fuzzing = a marked token is
    (part of) a term."""

    name = "keyword"

    def judge(self, explanation: Explanation, texts: list[str], task: str) -> tuple[list[bool], Usage]:
        terms = explanation_terms(explanation)
        if task == "fuzzing":
            words = {w for t in terms for w in t.split()}
            return [any(m.strip().lower() in words for m in MARK.findall(t) if m.strip()) for t in texts], Usage()
        return [any(_contains(t.lower(), term) for term in terms) for t in texts], Usage()


def _contains(text: str, term: str) -> bool:
    """Whole-word containment (a term "cat" does not match "category")."""
    return re.search(r"(?<!\w)" + re.escape(term) + r"(?!\w)", text) is not None


class DetectionScorer:
    name = "detection"

    def __init__(self, judge: Judge):
        self.judge = judge

    def score(self, explanation: Explanation, positives: list[Context], negatives: list[Context]) -> tuple[float | None, Usage]:
        if not positives or not negatives:
            return None, Usage()
        texts = [c.plain() for c in positives] + [c.plain() for c in negatives]
        votes, usage = self.judge.judge(explanation, texts, "detection")
        return balanced_accuracy(votes[:len(positives)], votes[len(positives):]), usage


class FuzzingScorer:
    name = "fuzzing"

    def __init__(self, judge: Judge, seed: int = 0):
        self.judge, self.seed = judge, seed

    def score(self, explanation: Explanation, positives: list[Context], negatives: list[Context]) -> tuple[float | None, Usage]:
        pos = [c for c in positives if c.tokens and any(a > 0 for a in c.acts)]
        if not pos:
            return None, Usage()
        rng = random.Random(self.seed + explanation.feature)
        right = [c.highlighted() for c in pos]
        wrong = [c.highlighted(wrong_marks(c, rng)) for c in pos]
        votes, usage = self.judge.judge(explanation, right + wrong, "fuzzing")
        return balanced_accuracy(votes[:len(right)], votes[len(right):]), usage


def wrong_marks(ctx: Context, rng: random.Random) -> list[bool]:
    """As many marks as the example has firing tokens, on tokens it does not fire on (when it has any)."""
    firing = [a > 0 for a in ctx.acts]
    others = [i for i, f in enumerate(firing) if not f and ctx.tokens[i].strip()]
    pick = set(rng.sample(others, min(len(others), max(1, sum(firing)))))
    return [i in pick for i in range(len(ctx.tokens))]


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > a random negative), ties counted half."""
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


class EmbeddingScorer:
    """LLM-free: does the explanation sit closer (MiniLM cosine) to activating examples than to their
    nearest non-activating neighbours? `embed(texts) -> [n, d]` unit-norm rows."""

    name = "embedding"

    def __init__(self, embed: Callable[[list[str]], np.ndarray], memo_size: int = 20000):
        self.embed, self.memo, self.memo_size = embed, {}, memo_size

    def _vectors(self, texts: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self.memo))
        if len(self.memo) + len(todo) > self.memo_size:
            self.memo.clear()
        if todo:
            self.memo.update(zip(todo, np.asarray(self.embed(todo), dtype=np.float32)))
        return np.stack([self.memo[t] for t in texts])

    def score(self, explanation: Explanation, positives: list[Context], negatives: list[Context]) -> tuple[float | None, Usage]:
        if not positives or not negatives:
            return None, Usage()
        pos_PD = self._vectors([c.plain() for c in positives])
        neg_ND = self._vectors([c.plain() for c in negatives])
        hard = np.unique((pos_PD @ neg_ND.T).argmax(1))  # each positive's nearest non-activating example
        expl_D = self._vectors([explanation.text])[0]
        return auroc(pos_PD @ expl_D, neg_ND[hard] @ expl_D), Usage()
