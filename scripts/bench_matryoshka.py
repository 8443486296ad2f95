"""What `prefix_selection: nested` costs a matryoshka training step, against the default global selection.

One training step's work through the public path (`sae(x)`, `sae.loss`, backward; the optimiser step is the
same for both and left out) on the main job's embedding shapes by default (N 512, d_in 384, 1,536 latents,
k 32, widths 64 / 256 / 1,024 / 1,536), random rows. The two SAEs share their weights; their steps are
interleaved after the same warm-up. CPU process time (run it with one thread: the machine is shared). Prints
ONE JSON line: median milliseconds of each and the paired ratio nested / global with the 2.5 / 97.5 %
quantiles of the per-pair ratios.

    python scripts/bench_matryoshka.py [--rows 512] [--d-in 384] [--d-sae 1536] [--k 32] [--widths 64,256,1024]
                                       [--batch-topk] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from saekit.sae.registry import create  # noqa: E402


def step_seconds(sae, x: torch.Tensor) -> float:
    """CPU seconds of one forward + loss + backward."""
    sae.zero_grad(set_to_none=True)
    t = time.process_time()
    sae.loss(x, sae(x)).total.backward()
    return time.process_time() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--d-in", type=int, default=384)
    p.add_argument("--d-sae", type=int, default=1536)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--widths", default="64,256,1024")
    p.add_argument("--batch-topk", action="store_true")
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    widths = [int(w) for w in a.widths.split(",")] + [a.d_sae]
    cfg = {"architecture": "matryoshka", "d_in": a.d_in, "d_sae": a.d_sae, "k": a.k, "matryoshka_widths": widths,
           "batch_topk": a.batch_topk, "aux_coef": 0.0}
    ref, nested = create(cfg).train(), create(cfg | {"prefix_selection": "nested"}).train()
    nested.load_state_dict(ref.state_dict())
    x = torch.randn(a.rows, a.d_in, generator=torch.Generator().manual_seed(0))
    for sae in (ref, nested):  # the same warm-up for both
        for _ in range(3):
            step_seconds(sae, x)
    t_ref, t_nested = [], []
    for _ in range(a.repeats):
        t_ref.append(step_seconds(ref, x))
        t_nested.append(step_seconds(nested, x))
    ratios = sorted(n / r for n, r in zip(t_nested, t_ref))
    q = lambda f: ratios[min(int(f * len(ratios)), len(ratios) - 1)]  # noqa: E731
    print(json.dumps({"bench": "matryoshka_nested_step", "rows": a.rows, "d_in": a.d_in, "d_sae": a.d_sae, "k": a.k,
                      "widths": widths, "batch_topk": a.batch_topk, "threads": torch.get_num_threads(),
                      "global_ms": round(1e3 * statistics.median(t_ref), 2),
                      "nested_ms": round(1e3 * statistics.median(t_nested), 2),
                      "ratio": round(statistics.median(ratios), 3),
                      "ratio_q95": [round(q(0.025), 3), round(q(0.975), 3)]}))


if __name__ == "__main__":
    main()
