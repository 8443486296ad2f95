"""Streaming features through explainer and scorers, one record at a time, one output line each.

Memory stays flat in the number of latents: records come from an iterator (a bundle's features.jsonl
read line by line), each feature's result is written as soon as it is done, and what is kept across
features is bounded (the background sample, a fixed pool of non-activating candidates, the chat
backends' in-flight window). Every feature gets a line: an explanation with its scores and ledger, or
`skipped` with the reason (dead, too few examples) — never dropped.
"""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from saekit.analysis.explain.protocol import (Context, ExplainConfig, Explainer, Scorer, Usage, from_record,
                                              sample_across_intervals)
from saekit.artifacts import atomic_write_json, dumps_json

Fires = Callable[[int, np.ndarray], np.ndarray]  # (feature, store rows) -> bool [n]: does it fire there


def window_rows(ctx: Context) -> np.ndarray:
    """The store rows an example shows: its whole token window (LLM runs) or its one row."""
    if ctx.row < 0:
        return np.zeros(0, dtype=np.int64)
    if ctx.tokens and 0 <= ctx.center < len(ctx.tokens):
        return ctx.row - ctx.center + np.arange(len(ctx.tokens), dtype=np.int64)
    return np.array([ctx.row], dtype=np.int64)


@dataclass
class NegativePool:
    """Candidate non-activating examples: contexts of other features. With `fires` (the latent index) a
    candidate is kept only when the feature fires nowhere in its window, as delphi's non-activating
    examples; without it, by origin only."""

    contexts: list[tuple[int, Context]]
    fires: Fires | None = None

    def negatives(self, feature: int, n: int, seed: int) -> list[Context]:
        cand = [c for f, c in self.contexts if f != feature]
        cand = random.Random(seed).sample(cand, min(3 * n, len(cand)))
        if self.fires is not None and cand:
            rows = [window_rows(c) for c in cand]
            owner = np.repeat(np.arange(len(cand)), [len(r) for r in rows])
            hit = np.zeros(len(cand), dtype=bool)
            if len(owner):
                np.logical_or.at(hit, owner, np.asarray(self.fires(feature, np.concatenate(rows)), dtype=bool))
            cand = [c for c, h in zip(cand, hit) if not h]
        return cand[:n]


@dataclass
class Plan:
    """What runs on each feature."""

    explainer: Explainer
    scorers: list[Scorer]
    pool: NegativePool
    cfg: ExplainConfig
    extra: dict[str, Scorer] = field(default_factory=dict)  # scorer name -> scorer, run on `extra_features`
    extra_features: set[int] = field(default_factory=set)
    chats: dict = field(default_factory=dict)  # kind -> CachedChat, for the requests / cache-hit counts


def skip_reason(rec: dict, examples: int, min_examples: int) -> str | None:
    if int(rec.get("count", 0)) == 0:
        return "dead: never fired on the rows analysed"
    if examples < min_examples:
        return f"too few examples: {examples} < {min_examples} (explain.min_examples)"
    return None


def explain_one(rec: dict, plan: Plan) -> dict:
    """One feature's output line: explanation, scores and ledger, or the reason it was skipped."""
    t0 = time.perf_counter()
    fx = from_record(rec)
    reason = skip_reason(rec, len(fx.examples), plan.cfg.min_examples)
    if reason:
        return {"feature": fx.feature, "skipped": reason, "examples": len(fx.examples)}
    e = plan.explainer.explain(fx)
    usage = Usage()
    usage.add(e.usage)
    seed = plan.cfg.seed + 7919 + fx.feature
    pos = sample_across_intervals(fx.examples, plan.cfg.n_score, seed)
    scorers = list(plan.scorers) + [s for s in plan.extra.values() if fx.feature in plan.extra_features]
    scores = {}
    for s in scorers:
        n_neg = plan.cfg.n_score * (4 if s.name == "embedding" else 1)  # hard negatives are chosen among more
        value, u = s.score(e, pos, plan.pool.negatives(fx.feature, n_neg, seed))
        scores[s.name] = None if value is None else round(float(value), 4)
        usage.add(u)
    usage.seconds = time.perf_counter() - t0  # the feature's wall time, its requests included
    ledger = {"backend": plan.explainer.name, **asdict(usage), "seconds": round(usage.seconds, 4),
              "cost": usage.cost(plan.cfg)}
    return {"feature": fx.feature, "explanation": e.text, "terms": e.terms, "scores": scores,
            "examples": len(fx.examples), "ledger": ledger}


def _results(records: Iterable[dict], plan: Plan, threads: int) -> Iterator[dict]:
    """Results in record order; with threads > 1 at most 2 x threads features in flight."""
    if threads <= 1:
        for rec in records:
            yield explain_one(rec, plan)
        return
    with ThreadPoolExecutor(threads) as pool:
        window = []
        for rec in records:
            window.append(pool.submit(explain_one, rec, plan))
            if len(window) >= 2 * threads:
                yield window.pop(0).result()
        for fut in window:
            yield fut.result()


def explain_records(records: Iterable[dict], plan: Plan, out: Path, total: int | None = None,
                    threads: int = 1) -> dict:
    """Write `out` (JSON lines, one per record, atomically renamed at the end); returns the summary."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    totals, skipped, scores, explained = Usage(), {}, {}, 0
    t0 = time.perf_counter()
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in tqdm(_results(records, plan, threads), total=total, desc="explaining", unit="feature",
                      dynamic_ncols=True, disable=(total or 0) < 200):
            fh.write(dumps_json(r, indent=None) + "\n")
            if "skipped" in r:
                skipped[r["skipped"].split(":")[0]] = skipped.get(r["skipped"].split(":")[0], 0) + 1
                continue
            explained += 1
            totals.add(Usage(**{k: r["ledger"][k] for k in asdict(totals)}))
            for name, v in r["scores"].items():
                if v is not None:
                    scores.setdefault(name, []).append(v)
    os.replace(tmp, out)
    return summary(plan, totals, skipped, scores, explained, time.perf_counter() - t0)


def mean_interval(values: list[float], resamples: int = 1000, seed: int = 0, block: int = 50) -> dict:
    """Mean over features with a 95% percentile bootstrap interval (features resampled), drawn in blocks
    of `block` resamples so memory stays small however many features there are."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"n": 0, "mean": None, "ci95": None}
    rng = np.random.default_rng(seed)
    means = np.concatenate([v[rng.integers(0, len(v), size=(min(block, resamples - lo), len(v)))].mean(1)
                            for lo in range(0, resamples, block)])
    return {"n": int(len(v)), "mean": round(float(v.mean()), 4),
            "ci95": [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]}


def summary(plan: Plan, totals: Usage, skipped: dict, scores: dict, explained: int, seconds: float) -> dict:
    """The run's totals: explained and skipped counts (by reason), mean scores with intervals, the ledger."""
    judge = getattr(plan.scorers[0], "judge", None) if plan.scorers else None
    return {"backend": plan.explainer.name, "judge": getattr(judge, "name", None), "explained": explained,
            "skipped": skipped, "scores": {k: mean_interval(v) for k, v in scores.items()},
            "ledger": {**asdict(totals), "seconds": round(totals.seconds, 3), "cost": totals.cost(plan.cfg)},
            "wall_seconds": round(seconds, 3), "config": plan.cfg.to_dict()}


def read_explanations(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def write_summary(path: Path, data: dict) -> None:
    atomic_write_json(path, data)
