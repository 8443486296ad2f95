"""GPU variant of bench_train.py: saekit's top-k step vs the naive dense step on one CUDA device,
fp32 and bf16 autocast, on the DESIGN.md §5 workload (d_in=512, d_sae=8192, k=32, batch 4096) and on
sparsify's H200 reference shape (d_in=768, d_sae=32768, batch 8192). Prints ONE JSON line.

Both variants start from the same weights and see the same batches; steps are interleaved and
timed with CUDA synchronisation. The floor is the bare encoder product `x @ W_enc` in that precision.

    python scripts/bench_train_gpu.py [--device cuda] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import NaiveTopK, naive_step, saekit_step  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def run_shape(d_in: int, d_sae: int, k: int, batch: int, device, steps: int, precision: str) -> dict:
    from saekit.data.synthetic import planted_features
    from saekit.sae.topk import TopKConfig, TopKSAE

    torch.manual_seed(0)
    data = planted_features(batch * 4, d_in, 2 * d_in, avg_active=16, seed=0)
    xs = data.x_ND.to(device).view(4, batch, d_in)
    sae = TopKSAE(TopKConfig(d_in=d_in, d_sae=d_sae, k=k, seed=0)).to(device)
    sae.init_from_data(xs[0])
    naive = NaiveTopK(sae.W_enc.detach(), sae.W_dec.detach(), sae.b_enc.detach(), sae.b_dec.detach(), k).to(device)
    lr = 2e-4 / (d_sae / 16384) ** 0.5
    opt_s = torch.optim.Adam(sae.parameters(), lr=lr, fused=True)
    opt_n = torch.optim.Adam(naive.parameters(), lr=lr, fused=True)
    sae.train()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def s_step(i):
        with amp():
            saekit_step(sae, opt_s, xs[i % 4])

    def n_step(i):
        with amp():
            naive_step(naive, opt_n, xs[i % 4])

    W = sae.W_enc.detach().to(dtype)
    floor = lambda i: xs[i % 4].to(dtype) @ W
    for i in range(3):  # warm-up (kernels, allocator)
        s_step(i), n_step(i), floor(i)
    ts, tn, tf = [], [], []
    for i in range(steps):
        order = [(s_step, ts), (n_step, tn)] if i % 2 == 0 else [(n_step, tn), (s_step, ts)]
        for fn, acc in order:
            acc.append(timed(lambda: fn(i), device))
        tf.append(timed(lambda: floor(i), device))
    med = statistics.median
    with torch.no_grad():
        sae.eval()
        x = xs[0]
        fvu = lambda r: float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        fvu_s, fvu_n = fvu(sae(x).recon), fvu(naive(x))
    return {"shape": f"{d_in}x{d_sae} k={k} batch={batch}", "precision": precision,
            "saekit_tok_s": round(batch / med(ts)), "naive_tok_s": round(batch / med(tn)),
            "speedup": round(med(tn) / med(ts), 2), "floor_tok_s": round(batch / med(tf)),
            "fraction_of_floor": round(med(tf) / med(ts), 3), "fvu_saekit": round(fvu_s, 4), "fvu_naive": round(fvu_n, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke test of this script)")
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = [(64, 512, 8, 256)] if args.small else [(512, 8192, 32, 4096), (768, 32768, 32, 8192)]
    results = [run_shape(*s, device, args.steps, p) for s in shapes for p in ("fp32", "bf16")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"bench": "train_gpu", "device": name, "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
