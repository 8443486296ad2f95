"""Benchmark: the float32 top-k step with the certified bf16 pre-filter against the same step with the dense
float32 encoder product (`SAEKIT_BF16_FILTER=0`), and where the filtered step's time goes. Prints ONE JSON line.

Why: the filter replaces the float32 encoder GEMM (about two thirds of a step on one CPU thread) by a bf16 GEMM,
a bound-and-scan pass over the bf16 block and float32 dot products for the candidates; which of these
dominates decides whether it pays, and the candidate count depends on the data (planted rows here, a trained
SAE on real rows in `scripts/filter_candidates.py`). Workload as `bench_train.py` (planted activations,
d_in 512, d_sae 8192, k 32, batch 4096, Adam at sparsify's lr); the two variants train a fresh SAE each,
on the same batches, taking turns round after round (same warm-up), timed by the process's CPU time under
`--clock cpu` (use with `--threads 1`).

    python scripts/bench_filter.py [--steps 32] [--rounds 2] [--threads 1] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_train as bt  # noqa: E402  (the same planted data, batch order and step as bench_train.py)


def run(filter_on: bool, batches, held_BD, lr: float, clock) -> dict:
    from saekit.sae.kernels import native_filter
    from saekit.sae.topk import TopKConfig, TopKSAE

    with bt.bf16_filter(filter_on):
        sae = TopKSAE(TopKConfig(d_in=bt.D_IN, d_sae=bt.D_SAE, k=bt.K, seed=0))
        sae.init_from_data(batches[0])
        opt = torch.optim.Adam(sae.parameters(), lr=lr, fused=True)
        native_filter.reset_stats()
        t = clock()
        for x in batches:
            bt.saekit_step(sae, opt, x)
        dt = clock() - t
        stats = dict(native_filter.STATS)
        sae.eval()
        with torch.no_grad():
            return {"s": dt, "fvu": bt.fvu(held_BD, sae(held_BD).recon), "stats": stats,
                    "path": native_filter.summary()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    load_before = os.getloadavg()
    train_x, held_BD = bt.make_data(max(a.steps // 8, 2))
    X_ND = train_x.reshape(-1, bt.D_IN)
    batches = [X_ND[i] for i in bt.batch_order(X_ND, a.steps)]
    lr = bt.schedule_lr("sparsify")
    for on in (True, False):  # warm-up: the native build, first-touch allocations
        run(on, batches[:2], held_BD, lr, clock)
    res: dict[str, list[dict]] = {"filter": [], "dense": []}
    for r in range(a.rounds):
        for name in (["filter", "dense"] if r % 2 == 0 else ["dense", "filter"]):
            res[name].append(run(name == "filter", batches, held_BD, lr, clock))
            print(f"round {r} {name}: {res[name][-1]['s'] / a.steps * 1e3:.1f} ms/step", file=sys.stderr)
    med = statistics.median
    step_ms = {n: round(med(v["s"] for v in res[n]) / a.steps * 1e3, 1) for n in res}
    f = res["filter"][-1]["stats"]
    calls = max(f["filtered_calls"], 1)
    part_ms = {k: round(f[k] / calls * 1e3, 1) for k in ("bf16_product_s", "prep_s", "find_s", "recompute_s")}
    print(json.dumps({
        "workload": {"d_in": bt.D_IN, "d_sae": bt.D_SAE, "k": bt.K, "batch": bt.BATCH, "steps": a.steps,
                     "rounds": a.rounds, "threads": a.threads},
        "clock": a.clock,
        "load_avg_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "step_ms": step_ms,
        "filter_over_dense": round(med(d["s"] / x["s"] for x, d in zip(res["filter"], res["dense"])), 3),
        "filtered_step_parts_ms": {**{k[:-2]: v for k, v in part_ms.items()},
                                   "rest": round(step_ms["filter"] - sum(part_ms.values()), 1)},
        "candidates_per_row": res["filter"][-1]["path"]["candidates_per_row"],
        "paths": {n: res[n][-1]["path"]["path"] for n in res},
        "heldout_fvu": {n: round(med(v["fvu"] for v in res[n]), 5) for n in res},
    }))


if __name__ == "__main__":
    main()
