"""The certified bf16 pre-filter on a trained SAE and its store: candidates per row and exactness.

Why: the filter's cost is its candidate count, which depends on how concentrated a trained encoder's
pre-activations are near each row's k-th value (random planted data gives ~90 a row at k 32, d_sae 8192).
Loads a run's store and top-k SAE, encodes `--rows` rows through `saekit.sae.kernels.native_filter.topk`
and through a float64 reference, and prints ONE JSON line: candidates per row (the mean, and the spread of
the means over 64-row blocks: the kernel reports totals), the
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
from saekit.sae.kernels.sparse import rowwise_topk
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
    clock = time.process_time  # CPU time: with --threads 1, the work itself on a shared machine
    native_filter.reset_stats()
    t0 = clock()
    vals, idx, _ = native_filter.topk(x_c, W, b_enc, k)
    t1 = clock()
    filter_stats = dict(native_filter.STATS)
    pre = torch.mm(x_c, W)
    rowwise_topk(pre, k, b_enc)  # the dense float32 path: product, then the native top-k adding the bias
    t2 = clock()
    per_row = _per_row_candidates(x_c, W, b_enc, k)
    ref = (x_c.double() @ W.double() + b_enc.double())
    ref_v, ref_i = ref.topk(k, dim=1)
    same = (idx.sort(1).values == ref_i.sort(1).values).all(1)
    kth, next_ = ref_v[:, -1], ref.topk(k + 1, dim=1).values[:, -1]
    near_tie = (kth - next_).abs() <= 1e-6 * kth.abs().clamp_min(1e-30) * 8
    print(json.dumps({
        "run": str(a.run), "rows": n, "d_in": x_c.shape[1], "d_sae": W.shape[1], "k": k, "threads": a.threads,
        "candidates_per_row": round(filter_stats["candidates"] / n, 1),
        "candidates_fraction_of_d_sae": round(filter_stats["candidates"] / n / W.shape[1], 4),
        "block_means_64_rows": {"min": round(per_row.min().item(), 1), "median": round(per_row.median().item(), 1),
                                "max": round(per_row.max().item(), 1)},
        "same_set_as_float64": round(same.float().mean().item(), 5),
        "differing_rows_at_float32_ties": int((~same & near_tie).sum()), "differing_rows_other": int((~same & ~near_tie).sum()),
        "cpu_ms": {"filter": round((t1 - t0) * 1e3, 1), "dense_fp32_product_and_topk": round((t2 - t1) * 1e3, 1),
                   **{key[:-2]: round(filter_stats[key] * 1e3, 1)
                      for key in ("bf16_product_s", "prep_s", "find_s", "recompute_s")}},
    }))


def _per_row_candidates(x_c, W, b_enc, k, chunk=64):
    """Mean candidates per row of each 64-row block (the kernel reports totals per call)."""
    counts = []
    for s in range(0, x_c.shape[0], chunk):
        native_filter.reset_stats()
        native_filter.topk(x_c[s:s + chunk], W, b_enc, k)
        counts.append(native_filter.STATS["candidates"] / min(chunk, x_c.shape[0] - s))
    return torch.tensor(counts)


if __name__ == "__main__":
    main()
