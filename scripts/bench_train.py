"""Benchmark: saekit's top-k training step against a naive dense PyTorch step. Prints ONE JSON line.

Workload (DESIGN.md §5): planted synthetic activations d_in=512, d_sae=8192, k=32, batch 4096,
fp32, 2 threads, Adam (fused, the same settings for both). Both variants train in this process,
step by step interleaved (alternating which goes first), so they see the same machine load: the
speedup is the median of the per-step ratios. Between steps the bare encoder product `x @ W_enc`
(the floor of a top-k step) and encode-only inference are timed. Peak RSS is measured for each
variant alone in a fresh subprocess (a few steps). Both variants start from the
same initial weights, run the same algorithm (unit-norm decoder rows kept by gradient projection and
renormalisation) and see the same batches, so their FVU after the same steps should agree.
`native_kernels` says whether saekit's optional C kernels were used (`SAEKIT_NATIVE=0` turns them off).

    python scripts/bench_train.py [--steps 6] [--warmup 1]
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
    """VmHWM of this process image (ru_maxrss can carry over the parent's peak across fork/exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def setup(n_batches: int):
    from saekit.sae.topk import TopKConfig, TopKSAE

    torch.set_num_threads(2)
    torch.manual_seed(0)
    train_x, held_x = make_data(n_batches)
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, seed=0))
    sae.init_from_data(train_x[0])
    naive = NaiveTopK(sae.W_enc.detach(), sae.W_dec.detach(), sae.b_enc.detach(), sae.b_dec.detach(), K)
    lr = 2e-4 / (D_SAE / 16384) ** 0.5  # Gao et al.'s width-scaled learning rate
    opt_s = torch.optim.Adam(sae.parameters(), lr=lr, fused=True)
    opt_n = torch.optim.Adam(naive.parameters(), lr=lr, fused=True)
    return train_x, held_x, sae, opt_s, naive, opt_n


def memory_child(variant: str, steps: int) -> dict:
    """Peak RSS of `steps` training steps of one variant, alone in a fresh process."""
    train_x, _, sae, opt_s, naive, opt_n = setup(2)
    if variant == "naive":
        del sae, opt_s
        for i in range(steps):
            naive_step(naive, opt_n, train_x[i % 2])
    else:
        del naive, opt_n
        for i in range(steps):
            saekit_step(sae, opt_s, train_x[i % 2])
    return {"peak_rss_mb": peak_rss_mb()}


def main() -> None:
    from saekit.sae.kernels import native

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mem-child", choices=["naive", "saekit"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mem_child:
        print(json.dumps(memory_child(a.mem_child, a.warmup + 2)))
        return
    rss = {}  # first, while this process is still small
    for v in ("naive", "saekit"):
        res = subprocess.run([sys.executable, __file__, "--mem-child", v, "--warmup", str(a.warmup)],
                             check=True, capture_output=True, text=True)
        rss[v] = round(json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"])
    train_x, held_x, sae, opt_s, naive, opt_n = setup(4)
    batches = [train_x[i % len(train_x)] for i in range(a.warmup + a.steps)]
    t_n, t_s, t_floor, t_enc = [], [], [], []
    for i, x in enumerate(batches):  # interleaved, alternating order: both see the same machine load
        order = [("n", lambda: naive_step(naive, opt_n, x)), ("s", lambda: saekit_step(sae, opt_s, x))]
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            (t_n if name == "n" else t_s).append(timed(fn, 1)[0])
        with torch.no_grad():
            W = sae.W_enc.detach()
            t_floor.append(timed(lambda: x @ W, 1)[0])
            sae.eval()
            t_enc.append(timed(lambda: sae.encode(x), 1)[0])
            sae.train()
    t_n, t_s, t_floor, t_enc = (v[a.warmup:] for v in (t_n, t_s, t_floor, t_enc))
    with torch.no_grad():
        sae.eval()
        fvu_s, fvu_n = fvu(held_x, sae(held_x).recon), fvu(held_x, naive(held_x))
    med = statistics.median
    pair = [n / s for n, s in zip(t_n, t_s)]
    print(json.dumps({
        "workload": {"d_in": D_IN, "d_sae": D_SAE, "k": K, "batch": BATCH, "dtype": "float32", "threads": 2,
                     "optimizer": "Adam(fused)", "train_steps": a.warmup + a.steps, "timed_steps": a.steps},
        "naive_tokens_per_s": round(BATCH / med(t_n)),
        "saekit_tokens_per_s": round(BATCH / med(t_s)),
        "speedup": round(med(pair), 2),
        "speedup_per_step": [round(r, 2) for r in pair],
        "floor_tokens_per_s": round(BATCH / med(t_floor)),
        "fraction_of_encoder_floor": round(med(f / s for f, s in zip(t_floor, t_s)), 3),
        "encode_only_tokens_per_s": round(BATCH / med(t_enc)),
        "peak_rss_mb": rss,
        "fvu": {"naive": round(fvu_n, 5), "saekit": round(fvu_s, 5)},
        "native_kernels": native.library() is not None,  # False: torch fallbacks (no cc, or SAEKIT_NATIVE=0)
    }))


if __name__ == "__main__":
    main()
