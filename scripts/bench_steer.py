"""Benchmark: a 6-strength x 8-prompt x 32-token steering sweep on SmolLM2 with a run's SAE.

    python scripts/bench_steer.py runs/quickstart-smollm2 [--feature 18] [--reps 1] [--threads 2]

Measures `saekit.steering_sweep` (batched prompts, one generate and one KL forward per strength, the
re-read of the continuations, intervals) against a reference doing the same generation and KL work
the unbatched way (one prompt and one neutral text at a time through `steer`), in the same process,
interleaved, after the same warm-up. Prints ONE JSON line: seconds of each, their ratio, and whether
the sweep is within the issue's target (<= 180 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def reference(model, tok, hook, sae, feature, prompts, strengths, neutral, n_new, seed):
    """Per strength: each prompt generated alone, each neutral text's KL from its own two forwards."""
    from saekit.analysis.steering import FeatureEdit, steer

    for s in strengths:
        edits = [FeatureEdit(feature, "add", alpha=s)]
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            with steer(model, hook, sae=sae, edits=edits), torch.random.fork_rng():
                torch.manual_seed(seed)
                model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=True, temperature=0.8,
                               top_k=0, pad_token_id=tok.eos_token_id)
        for t in neutral:
            ids = tok(t, return_tensors="pt").input_ids
            with torch.no_grad():
                base = model(ids).logits.log_softmax(-1)
                with steer(model, hook, sae=sae, edits=edits):
                    steered = model(ids).logits.log_softmax(-1)
            float((base.exp() * (base - steered)).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="an LLM run folder (its store hook and trained SAE)")
    ap.add_argument("--feature", type=int, default=18)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from saekit.analysis.steering import topic_token_ids
    from saekit.analysis.steering_sweep import NEUTRAL_TEXTS, steering_sweep
    from saekit.cli.steer_sweep import DEFAULT_PROMPTS
    from saekit.eval.bootstrap import interval_fn
    from saekit.layout import RunFolder
    from saekit.run.stages import checked_sae_and_store
    from saekit.sources.models import load_for_spec

    sae, store, _ = checked_sae_and_store(RunFolder(args.run))
    sae = sae.eval()
    model, tok = load_for_spec(store.manifest["source"])
    prompts, strengths, n_new = list(DEFAULT_PROMPTS), [0, 20, 40, 60, 80, 120], 32
    targets = topic_token_ids(tok, [" flight", " flights", " plane", " airline", " airport", " delayed"])

    def api():
        return steering_sweep(model, tok, store.hook, prompts, strengths, sae=sae, feature=args.feature,
                              target_token_ids=targets, max_new_tokens=n_new, seed=0,
                              interval=interval_fn(1000, 0), progress=False)

    def ref():
        reference(model, tok, store.hook, sae, args.feature, prompts, strengths, NEUTRAL_TEXTS, n_new, 0)

    steering_sweep(model, tok, store.hook, prompts[:2], [20], sae=sae, feature=args.feature, max_new_tokens=4,
                   progress=False)  # warm-up, shared by both
    t_api, t_ref, cpu_api, report = [], [], [], None
    for _ in range(args.reps):
        t, c = time.perf_counter(), time.process_time()
        report = api()
        t_api.append(time.perf_counter() - t)
        cpu_api.append(time.process_time() - c)  # CPU seconds of all threads: less sensitive to a busy machine
        t = time.perf_counter()
        ref()
        t_ref.append(time.perf_counter() - t)
    a, r = min(t_api), min(t_ref)
    load = os.getloadavg()[1]  # the machine is shared: a 5-minute load far above --threads inflates both times
    print(json.dumps({"bench": "steering_sweep", "strengths": len(strengths), "prompts": len(prompts), "tokens": n_new,
                      "threads": args.threads, "sweep_s": round(a, 2), "sweep_cpu_s": round(min(cpu_api), 2), "reference_unbatched_s": round(r, 2),
                      "speedup": round(r / a, 2), "target_s": 180, "within_target": a <= 180,
                      "feature": args.feature, "chosen_strength": report["chosen"]["strength"],
                      "chosen_ratio": report["chosen"]["ratio_to_unsteered"], "load_avg_5min": round(load, 1)}))


if __name__ == "__main__":
    main()
