"""GPU benchmark of a top-k training step: saekit with the fused Triton encoder vs saekit's torch path vs a
naive dense step vs EleutherAI sparsify's step, on one CUDA device, in one call. Prints ONE JSON line.

Default shape: sparsify's H200 reference (issue 20): d_in 768, d_sae 32768, k 32, batch 8192, bf16 autocast
(parameters and Adam state fp32). What it does, in order:

1. `codes`: before any timing, one batch is encoded by saekit's fused path and by its torch path (same SAE,
   eval mode; bf16 and fp32): the fraction of rows whose active latents agree and the largest difference of
   the dense codes (bf16: the torch path rounds the pre-activations to bf16, the fused path keeps fp32
   accumulators, so near-ties may pick different latents; fp32: only ties may differ).
2. `encoder`: the forward encoder alone, `addmm + torch.topk` vs the fused kernel (both methods, "filter" and
   "merge", for a few tile shapes), and the bare product (the floor), interleaved repetitions, medians in ms.
3. `train`: full steps (forward, loss, backward, Adam, decoder renormalisation) of every variant from the
   same weights on the same batches, in rotating order round after round, each round `--steps` steps
   between two `torch.cuda.synchronize()`; tokens/s per round and the median, then held-out FVU.
4. `public`: what users run, whole `saekit.train(...)` calls with their defaults (`--public-steps` steps,
   batches from host memory), fused path on and off in turns.

Without a CUDA device it prints `{"bench": "train_gpu", "skipped": "no CUDA device", ...}` and exits 0.
`--smoke` runs a tiny shape on the CPU instead (with TRITON_INTERPRET=1 the fused path runs in Triton's
interpreter): a check of this script, not a measurement.

    python scripts/bench_train_gpu.py [--quick] [--precision bf16|fp32] [--shape 768,32768,32,8192]
                                      [--tile 64,128,64,16,8] [--method filter|merge] [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

from bench_train import NaiveTopK, naive_step, saekit_step  # the same dense reference and steps as the CPU bench

SHAPE = (768, 32768, 32, 8192)  # d_in, d_sae, k, batch
TILE_KEYS = ("BLOCK_B", "BLOCK_F", "BLOCK_D", "TILES", "num_warps")
# default first; compiled for sm_90 (Triton 3.9) none of these spills in either method
SWEEP = {"bf16": [(64, 128, 64, 16, 8), (64, 64, 64, 32, 8), (128, 64, 64, 32, 8), (64, 64, 64, 32, 4)],
         "fp32": [(64, 64, 32, 32, 8), (64, 32, 32, 64, 8)]}


@contextlib.contextmanager
def fused(on: bool):
    """saekit's fused Triton encoder on or off (`SAEKIT_TRITON`, read at every encode)."""
    old = os.environ.get("SAEKIT_TRITON")
    os.environ["SAEKIT_TRITON"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["SAEKIT_TRITON"]
        else:
            os.environ["SAEKIT_TRITON"] = old


def sparsify_version() -> str | None:
    """eai-sparsify's version, None when absent (on a CPU its own switch selects its eager decoder)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        from importlib.metadata import version

        with contextlib.redirect_stdout(sys.stderr):
            import sparsify  # noqa: F401
        return version("eai-sparsify")
    except Exception:  # not installed, or its import fails here: the column is left out
        return None


def sparsify_stepper(d_in, d_sae, k, x0, device, amp):
    """One step of sparsify's own SparseCoder with its default optimizer (SignSGD + schedule-free), as its
    trainer runs it (FVU loss, gradient projection, unit-norm decoder): `(step(x), sae, opt)`."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SaeConfig, SparseCoder
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    sp = SparseCoder(d_in, SaeConfig(num_latents=d_sae, k=k), device, dtype=torch.float32)
    sp.b_dec.data = x0.mean(0)
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sp.parameters(), lr=5e-3 / (d_sae / 2**14) ** 0.5)]), momentum=0.95)
    opt.train()

    def step(x):
        with amp():
            out = sp(x)
        out.fvu.backward()
        sp.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sp.set_decoder_norm_to_unit_norm()
    return step, sp, opt


