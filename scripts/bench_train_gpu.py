"""GPU variant of bench_train.py: saekit's top-k step vs the naive dense step vs sparsify's step on one CUDA device,
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
from bench_train import NaiveTopK, naive_step, saekit_step, sparsify_version  # noqa: E402


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
    sp_step, sp_sae = sparsify_stepper(d_in, d_sae, k, xs, device, amp)
    variants = [(s_step, []), (n_step, [])] + ([(sp_step, [])] if sp_step else [])
    for i in range(3):  # warm-up (kernels, allocator)
        floor(i)
        for fn, _ in variants:
            fn(i)
    tf = []
    for i in range(steps):  # interleaved, rotating order
        for fn, acc in variants[i % len(variants):] + variants[: i % len(variants)]:
            acc.append(timed(lambda: fn(i), device))
        tf.append(timed(lambda: floor(i), device))
    ts, tn = variants[0][1], variants[1][1]
    tsp = variants[2][1] if sp_step else None
    med = statistics.median
    with torch.no_grad():
        sae.eval()
        x = xs[0]
        fvu = lambda r: float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        fvu_s, fvu_n = fvu(sae(x).recon), fvu(naive(x))
        if sp_step:
            sp_step.opt.eval()  # the schedule-free averaged weights (what sparsify saves)
        fvu_sp = fvu(sp_sae(x).sae_out) if sp_step else None
    return {"shape": f"{d_in}x{d_sae} k={k} batch={batch}", "precision": precision,
            "saekit_tok_s": round(batch / med(ts)), "naive_tok_s": round(batch / med(tn)),
            "sparsify_tok_s": round(batch / med(tsp)) if sp_step else None,
            "speedup": round(med(tn) / med(ts), 2),
            "speedup_vs_sparsify": round(med(tsp) / med(ts), 2) if sp_step else None,
            "floor_tok_s": round(batch / med(tf)),
            "fraction_of_floor": round(med(tf) / med(ts), 3), "fvu_saekit": round(fvu_s, 4), "fvu_naive": round(fvu_n, 4),
            "fvu_sparsify": round(fvu_sp, 4) if sp_step else None}


def sparsify_stepper(d_in, d_sae, k, xs, device, amp):
    """One step of sparsify's own SparseCoder with its default optimizer (SignSGD + schedule-free),
    as its trainer runs it (FVU loss, gradient projection, unit-norm decoder): `(step(i), sae)`, or
    `(None, None)` without eai-sparsify."""
    if not sparsify_version():
        return None, None
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SaeConfig, SparseCoder
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    sp = SparseCoder(d_in, SaeConfig(num_latents=d_sae, k=k), device, dtype=torch.float32)
    sp.b_dec.data = xs[0].mean(0)
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sp.parameters(), lr=5e-3 / (d_sae / 2**14) ** 0.5)]), momentum=0.95)
    opt.train()

    def step(i):
        with amp():
            out = sp(xs[i % 4])
        out.fvu.backward()
        sp.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sp.set_decoder_norm_to_unit_norm()
    step.opt = opt
    return step, sp


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
    print(json.dumps({"bench": "train_gpu", "device": name, "torch": torch.__version__, "sparsify": sparsify_version(),
                      "results": results}))


if __name__ == "__main__":
    main()
