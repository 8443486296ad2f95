"""Benchmark the description-length sweep (saekit.eval.description_length); prints ONE JSON line.

Workload: a 16,384-latent top-k-shaped code (k=32) over 1,000,000 activation rows, swept over
6 precisions, on CPU with 2 threads. The codes are synthetic, shaped like a top-k SAE's output:
per row, 32 latent ids drawn from a Zipf-like frequency distribution (exponent `--zipf`; a latent
drawn twice in one row keeps one slot, the duplicate slot is set inactive, so the mean L0 is a
little under 32 — reported), positive log-normal values with a per-latent scale, a random
unit-row decoder `W_dec [16384, d_in]` plus bias, recon = decode(code) and x = recon + noise.
Rows are generated chunk by chunk from per-chunk seeds (both passes see the same rows) and only
the DL calls are timed (pass 1 ranges + pass 2 histograms and quantised errors), not generation.
Memory stays bounded: nothing holds all rows.

The per-latent reference (`description_length_reference`) runs in the same process on a slice
(`--ref-rows`), next to the vectorised sweep on that same slice: both get one untimed warm-up
call, then `--rounds` (>= 5) interleaved timed rounds (the order alternates each round), and the
headline `slice_speedup` is the median of the per-round ratios. The reference is not extrapolated
to the full size: much of its cost is a Python loop per latent, which does not grow with rows, so
a linear extrapolation would inflate the speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saekit.eval.description_length_reference import description_length_reference
from saekit.eval.description_length import (  # noqa: E402
    DescriptionLengthAccumulator,
    LatentValueRange,
    description_length,
)
from saekit.sae.base import SparseCode  # noqa: E402


class Workload:
    def __init__(self, d_sae: int, d_in: int, k: int, zipf: float, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.d_sae, self.d_in, self.k, self.seed = d_sae, d_in, k, seed
        w = torch.arange(1, d_sae + 1, dtype=torch.float64).pow(-zipf)
        perm = torch.randperm(d_sae, generator=g)
        self.cdf = torch.cumsum(w[perm] / w.sum(), 0)
        self.scale_F = torch.exp(0.5 * torch.randn(d_sae, generator=g)).float()
        W = torch.randn(d_sae, d_in, generator=g)
        self.W_dec_FD = W / W.norm(dim=1, keepdim=True)
        self.b_dec_D = 0.1 * torch.randn(d_in, generator=g)

    def code(self, chunk_id: int, n: int) -> SparseCode:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk_id + 1)
        u = torch.rand(n, self.k, generator=g, dtype=torch.float64)
        idx = torch.searchsorted(self.cdf, u).clamp_(max=self.d_sae - 1)
        idx, _ = idx.sort(dim=1)
        dup = torch.zeros_like(idx, dtype=torch.bool)
        dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
        vals = self.scale_F[idx] * torch.exp(0.5 * torch.randn(n, self.k, generator=g))
        return SparseCode(idx, vals.masked_fill_(dup, 0.0), self.d_sae)

    def decode(self, code: SparseCode) -> torch.Tensor:
        k = code.indices.shape[-1]
        out = F.embedding_bag(code.indices.reshape(-1, k), self.W_dec_FD,
                              per_sample_weights=code.values.reshape(-1, k).float(), mode="sum")
        return out.reshape(*code.indices.shape[:-1], self.d_in) + self.b_dec_D

    def rows(self, chunk_id: int, n: int, code: SparseCode) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7_000_003 + chunk_id + 1)
        recon = self.decode(code)
        x = recon + 0.2 * torch.randn(n, self.d_in, generator=g)
        return x, recon


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> tuple[dict[str, list[float]], dict]:
    """One untimed warm-up call of each, then `rounds` rounds timing each once, the order alternating;
    returns the per-round seconds and each function's last result."""
    last = {name: fn() for name, fn in fns.items()}
    secs: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            last[name] = fns[name]()
            secs[name].append(time.perf_counter() - t0)
    return secs, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--zipf", type=float, default=0.8)
    ap.add_argument("--precisions", type=str, default="2,3,4,5,6,8")
    ap.add_argument("--ref-rows", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--error-chunk", type=int, default=64, help="rows per gathered decoder block")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of reference vs vectorised (>= 5)")
    args = ap.parse_args()
    if args.rounds < 5:
        ap.error(f"--rounds: the headline ratio is a median over at least 5 rounds, found {args.rounds}")
    torch.set_num_threads(args.threads)
    precisions = tuple(int(b) for b in args.precisions.split(","))
    wl = Workload(args.d_sae, args.d_in, args.k, args.zipf)
    chunks = [(i, min(args.chunk, args.rows - s)) for i, s in enumerate(range(0, args.rows, args.chunk))]

    # ---- full sweep: pass 1 (ranges) + pass 2 (histograms, quantised errors); only DL calls timed
    load_before = os.getloadavg()[0]
    t_pass1 = t_pass2 = 0.0
    ranges = LatentValueRange(args.d_sae)
    for cid, n in chunks:
        code = wl.code(cid, n)
        t0 = time.perf_counter()
        ranges.update(code)
        t_pass1 += time.perf_counter() - t0
    t0 = time.perf_counter()
    acc = DescriptionLengthAccumulator(ranges.lo_F, ranges.hi_F, precisions, decoder_FD=wl.W_dec_FD,
                                       error_chunk=args.error_chunk)
    t_pass2 += time.perf_counter() - t0
    for cid, n in chunks:
        code = wl.code(cid, n)
        x, recon = wl.rows(cid, n, code)
        t0 = time.perf_counter()
        acc.update(code, x, recon)
        t_pass2 += time.perf_counter() - t0
    t0 = time.perf_counter()
    full = acc.result()
    t_pass2 += time.perf_counter() - t0
    full_s = t_pass1 + t_pass2

    # ---- reference vs vectorised on the same slice: same warm-up, interleaved rounds, median ratio
    n_ref = min(args.ref_rows, args.rows)
    code = wl.code(10_000_019, n_ref)
    x, recon = wl.rows(10_000_019, n_ref, code)
    secs, last = interleaved({
        "reference": lambda: description_length_reference(code.indices, code.values, args.d_sae, precisions,
                                                          x_ND=x, decode_fn=wl.decode, recon_ND=recon),
        "vectorised": lambda: description_length([(code, x, recon)], args.d_sae, precisions,
                                                 decoder_FD=wl.W_dec_FD, error_chunk=args.error_chunk),
    }, args.rounds)
    ref, vec = last["reference"], last["vectorised"]
    ratios = [a / b for a, b in zip(secs["reference"], secs["vectorised"])]
    max_dl_diff = max(abs(a["dl_bits_per_row"] - b["dl_bits_per_row"]) for a, b in zip(ref["sweep"], vec["sweep"]))
    max_fvu_diff = max(abs(a["fvu"] - b["fvu"]) for a, b in zip(ref["sweep"], vec["sweep"]))

    print(json.dumps({
        "bench": "mdl_description_length_sweep",
        "workload": (f"synthetic top-k-shaped codes (Zipf^{args.zipf} latent frequencies, duplicate draws "
                     f"inactive, log-normal positive values), random unit-row decoder + bias, x = decode(code) "
                     f"+ noise; encode/generation not timed"),
        "rows": args.rows, "d_sae": args.d_sae, "d_in": args.d_in, "k": args.k, "chunk_rows": args.chunk,
        "precisions_bits": list(precisions), "threads": torch.get_num_threads(), "error_chunk": args.error_chunk,
        "machine_load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "cpus": os.cpu_count(),
        "l0_mean": round(full["l0_mean"], 3),
        "full_sweep_s": round(full_s, 2), "pass1_ranges_s": round(t_pass1, 2), "pass2_hist_errors_s": round(t_pass2, 2),
        "target_s": 30.0, "meets_target": full_s < 30.0,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "ref_rows": n_ref, "rounds": args.rounds, "warmup_calls_each": 1,
        "ref_slice_s_median": round(statistics.median(secs["reference"]), 3),
        "vectorised_slice_s_median": round(statistics.median(secs["vectorised"]), 4),
        "slice_speedup": round(statistics.median(ratios), 1),
        "slice_speedup_per_round": [round(r, 1) for r in ratios],
        "slice_max_abs_dl_diff_bits": max_dl_diff, "slice_max_abs_fvu_diff": max_fvu_diff,
        "selected_bits": full["selected_bits"], "dl_bits_per_row": full["dl_bits_per_row"],
        "activity_bits_per_row": full["activity_bits_per_row"],
        "sweep": [{k_: e[k_] for k_ in ("bits", "dl_bits_per_row", "fvu_increase")} for e in full["sweep"]],
    }, allow_nan=False))


if __name__ == "__main__":
    main()
