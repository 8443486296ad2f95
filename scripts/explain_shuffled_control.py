"""Control for `saekit explain`: detection with each feature's own explanation vs with another feature's
(shuffled), on the same activating and non-activating examples, keyword judge. A shuffled explanation
scores ~0.5 (chance); the gap is what the explanations carry.

Prints ONE JSON line. Reads RUN/bundle and RUN/explanations/explanations.jsonl (run `saekit explain RUN`
first); writes nothing into the run.

    python scripts/explain_shuffled_control.py RUN [--features 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from saekit.analysis.explain.protocol import ExplainConfig, Explanation, from_record, sample_across_intervals
from saekit.analysis.explain.runner import mean_interval, read_explanations
from saekit.analysis.explain.scorers import DetectionScorer, KeywordJudge
from saekit.browser.bundle import Bundle
from saekit.layout import RunFolder
from saekit.run.explain import OUTPUT, make_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--features", type=int, default=1000, help="explained features sampled")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    folder = RunFolder(Path(args.run)).require_run().require_one_sae()
    bundle, cfg = Bundle(folder.bundle), ExplainConfig(embedding_features=0)
    lines = {r["feature"]: r for r in read_explanations(folder.explanations / OUTPUT) if "scores" in r}
    feats = sorted(random.Random(args.seed).sample(sorted(lines), min(args.features, len(lines))))
    with tempfile.TemporaryDirectory() as tmp:
        plan = make_plan(bundle, cfg, Path(tmp), embed=False)
    det, own, shuffled = DetectionScorer(KeywordJudge()), [], []
    for f, g in zip(feats, feats[1:] + feats[:1]):
        seed = cfg.seed + 7919 + f
        pos = sample_across_intervals(from_record(bundle.feature(f)).examples, cfg.n_score, seed)
        neg = plan.pool.negatives(f, cfg.n_score, seed)
        own.append(det.score(Explanation(f, lines[f]["explanation"], terms=lines[f]["terms"]), pos, neg)[0])
        shuffled.append(det.score(Explanation(f, lines[g]["explanation"], terms=lines[g]["terms"]), pos, neg)[0])
    print(json.dumps({"run": folder.label, "features": len(feats), "detection_own": mean_interval(own),
                      "detection_shuffled": mean_interval(shuffled)}))


if __name__ == "__main__":
    main()
