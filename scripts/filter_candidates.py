"""The certified bf16 pre-filter on a trained SAE and its store: candidates per row and exactness.

Why: the filter's cost is its candidate count, which depends on how concentrated a trained encoder's
pre-activations are near each row's k-th value (random planted data gives ~90 a row at k 32, d_sae 8192).
Loads a run's store and top-k SAE, encodes `--rows` rows through `saekit.sae.kernels.native_filter.topk`
and through a float64 reference, and prints ONE JSON line: mean/median/p99/max candidates per row, the
fraction of rows whose index set equals the float64 top-k (a tie within float32 rounding of the k-th value
may legitimately differ: counted separately), and the timing of each part on this machine.

    python scripts/filter_candidates.py RUN_FOLDER [--rows 4096] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saekit import load_sae
from saekit.layout import RunFolder
from saekit.sae.kernels import native_filter
from saekit.store.reader import ActivationStore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a run folder with a store and one trained top-k SAE")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run = RunFolder(a.run).require_one_sae()
    sae = load_sae(run.final_sae())
    store = ActivationStore(run.store)
    n = min(a.rows, len(store))
    x_BD = store[torch.arange(n)].float()
    W, b_enc, b_dec = sae.W_enc.detach().float(), sae.b_enc.detach().float(), sae.b_dec.detach().float()
    x_c = (x_BD - b_dec).contiguous()
    k = sae.cfg.k
    native_filter.reset_stats()
    out = native_filter.topk(x_c, W, b_enc, k)
    if out is None:
        print(json.dumps({"error": "filter did not apply", "cpu_bf16": native_filter.cpu_has_bf16()}))
        return
    t0 = time.perf_counter()
    native_filter.bf16_product(x_c, W)
    t1 = time.perf_counter()
    native_filter.prepare(W)
    t2 = time.perf_counter()
    native_filter.reset_stats()
    vals, idx, _ = native_filter.topk(x_c, W, b_enc, k)
    t3 = time.perf_counter()
    torch.mm(x_c, W)
    t4 = time.perf_counter()
    per_row = _per_row_candidates(x_c, W, b_enc, k)
    ref = (x_c.double() @ W.double() + b_enc.double())
    ref_v, ref_i = ref.topk(k, dim=1)
    same = (idx.sort(1).values == ref_i.sort(1).values).all(1)
    kth, next_ = ref_v[:, -1], ref.topk(k + 1, dim=1).values[:, -1]
    near_tie = (kth - next_).abs() <= 1e-6 * kth.abs().clamp_min(1e-30) * 8
    print(json.dumps({
        "run": str(a.run), "rows": n, "d_in": x_c.shape[1], "d_sae": W.shape[1], "k": k, "threads": a.threads,
        "candidates_per_row": {"mean": round(per_row.float().mean().item(), 1),
                               "median": int(per_row.median()), "p99": int(per_row.quantile(0.99)),
                               "max": int(per_row.max())},
        "same_set_as_float64": round(same.float().mean().item(), 5),
        "differing_rows_at_float32_ties": int((~same & near_tie).sum()), "differing_rows_other": int((~same & ~near_tie).sum()),
        "ms": {"bf16_product": round((t1 - t0) * 1e3, 1), "prep": round((t2 - t1) * 1e3, 1),
               "filter_total": round((t3 - t2) * 1e3, 1), "fp32_product": round((t4 - t3) * 1e3, 1)},
    }))


def _per_row_candidates(x_c, W, b_enc, k, chunk=512):
    """Candidates per row, one call a chunk of rows (the kernel reports only totals)."""
    counts = []
    for s in range(0, x_c.shape[0], chunk):
        native_filter.reset_stats()
        native_filter.topk(x_c[s:s + chunk], W, b_enc, k)
        counts.append(native_filter.STATS["candidates"] / min(chunk, x_c.shape[0] - s))
    return torch.tensor(counts)


if __name__ == "__main__":
    main()
