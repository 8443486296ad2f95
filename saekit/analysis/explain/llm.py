"""Prompts that turn a chat backend (openai, local) into an explainer and a judge.

The prompts are plain and line-based on purpose: every example is one numbered line, the judge
answers with a JSON list of 0/1, and anything else it says is ignored. A malformed answer counts as
"no" for every example (logged), which can only lower the score, never inflate it.
"""

from __future__ import annotations

import json
import logging
import re

from saekit.analysis.explain.cache import CachedChat
from saekit.analysis.explain.protocol import Explanation, FeatureExamples, Usage, sample_across_intervals

log = logging.getLogger(__name__)

EXPLAIN_SYSTEM = ("You explain features of a neural network. Given text examples where the feature fires "
                  "(firing tokens marked <<like this>>), say in one short phrase (at most 12 words) what they "
                  "have in common. Answer with the phrase only.")
JUDGE_SYSTEM = "You check explanations of neural-network features against examples. Answer with a JSON list only."
TASKS = {
    "detection": "1 if the feature described fires on the example, else 0",
    "fuzzing": "1 if the tokens marked <<like this>> are the ones the description is about, else 0",
}


def one_line(text: str) -> str:
    return " ".join(text.split())


def explain_messages(fx: FeatureExamples, n: int, seed: int) -> list[dict]:
    lines = [f"{i + 1}. {one_line(c.highlighted())}" for i, c in enumerate(sample_across_intervals(fx.examples, n, seed))]
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": "Examples:\n" + "\n".join(lines) + "\nExplanation:"}]


def judge_messages(explanation: str, texts: list[str], task: str) -> list[dict]:
    lines = [f"{i + 1}. {one_line(t)}" for i, t in enumerate(texts)]
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Feature explanation: {one_line(explanation)}\nTask: {task}\nExamples:\n"
                                        + "\n".join(lines)
                                        + f"\nAnswer with a JSON list of {len(texts)} numbers: {TASKS[task]}."}]


def parse_votes(text: str, n: int) -> list[bool] | None:
    """The first JSON list of n numbers in the answer, as bools; None when there is none."""
    for m in re.finditer(r"\[[^\[\]]*\]", text):
        try:
            votes = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(votes, list) and len(votes) == n and all(isinstance(v, (int, float, bool)) for v in votes):
            return [bool(v) for v in votes]
    return None


class ChatExplainer:
    """An explanation written by a chat model from examples sampled across activation intervals."""

    def __init__(self, chat: CachedChat, n_examples: int = 20, seed: int = 0):
        self.chat, self.n_examples, self.seed = chat, n_examples, seed
        self.name = chat.name

    def explain(self, fx: FeatureExamples) -> Explanation:
        res, usage = self.chat.complete(explain_messages(fx, self.n_examples, self.seed + fx.feature))
        text = one_line(res.text.strip().splitlines()[0] if res.text.strip() else "") or "(no explanation)"
        if len(text) > 1 and text[0] == text[-1] == '"' and text.count('"') == 2:  # one quoted phrase
            text = text[1:-1]
        return Explanation(feature=fx.feature, text=text, usage=usage)


class ChatJudge:
    """A chat model as the detection / fuzzing judge."""

    def __init__(self, chat: CachedChat):
        self.chat = chat
        self.name = chat.name

    def judge(self, explanation: Explanation, texts: list[str], task: str) -> tuple[list[bool], Usage]:
        res, usage = self.chat.complete(judge_messages(explanation.text, texts, task))
        votes = parse_votes(res.text, len(texts))
        if votes is None:
            log.warning("judge answer for feature %d is not a list of %d votes: %r", explanation.feature,
                        len(texts), res.text[:120])
            votes = [False] * len(texts)
        return votes, usage