# -- timing -----------------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict, reps: int, device) -> dict:
    """Seconds per call of each function, `reps` rounds in rotating order: {name: [seconds, ...]}."""
    names, out = list(fns), {n: [] for n in fns}
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            out[name].append(timed(fns[name], device))
    return out


def section(fn, *args):
    """A part's result, or its error: the one JSON line is printed whatever fails."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return {"error": f"{type(e).__name__}: {e}"[:400]}


# -- the three parts ----------------------------------------------------------------------------------------------
def make_sae(d_in, d_sae, k, device, x0):
    from saekit.sae.topk import TopKConfig, TopKSAE

    sae = TopKSAE(TopKConfig(d_in=d_in, d_sae=d_sae, k=k, seed=0)).to(device)
    sae.init_from_data(x0)
    return sae


def compare_codes(sae, x, amp) -> dict:
    """Fused vs torch path on one batch: rows whose active latents agree, largest dense difference."""
    sae.eval()
    with torch.no_grad(), amp():
        with fused(True):
            a = sae.encode(x)
        with fused(False):
            b = sae.encode(x)
    za, zb = a.dense().float(), b.dense().float()
    same_BF = ((za > 0) == (zb > 0)).all(1)
    sae.train()
    return {"rows_same_latents": round(float(same_BF.float().mean()), 5), "max_abs_diff": float((za - zb).abs().max()),
            "max_abs_diff_same_latents": float((za - zb)[same_BF].abs().max()) if same_BF.any() else None,
            "max_abs_code": float(zb.abs().max())}


def encoder_bench(W_enc, b_enc, x, k, dtype, reps, tiles, device) -> dict:
    from saekit.sae.kernels import triton_topk

    xd, Wd = x.to(dtype), W_enc.detach().to(dtype)
    b = b_enc.detach()
    bf16 = dtype == torch.bfloat16
    fns = {"torch": lambda: torch.addmm(b.to(dtype), xd, Wd).topk(k, dim=1, sorted=False),
           "floor": lambda: xd @ Wd}
    errors = {}
    for method in ("filter", "merge"):
        for t in tiles:
            tile, name = dict(zip(TILE_KEYS, t)), method + " " + ",".join(map(str, t))
            fn = lambda tile=tile, method=method: triton_topk.topk_pre(xd, Wd, b, k, bf16=bf16, tile=tile, method=method)
            try:
                fn()  # compile (and check it runs) before timing
                fns["fused " + name] = fn
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory / registers for this tile
                errors[name] = f"{type(e).__name__}: {e}"[:200]
    for fn in fns.values():
        fn()
    times = interleaved(fns, reps, device)
    ms = {n: round(1e3 * statistics.median(v), 3) for n, v in times.items()}
    fused_ms = {n[6:]: v for n, v in ms.items() if n.startswith("fused ")}
    best = min(fused_ms, key=fused_ms.get) if fused_ms else None
    return {"torch_ms": ms["torch"], "floor_ms": ms["floor"], "fused_ms": fused_ms, "best_tile": best,
            "torch_over_best_fused": round(ms["torch"] / fused_ms[best], 3) if best else None, "tile_errors": errors}


def train_bench(shape, xs, held, device, precision, steps, rounds, warmup) -> dict:
    d_in, d_sae, k, batch = shape
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    sae_f, sae_t = make_sae(d_in, d_sae, k, device, xs[0]), make_sae(d_in, d_sae, k, device, xs[0])
    naive = NaiveTopK(sae_f.W_enc.detach(), sae_f.W_dec.detach(), sae_f.b_enc.detach(), sae_f.b_dec.detach(), k)
    naive = naive.to(device)
    lr = 2e-4 / (d_sae / 16384) ** 0.5
    fused_adam = device.type == "cuda"
    opts = {n: torch.optim.Adam(m.parameters(), lr=lr, fused=fused_adam) for n, m in
            (("fused", sae_f), ("torch", sae_t), ("naive", naive))}
    pos = {"i": 0}

    def run(step, *a, fused_on=None):
        def go():
            for _ in range(steps):
                x = xs[pos["i"] % len(xs)]
                pos["i"] += 1
                with amp(), (fused(fused_on) if fused_on is not None else contextlib.nullcontext()):
                    step(*a, x)
        return go
    variants = {"saekit_fused": run(saekit_step, sae_f, opts["fused"], fused_on=True),
                "saekit_torch": run(saekit_step, sae_t, opts["torch"], fused_on=False),
                "naive": run(naive_step, naive, opts["naive"])}
    sp = None
    if sparsify_version():
        sp_step, sp, sp_opt = sparsify_stepper(d_in, d_sae, k, xs[0], device, amp)
        variants["sparsify"] = lambda: [sp_step(xs[i % len(xs)]) for i in range(steps)]
    for fn in variants.values():  # warm-up: Triton compilation, cuBLAS heuristics, the allocator
        for _ in range(warmup):
            fn()
    times = interleaved(variants, rounds, device)
    tok = {n: [round(steps * batch / t) for t in v] for n, v in times.items()}
    med = {n: statistics.median(v) for n, v in tok.items()}
    fvu = lambda r: float((held - r.float()).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    with torch.no_grad():
        sae_f.eval(), sae_t.eval()
        with fused(True):
            fvus = {"saekit_fused": fvu(sae_f(held).recon)}
        with fused(False):
            fvus["saekit_torch"] = fvu(sae_t(held).recon)
        fvus["naive"] = fvu(naive(held))
        if sp is not None:
            sp_opt.eval()  # the schedule-free averaged weights (what sparsify saves)
            fvus["sparsify"] = fvu(sp(held).sae_out)
    ratio = lambda a, b: round(med[a] / med[b], 3) if a in med and b in med else None
    return {"tokens_per_s": {n: round(v) for n, v in med.items()}, "per_round": tok,
            "fused_over_torch": ratio("saekit_fused", "saekit_torch"), "fused_over_naive": ratio("saekit_fused", "naive"),
            "fused_over_sparsify": ratio("saekit_fused", "sparsify"), "heldout_fvu": {n: round(v, 5) for n, v in fvus.items()},
            "dead_fraction_fused": round(sae_f.dead_fraction(), 4)}


def public_bench(shape, data_cpu, held, device, precision, steps, rounds) -> dict:
    """What users run: `saekit.train(TopKSAE(...).to(device), TensorBatches(X), TrainConfig(...), run_dir)` with its
    defaults (deterministic kernels, metrics, final checkpoint; batches from host memory), fused on and off in
    turns; the timed span is the whole call. Tokens/s per run and their median, then held-out FVU."""
    import tempfile

    import saekit
    from saekit.sae.topk import TopKConfig, TopKSAE
    from saekit.store.batches import TensorBatches

    d_in, d_sae, k, batch = shape
    out = {"fused": [], "torch": []}
    fvus = {}
    with tempfile.TemporaryDirectory() as work:
        for r in range(rounds):
            for name in (("fused", "torch") if r % 2 == 0 else ("torch", "fused")):
                sae = TopKSAE(TopKConfig(d_in=d_in, d_sae=d_sae, k=k, seed=0)).to(device)
                cfg = saekit.TrainConfig(total_steps=steps, batch_size=batch, precision=precision)
                with fused(name == "fused"), contextlib.redirect_stdout(sys.stderr):
                    sync(device)
                    t = time.perf_counter()
                    res = saekit.train(sae, TensorBatches(data_cpu, batch), cfg, tempfile.mkdtemp(dir=work))
                    sync(device)
                    out[name].append(round(steps * batch / (time.perf_counter() - t)))
                    with torch.no_grad():
                        recon = res.sae.eval()(held).recon.float()
                fvus[name] = round(float((held - recon).pow(2).sum() / (held - held.mean(0)).pow(2).sum()), 5)
    med = {n: statistics.median(v) for n, v in out.items()}
    return {"steps": steps, "tokens_per_s": {n: round(v) for n, v in med.items()}, "per_round": out,
            "fused_over_torch": round(med["fused"] / med["torch"], 3), "heldout_fvu": fvus}


# -- main ---------------------------------------------------------------------------------------------------------
def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default=",".join(map(str, SHAPE)), help="d_in,d_sae,k,batch")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--public-steps", type=int, default=100, help="steps of each saekit.train call (section public)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up step batches per variant")
    ap.add_argument("--tile", default=None, help="BLOCK_B,BLOCK_F,BLOCK_D,TILES,num_warps for training (default: the "
                                                 "module's, triton_topk.TILE)")
    ap.add_argument("--method", choices=["filter", "merge"], default=None,
                    help="the fused encoder's method for training (default: the module's, triton_topk.METHOD)")
    ap.add_argument("--quick", action="store_true", help="few steps and rounds, one tile: checks the script runs")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (fused path under TRITON_INTERPRET=1)")
    return ap.parse_args()


def setup(args):
    """`(device, shape, tiles)`; the fused path forced on for CPU tensors in a `--smoke` run under the
    interpreter (saekit dispatches it on CUDA only)."""
    from saekit.sae.kernels import triton_topk

    device = torch.device("cpu" if args.smoke else args.device)
    shape = (32, 1024, 8, 48) if args.smoke else tuple(int(v) for v in args.shape.split(","))
    if args.quick or args.smoke:
        args.steps, args.rounds, args.warmup = min(args.steps, 3), min(args.rounds, 2), 1
    if args.method:
        triton_topk.METHOD = args.method
    if args.tile:
        triton_topk.TILE[args.precision].update(zip(TILE_KEYS, map(int, args.tile.split(","))))
    if args.smoke and triton_topk.INTERPRET:
        triton_topk.applies = lambda x, k: os.environ.get("SAEKIT_TRITON", "0") == "1" and triton_topk.available(x)
    sweep = SWEEP[args.precision]
    tiles = [(16, 16, 16, 2, 4)] if args.smoke else sweep[:1] if args.quick else sweep
    return device, shape, tiles


def main() -> None:
    args = parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print(json.dumps({"bench": "train_gpu", "skipped": "no CUDA device", "torch": torch.__version__}))
        return
    from saekit.data.synthetic import planted_features
    from saekit.sae.kernels import triton_topk

    device, shape, tiles = setup(args)
    d_in, d_sae, k, batch = shape
    torch.manual_seed(0)
    data = planted_features(batch * 5, d_in, 2 * d_in, avg_active=16, seed=0).x_ND.to(device)
    xs, held = list(data[: 4 * batch].view(4, batch, d_in)), data[4 * batch:]
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    amp = lambda p: (lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=p == "bf16"))
    sae = make_sae(d_in, d_sae, k, device, xs[0])
    out = {"bench": "train_gpu", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "triton": getattr(triton_topk.triton, "__version__", None),
           "sparsify": sparsify_version(), "shape": dict(zip(("d_in", "d_sae", "k", "batch"), shape)),
           "precision": args.precision, "fused_path_applies": triton_topk.applies(xs[0], k),
           "method": triton_topk.METHOD,
           "tile": triton_topk.TILE_INTERPRET if triton_topk.INTERPRET else triton_topk.TILE[args.precision]}
    out["codes"] = {p: section(compare_codes, sae, xs[0], amp(p)) for p in ("bf16", "fp32")}
    out["encoder"] = section(encoder_bench, sae.W_enc, sae.b_enc, xs[0] - sae.b_dec.detach(), k, dtype,
                             2 if args.smoke else max(args.rounds * 4, 5), tiles, device)
    del sae
    out["train"] = section(train_bench, shape, xs, held, device, args.precision, args.steps, args.rounds, args.warmup)
    public_steps = 4 if args.smoke else 20 if args.quick else args.public_steps
    out["public"] = section(public_bench, shape, data[: 4 * batch].cpu(), held, device, args.precision, public_steps,
                            2 if args.quick or args.smoke else 3)
    out["settings"] = {"steps": args.steps, "rounds": args.rounds, "warmup": args.warmup}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
