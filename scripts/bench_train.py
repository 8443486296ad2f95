"""Benchmark: saekit's top-k training step against a naive dense PyTorch step. Prints ONE JSON line.

Workload (DESIGN.md §5): planted synthetic activations d_in=512, d_sae=8192, k=32, batch 4096,
fp32, 2 threads, Adam (the same optimizer settings for both). Each variant runs in its own
subprocess (so its peak RSS is its own), alternating naive/saekit for `--reps` rounds; throughput
is the median over rounds. The saekit subprocess also times the bare encoder product
`x @ W_enc` (the floor of a top-k step) and encode-only inference. Both variants start from the
same initial weights, run the same algorithm (unit-norm decoder rows kept by gradient projection and
renormalisation) and see the same batches, so their FVU after the same steps should agree.

    python scripts/bench_train.py [--reps 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

D_IN, D_SAE, K, BATCH, N_FEATURES = 512, 8192, 32, 4096, 4096


# -- the naive dense reference (plain PyTorch, no saekit) ---------------------------------------------------
class NaiveTopK(nn.Module):
    def __init__(self, W_enc, W_dec, b_enc, b_dec, k):
        super().__init__()
        self.W_enc, self.W_dec = nn.Parameter(W_enc.clone()), nn.Parameter(W_dec.clone())
        self.b_enc, self.b_dec = nn.Parameter(b_enc.clone()), nn.Parameter(b_dec.clone())
        self.k = k

    def forward(self, x):
        pre = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        vals, idx = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals)
        return z @ self.W_dec + self.b_dec


def naive_step(model, opt, x):
    loss = (model(x) - x).pow(2).sum(-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():  # the same algorithm as saekit (Gao et al.): unit-norm decoder rows
        W = model.W_dec
        W.grad -= (W.grad * W).sum(1, keepdim=True) * W
    opt.step()
    with torch.no_grad():
        W /= W.norm(dim=1, keepdim=True)


# -- saekit -----------------------------------------------------------------------------------------------
def saekit_step(sae, opt, x):
    loss = sae.loss(x, sae(x))
    opt.zero_grad(set_to_none=True)
    loss.total.backward()
    sae.before_optimizer_step()
    opt.step()
    sae.after_optimizer_step()


# -- shared ------------------------------------------------------------------------------------------------
def make_data(n_batches: int, seed: int = 0):
    """Planted activations, generated in chunks so the dense codes never get large."""
    from saekit.data.synthetic import random_dictionary, sample_codes

    g = torch.Generator().manual_seed(seed)
    D_FD = random_dictionary(N_FEATURES, D_IN, g)
    p = (torch.arange(1, N_FEATURES + 1, dtype=torch.float64) ** -0.5)
    p = (p / p.mean() * 24 / N_FEATURES).clamp(max=1.0)  # ~24 active, Zipf-like densities
    chunks = [sample_codes(1024, N_FEATURES, p, g) @ D_FD for _ in range((n_batches + 1) * BATCH // 1024)]
    x = torch.cat(chunks).view(n_batches + 1, BATCH, D_IN)
    return x[:-1].clone(), x[-1].clone()  # training batches, held-out batch


def fvu(x, recon):
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def child(variant: str, steps: int, warmup: int) -> dict:
    from saekit.sae.topk import TopKConfig, TopKSAE

    torch.set_num_threads(2)
    torch.manual_seed(0)
    train_x, held_x = make_data(4)
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, seed=0))
    sae.init_from_data(train_x[0])
    lr = 2e-4 / (D_SAE / 16384) ** 0.5  # Gao et al.'s width-scaled learning rate
    fused = {"fused": True}
    if variant == "naive":
        model = NaiveTopK(sae.W_enc.detach(), sae.W_dec.detach(), sae.b_enc.detach(), sae.b_dec.detach(), K)
        del sae
        opt = torch.optim.Adam(model.parameters(), lr=lr, **fused)
        step = lambda x: naive_step(model, opt, x)
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=lr, **fused)
        step = lambda x: saekit_step(sae, opt, x)
    it = iter(range(10**9))
    nxt = lambda: train_x[next(it) % len(train_x)]
    for _ in range(warmup):
        step(nxt())
    times = timed(lambda: step(nxt()), steps)
    with torch.no_grad():
        if variant == "naive":
            f = fvu(held_x, model(held_x))
        else:
            sae.eval()
            f = fvu(held_x, sae(held_x).recon)
    out = {"step_s": statistics.median(times), "fvu": f, "peak_rss_mb": peak_rss_mb()}
    if variant == "saekit":  # after the RSS reading: these allocate their own [B, d_sae] outputs
        x = held_x
        with torch.no_grad():
            W = sae.W_enc.detach()
            out["floor_s"] = min(timed(lambda: x @ W, 3))
            out["encode_s"] = min(timed(lambda: sae.encode(x), 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--child", choices=["naive", "saekit"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.warmup)))
        return
    runs: dict[str, list[dict]] = {"naive": [], "saekit": []}
    for _ in range(a.reps):
        for v in ("naive", "saekit"):
            cmd = [sys.executable, __file__, "--child", v, "--steps", str(a.steps), "--warmup", str(a.warmup)]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs[v].append(json.loads(res.stdout.strip().splitlines()[-1]))
    med = lambda v, key: statistics.median(r[key] for r in runs[v])
    tps = lambda s: BATCH / s
    n, s = med("naive", "step_s"), med("saekit", "step_s")
    print(json.dumps({
        "workload": {"d_in": D_IN, "d_sae": D_SAE, "k": K, "batch": BATCH, "dtype": "float32", "threads": 2,
                     "optimizer": "Adam(fused)", "steps": a.warmup + a.steps, "reps": a.reps},
        "naive_tokens_per_s": round(tps(n)),
        "saekit_tokens_per_s": round(tps(s)),
        "speedup": round(n / s, 2),
        "floor_tokens_per_s": round(tps(med("saekit", "floor_s"))),
        "fraction_of_encoder_floor": round(med("saekit", "floor_s") / s, 3),
        "encode_only_tokens_per_s": round(tps(med("saekit", "encode_s"))),
        "peak_rss_mb": {"naive": round(med("naive", "peak_rss_mb")), "saekit": round(med("saekit", "peak_rss_mb"))},
        "fvu": {"naive": round(med("naive", "fvu"), 5), "saekit": round(med("saekit", "fvu"), 5)},
        "speedup_per_rep": [round(a_["step_s"] / b_["step_s"], 2) for a_, b_ in zip(runs["naive"], runs["saekit"])],
    }))


if __name__ == "__main__":
    main()
