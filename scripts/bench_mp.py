"""Benchmark: saekit MP-SAE training/encoding against a naive matching-pursuit SAE (same process).

Workload: d_in=512, d_sae=8192, batch 4096, fp32, 2 threads. The naive reference (kept here on
purpose) runs k steps of `(r @ D.T).max`, gather, subtract, with full autograd through the unroll,
and Adam. Every variant, the reference included, gets the same warm-up (one step on the full
batch) and the same number of timed rounds (`--reps`, at least 5). Each round times every variant
once, in an order that rotates from round to round, so all see the same load from other jobs; every
headline ratio is the median of the per-round ratios (the 1-minute load average is reported
beside them). Peak RSS is measured per variant in a fresh subprocess. Prints ONE JSON line.

    python scripts/bench_mp.py            # full run (~5 min on 2 cores)
    python scripts/bench_mp.py --quick    # smaller batch, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

D_IN, D_SAE, BATCH = 512, 8192, 4096


class NaiveMP(torch.nn.Module):
    """The reference: k full correlation products, autograd through every step (O(k*B*d_sae) memory)."""

    def __init__(self, k: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        W = torch.randn(D_SAE, D_IN, generator=g)
        self.W_dec = torch.nn.Parameter(W / W.norm(dim=-1, keepdim=True))
        self.b_dec = torch.nn.Parameter(torch.zeros(D_IN))
        self.k = k

    def forward(self, x):
        r = x - self.b_dec
        recon = torch.zeros_like(x)
        for _ in range(self.k):
            c = r @ self.W_dec.T
            val, idx = c.max(dim=-1)
            contrib = val.clamp_min(0)[:, None] * self.W_dec[idx]
            recon = recon + contrib
            r = r - contrib
        return recon + self.b_dec

    def after_step(self):
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True))


def make(variant: str, k: int):
    """(module, forward returning recon, after-step callback) for a variant."""
    if variant == "naive":
        m = NaiveMP(k)
        return m, m, m.after_step, lambda: None
    if variant == "mp":
        from saekit.sae.matching_pursuit import MatchingPursuitSAE, MPConfig
        m = MatchingPursuitSAE(MPConfig(d_in=D_IN, d_sae=D_SAE, k=k))
    else:
        from saekit.sae.topk import TopKConfig, TopKSAE
        m = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=k))
    m.train()
    return m, lambda x: m(x).recon, m.after_optimizer_step, m.before_optimizer_step


class Trainer:
    """The same Adam step for every variant: forward, MSE, backward, hooks, step."""

    def __init__(self, variant: str, k: int):
        self.m, self.fwd, self.after, self.before = make(variant, k)
        self.opt = torch.optim.Adam(self.m.parameters(), lr=1e-4)

    def step(self, x):
        loss = (self.fwd(x) - x).pow(2).sum(-1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.before()
        self.opt.step()
        self.after()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def data(batch: int) -> torch.Tensor:
    return torch.randn(batch, D_IN, generator=torch.Generator().manual_seed(1))


def throughput(batch: int, ks: list[int], reps: int, naive_k: int) -> tuple[dict, dict[str, list[float]]]:
    """Per-round step times of every variant in this one process, and per-round ratios.

    Warm-up: one step of every variant on the full batch (the reference too). Then `reps` rounds;
    each times every variant once, the order rotated by one each round. Ratios are taken within a
    round; tokens/s are medians over rounds.
    """
    x = data(batch)
    trainers = {f"naive_train_k{naive_k}": Trainer("naive", naive_k)}
    trainers.update({f"mp_train_k{k}": Trainer("mp", k) for k in ks})
    trainers["topk_train_k32"] = Trainer("topk", 32)
    enc = trainers[f"mp_train_k{max(ks)}"].m

    def encode():
        enc.eval()
        with torch.no_grad():
            enc.encode(x)
        enc.train()

    steps = {name: (lambda t=t: t.step(x)) for name, t in trainers.items()}
    steps[f"mp_encode_k{max(ks)}"] = encode
    for fn in steps.values():
        fn()  # warm-up, identical for every variant (Gram matrix, allocator, autograd buffers)
    names = list(steps)
    secs: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            secs[name].append(timed(steps[name]))
    per_round = {
        f"speedup_vs_naive_k{naive_k}": [a / b for a, b in zip(secs[f"naive_train_k{naive_k}"],
                                                                 secs[f"mp_train_k{naive_k}"])],
        "mp_vs_topk_train_k32": [a / b for a, b in zip(secs["topk_train_k32"], secs["mp_train_k32"])],
        f"step_time_ratio_k{max(ks)}_over_k{min(ks)}": [a / b for a, b in zip(secs[f"mp_train_k{max(ks)}"],
                                                                              secs[f"mp_train_k{min(ks)}"])],
    }
    return {name: batch / statistics.median(v) for name, v in secs.items()}, per_round


def peak_rss(variant: str, k: int, batch: int) -> float:
    """Peak RSS (GB) of two training steps of one variant in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--child", variant, "--k", str(k), "--batch", str(batch)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_gb"]


def child(variant: str, k: int, batch: int) -> None:
    torch.set_num_threads(2)
    t = Trainer(variant, k)
    x = data(batch)
    for _ in range(2):
        t.step(x)
    print(json.dumps({"peak_rss_gb": vm_hwm_gb()}))


def vm_hwm_gb() -> float:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it is not inherited from the parent)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (>= 5: headline ratios are medians)")
    ap.add_argument("--child")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=BATCH)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.k, args.batch)
    if args.reps < 5:
        ap.error(f"--reps: headline ratios are medians over at least 5 rounds, found {args.reps}")
    torch.set_num_threads(2)
    batch = 512 if args.quick else args.batch
    ks = [8, 16, 32]
    load_before = os.getloadavg()[0]
    tps, per_round = throughput(batch, ks, args.reps, naive_k=32)
    load_after = os.getloadavg()[0]
    rss = {f"mp_k{k}": peak_rss("mp", k, batch) for k in (8, 32)}
    rss["topk_k32"] = peak_rss("topk", 32, batch)
    rss["naive_k8"] = peak_rss("naive", 8, batch)  # naive k=32 would need ~10 GB on a shared machine
    print(json.dumps({
        "bench": "mp_sae", "d_in": D_IN, "d_sae": D_SAE, "batch": batch, "dtype": "float32", "threads": 2,
        "rounds": args.reps, "warmup_steps_each": 1,
        "tokens_per_s": {n: round(v, 1) for n, v in tps.items()},
        **{name: round(statistics.median(v), 3) for name, v in per_round.items()},
        "per_round": {name: [round(r, 3) for r in v] for name, v in per_round.items()},
        "peak_rss_gb": {n: round(v, 3) for n, v in rss.items()},
        "peak_rss_mp_over_topk_k32": round(rss["mp_k32"] / rss["topk_k32"], 2),
        "load_avg_1min": {"before": round(load_before, 2), "after": round(load_after, 2), "cores": os.cpu_count()},
    }))


if __name__ == "__main__":
    main()
