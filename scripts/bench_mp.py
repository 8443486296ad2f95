"""Benchmark: saekit MP-SAE training/encoding against a naive matching-pursuit SAE (same process).

Workload: d_in=512, d_sae=8192, batch 4096, fp32, 2 threads. The naive reference (kept here on
purpose) runs k steps of `(r @ D.T).max`, gather, subtract, with full autograd through the unroll,
and Adam; it is slow, so it is timed over one step after a small warm-up. Throughput ratios are
measured inside one process: every round times the naive reference and saekit's MP at k=32 back
to back (alternating which goes first), and the speedup is the median of the per-round ratios, so
both see the same load from other jobs; the 1-minute load average is reported beside it. Peak RSS
is measured per variant in a fresh subprocess. Prints ONE JSON line.

    python scripts/bench_mp.py            # full run (~2-3 min on 2 cores)
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


def throughput(batch: int, ks: list[int], reps: int, naive_k: int) -> tuple[dict, list[float]]:
    """Per-round step times of every variant in this one process, plus per-round naive/mp ratios.

    Each round times the naive reference and saekit's MP at `naive_k` back to back (alternating
    which goes first), so both see the same machine load; the speedup is the median of these
    per-round ratios. Tokens/s are medians over rounds.
    """
    x = data(batch)
    secs: dict[str, list[float]] = {}
    trainers = {f"mp_train_k{k}": Trainer("mp", k) for k in ks}
    trainers["topk_train_k32"] = Trainer("topk", 32)
    enc = trainers[f"mp_train_k{max(ks)}"].m
    for t in trainers.values():
        t.step(x)  # warm-up (Gram matrix, allocator)
    with torch.no_grad():
        enc.eval()
        enc.encode(x)
        enc.train()
    naive = Trainer("naive", naive_k)
    naive.step(x[:256])  # warm-up on a slice: the reference is ~10-20x slower
    pair = [f"naive_train_k{naive_k}", f"mp_train_k{naive_k}"]
    ratios = []
    for r in range(reps):
        names = pair if r % 2 == 0 else pair[::-1]
        for name in names:
            t = naive if name.startswith("naive") else trainers[name]
            secs.setdefault(name, []).append(timed(lambda: t.step(x)))
        ratios.append(secs[pair[0]][-1] / secs[pair[1]][-1])
        for name, t in trainers.items():
            if name not in pair:
                secs.setdefault(name, []).append(timed(lambda: t.step(x)))
        enc.eval()
        with torch.no_grad():
            secs.setdefault(f"mp_encode_k{max(ks)}", []).append(timed(lambda: enc.encode(x)))
        enc.train()
    return {name: batch / statistics.median(v) for name, v in secs.items()}, ratios


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
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=BATCH)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.k, args.batch)
    torch.set_num_threads(2)
    batch = 512 if args.quick else args.batch
    ks = [8, 16, 32]
    load_before = os.getloadavg()[0]
    tps, ratios = throughput(batch, ks, args.reps, naive_k=32)
    load_after = os.getloadavg()[0]
    rss = {f"mp_k{k}": peak_rss("mp", k, batch) for k in (8, 32)}
    rss["topk_k32"] = peak_rss("topk", 32, batch)
    rss["naive_k8"] = peak_rss("naive", 8, batch)  # naive k=32 would need ~10 GB on a shared machine
    step_s = {k: batch / tps[f"mp_train_k{k}"] for k in ks}
    print(json.dumps({
        "bench": "mp_sae", "d_in": D_IN, "d_sae": D_SAE, "batch": batch, "dtype": "float32", "threads": 2,
        "tokens_per_s": {n: round(v, 1) for n, v in tps.items()},
        "speedup_vs_naive_k32": round(statistics.median(ratios), 2),
        "speedup_per_round": [round(r, 2) for r in ratios],
        "mp_vs_topk_train_k32": round(tps["mp_train_k32"] / tps["topk_train_k32"], 3),
        "step_time_ratio_k32_over_k8": round(step_s[32] / step_s[8], 2),
        "peak_rss_gb": {n: round(v, 3) for n, v in rss.items()},
        "peak_rss_mp_over_topk_k32": round(rss["mp_k32"] / rss["topk_k32"], 2),
        "load_avg_1min": {"before": round(load_before, 2), "after": round(load_after, 2), "cores": os.cpu_count()},
    }))


if __name__ == "__main__":
    main()
