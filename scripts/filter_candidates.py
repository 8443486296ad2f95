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
from saekit.hardware import cpu_has_bf16
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
    W, b_enc, b_dec = sae.W_enc.detach().float(), sae.b_enc.detach().float(), sae.b_dec.detach().float()
    x_c = (store[torch.arange(n)].float() - b_dec).contiguous()
    k = sae.cfg.k
    native_filter.reset_stats()
    if native_filter.topk(x_c, W, b_enc, k) is None:  # also the warm-up (the native build)
        print(json.dumps({"error": "filter did not apply", "cpu_bf16": cpu_has_bf16()}))
        return
    idx, stats, cpu_ms = _timed(x_c, W, b_enc, k)
    per_row = _per_row_candidates(x_c, W, b_enc, k)
    print(json.dumps({
        "run": str(a.run), "rows": n, "d_in": x_c.shape[1], "d_sae": W.shape[1], "k": k, "threads": a.threads,
        "candidates_per_row": round(stats["candidates"] / n, 1),
        "candidates_fraction_of_d_sae": round(stats["candidates"] / n / W.shape[1], 4),
        "block_means_64_rows": {"min": round(per_row.min().item(), 1), "median": round(per_row.median().item(), 1),
                                "max": round(per_row.max().item(), 1)},
        **_against_float64(x_c, W, b_enc, k, idx),
        "cpu_ms": cpu_ms,
    }))


def _timed(x_c, W, b_enc, k):
    """The filter and the dense float32 path (product, then the native top-k adding the bias), CPU time
    (with --threads 1, the work itself on a shared machine); the filter's parts from its STATS."""
    clock = time.process_time
    native_filter.reset_stats()
    t0 = clock()
    _, idx, _ = native_filter.topk(x_c, W, b_enc, k)
    t1 = clock()
    stats = dict(native_filter.STATS)
    rowwise_topk(torch.mm(x_c, W), k, b_enc)
    t2 = clock()
    parts = {key[:-2]: round(stats[key] * 1e3, 1) for key in ("bf16_product_s", "prep_s", "find_s", "recompute_s")}
    return idx, stats, {"filter": round((t1 - t0) * 1e3, 1), "dense_fp32_product_and_topk": round((t2 - t1) * 1e3, 1),
                        **parts}


def _against_float64(x_c, W, b_enc, k, idx) -> dict:
    """Rows whose index set equals the float64 top-k; a differing row is put down to float32 rounding when its
    k-th and (k+1)-th float64 values are within 8e-6 (relative) of each other."""
    ref = x_c.double() @ W.double() + b_enc.double()
    top = ref.topk(k + 1, dim=1)
    same = (idx.sort(1).values == top.indices[:, :k].sort(1).values).all(1)
    near_tie = (top.values[:, k - 1] - top.values[:, k]).abs() <= 8e-6 * top.values[:, k - 1].abs()
    return {"same_set_as_float64": round(same.float().mean().item(), 5),
            "differing_rows_at_float32_ties": int((~same & near_tie).sum()),
            "differing_rows_other": int((~same & ~near_tie).sum())}


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
