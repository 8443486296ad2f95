"""Benchmark: what users run, `saekit.train(...)` with its defaults, next to the bare top-k step and
next to EleutherAI sparsify's `Trainer.fit` on the same rows. Prints ONE JSON line.

Workload (DESIGN.md §5): planted synthetic activations d_in=512, d_sae=8192, k=32, batch 4096,
2 threads. Every variant trains a fresh SAE for `--steps` steps on the same batches in the same
order (the order `TensorBatches(X, 4096)` yields), and the variants take turns, round after round,
in a rotating order, so they see the same machine load; each ratio is the median over rounds of the
per-round ratio. Variants:

* `public`: `saekit.train(TopKSAE(...), TensorBatches(X, B), TrainConfig(total_steps=N, batch_size=B, lr=...),
  run_dir)`, other defaults untouched (deterministic kernels, metrics.jsonl, the progress bar, the final
  checkpoint and final_sae/ written with fsync; the timed span is the whole call, SAE construction
  included). `public_bf16` is the same with `precision="bf16"` (only on CPUs with bf16 instructions).
  `public_fp32_dense` is the public fp32 variant with the certified bf16 pre-filter switched off
  (`SAEKIT_BF16_FILTER=0` set around that variant only): the dense float32 encoder product and top-k, the
  step `precision="bf16"` was first measured against (`bf16_over_fp32_dense`; `bf16_over_fp32` is against the
  filtered fp32 step, what fp32 users get). Present where the filter would run (bf16 instructions, filter on).
* `bare`: the kernel alone, `sae.loss(x, sae(x))`, backward, fused Adam (the same lr), on pre-drawn batches.

Schedule (`--schedule`, recorded in the JSON line as `schedule`). `sparsify` (the default): Adam at sparsify's
own width-scaled learning rate, 5e-3 / sqrt(d_sae / 16384) (7.07e-3 at d_sae 8192; what its SignSGD takes),
no warm-up (its signum path has none), saekit's linear decay over the last 20 % and gradient clipping kept.
Gao et al.'s 2e-4 / sqrt(d_sae / 16384) (saekit's default, `--schedule defaults`) is tuned for runs of
thousands of steps: over 128 steps it is what left sparsify with the better held-out FVU (0.6357 vs 0.6431);
at 7.07e-3 saekit's is lower. Init (geometric-median b_dec vs sparsify's mean) and decoder handling (both
unit-norm rows with the parallel gradient removed) did not need matching.
* `sparsify`: `sparsify.Trainer(cfg, rows, model).fit()` with its defaults (SignSGD + schedule-free,
  its own learning rate), fed by a stand-in "model" whose one layer outputs the rows (construction
  included; its stdout goes to stderr). Skipped, with a note, when eai-sparsify is not installed
  (`pip install saekit[bench]`).
* `naive` (`--naive`): a dense PyTorch top-k step, the reference of the earlier benchmark.

`fp32_topk_encoder` records the path the public fp32 variant's top-k encoder took (`bf16_filter`: the exact
float32 top-k through the certified bf16 pre-filter, `saekit.sae.kernels.native_filter`, on CPUs with bf16
instructions; `dense_fp32` with `SAEKIT_BF16_FILTER=0` or elsewhere) and its mean candidates per row.

Held-out FVU is measured on one extra planted batch never trained on (sparsify: its schedule-free
averaged weights, the ones it saves). Timing on a shared machine is noisy: read the per-round lists.

`--clock cpu` times each variant by the process's CPU time instead of the wall clock: on a machine
that other jobs load, wall-clock ratios mostly measure who got the cores; with `--threads 1` CPU time
measures the work itself (with 2+ threads it would also count OpenMP's spin-waiting). The JSON line
records the clock, the threads and the load average before and after.

    python scripts/bench_train.py [--steps 128] [--rounds 3] [--naive] [--threads 2] [--clock wall|cpu]
                                  [--schedule sparsify|defaults]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

D_IN, D_SAE, K, BATCH, N_FEATURES = 512, 8192, 32, 4096, 4096
clock = time.perf_counter  # main() switches it to time.process_time under --clock cpu
SEQ = 256  # rows per "sequence" in sparsify's data loader (its batch size counts sequences)


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
    loss = (model(x).float() - x).pow(2).sum(-1).mean()  # .float(): a no-op in fp32, the loss in fp32 under autocast
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():  # the same algorithm as saekit (Gao et al.): unit-norm decoder rows
        W = model.W_dec
        W.grad -= (W.grad * W).sum(1, keepdim=True) * W
    opt.step()
    with torch.no_grad():
        W /= W.norm(dim=1, keepdim=True)


def saekit_step(sae, opt, x):
    loss = sae.loss(x, sae(x))
    opt.zero_grad(set_to_none=True)
    loss.total.backward()
    sae.before_optimizer_step()
    opt.step()
    sae.after_optimizer_step()


# -- data ------------------------------------------------------------------------------------------------
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


def batch_order(X_ND, steps: int) -> torch.Tensor:
    """The row indices `TensorBatches(X, BATCH)` yields for `steps` batches, `[steps, BATCH]`."""
    from saekit.store.batches import TensorBatches

    src = TensorBatches(torch.arange(len(X_ND), dtype=torch.float32)[:, None], BATCH)
    return torch.stack([src.next_batch()[:, 0].long() for _ in range(steps)])


# -- variants: each returns (seconds, held-out FVU) --------------------------------------------------------
def schedule_lr(schedule: str) -> float:
    """The learning rate both saekit variants use: sparsify's signum formula or saekit's default (Gao et al.)."""
    from saekit.train.config import default_lr

    return 5e-3 / (D_SAE / 2**14) ** 0.5 if schedule == "sparsify" else default_lr(D_SAE)


def run_public(X_ND, held_BD, steps: int, work: Path, precision: str = "fp32", lr: float | None = None):
    import saekit
    from saekit.sae.topk import TopKConfig, TopKSAE
    from saekit.store.batches import TensorBatches

    run_dir = Path(tempfile.mkdtemp(dir=work))
    t = clock()
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, seed=0))
    res = saekit.train(sae, TensorBatches(X_ND, BATCH), saekit.TrainConfig(total_steps=steps, batch_size=BATCH,
                                                                           precision=precision, lr=lr), run_dir)
    dt = clock() - t
    with torch.no_grad():
        return dt, fvu(held_BD, res.sae(held_BD).recon)


def run_bare(X_ND, held_BD, steps: int, order_SB, lr: float | None = None):
    from saekit.sae.topk import TopKConfig, TopKSAE
    from saekit.train.config import default_lr

    batches = [X_ND[i] for i in order_SB]
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, seed=0))
    sae.init_from_data(batches[0])
    opt = torch.optim.Adam(sae.parameters(), lr=lr or default_lr(D_SAE), fused=True)
    t = clock()
    for x in batches:
        saekit_step(sae, opt, x)
    dt = clock() - t
    sae.eval()
    with torch.no_grad():
        return dt, fvu(held_BD, sae(held_BD).recon)


def run_naive(X_ND, held_BD, steps: int, order_SB, lr: float | None = None):
    from saekit.sae.topk import TopKConfig, TopKSAE
    from saekit.train.config import default_lr

    batches = [X_ND[i] for i in order_SB]
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, seed=0))
    sae.init_from_data(batches[0])
    model = NaiveTopK(sae.W_enc.detach(), sae.W_dec.detach(), sae.b_enc.detach(), sae.b_dec.detach(), K)
    opt = torch.optim.Adam(model.parameters(), lr=lr or default_lr(D_SAE), fused=True)
    t = clock()
    for x in batches:
        naive_step(model, opt, x)
    dt = clock() - t
    with torch.no_grad():
        return dt, fvu(held_BD, model(held_BD))


class RowModel(nn.Module):
    """What sparsify's trainer hooks: `base_model.layers.0` outputs the rows the token ids name."""

    def __init__(self, X_ND):
        super().__init__()
        self.table = X_ND
        self.layers = nn.ModuleList([nn.Identity()])
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}

    base_model = property(lambda self: self)
    device = property(lambda self: self.table.device)

    def forward(self, input_ids, **_):
        return self.layers[0](self.table[input_ids])


def run_sparsify(X_ND, held_BD, steps: int, order_SB, work: Path):
    from sparsify import SaeConfig, Trainer, TrainConfig

    seqs = order_SB.reshape(-1, SEQ)
    rows = [{"input_ids": s} for s in seqs]
    precision = torch.get_float32_matmul_precision()  # fit() sets "high"; do not let it leak into the others
    try:
        with contextlib.redirect_stdout(sys.stderr):
            t = clock()
            cfg = TrainConfig(SaeConfig(num_latents=D_SAE, k=K), batch_size=BATCH // SEQ, hookpoints=["layers.0"],
                              log_to_wandb=False, save_dir=str(Path(tempfile.mkdtemp(dir=work))))
            trainer = Trainer(cfg, rows, RowModel(X_ND))
            trainer.fit()
            dt = clock() - t
    finally:
        torch.set_float32_matmul_precision(precision)
    for opt in trainer.optimizers:  # the schedule-free averaged weights (what sparsify saves)
        getattr(opt, "eval", lambda: None)()
    sae = next(iter(trainer.saes.values()))
    with torch.no_grad():
        return dt, fvu(held_BD, sae(held_BD).sae_out)


def sparsify_version() -> str | None:
    """eai-sparsify's version, None when absent. Without CUDA its Triton decoder cannot run (Triton
    finds no driver), so its own switch selects the eager decoder; its import notes go to stderr."""
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        from importlib.metadata import version

        with contextlib.redirect_stdout(sys.stderr):
            import sparsify  # noqa: F401
        return version("eai-sparsify")
    except ImportError:
        return None


# -- main --------------------------------------------------------------------------------------------------
def main() -> None:
    from saekit.sae.kernels import native_filter
    from saekit.hardware import cpu_has_bf16

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=128, help="training steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; every variant trains once per round")
    ap.add_argument("--naive", action="store_true", help="also time the naive dense step")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 public variant")
    ap.add_argument("--threads", type=int, default=2, help="torch (and native kernel) threads")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (robust to other jobs; use with --threads 1)")
    ap.add_argument("--schedule", choices=["sparsify", "defaults"], default="sparsify",
                    help="sparsify: Adam at sparsify's learning rate 5e-3/sqrt(d_sae/16384); defaults: saekit's lr")
    a = ap.parse_args()
    lr = schedule_lr(a.schedule)
    global clock
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    n_data = max(a.steps // 8, 2)  # the run sees each row about 8 times at most, like a real short run
    train_x, held_BD = make_data(n_data)
    X_ND = train_x.reshape(-1, D_IN)
    order_SB = batch_order(X_ND, a.steps)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    atexit.register(shutil.rmtree, work, True)  # every variant's run folders (checkpoints: ~130 MB a public run)
    filter_runs: list[dict] = []  # which fp32 top-k encoder path the public fp32 variant took, per round

    def public_fp32():
        native_filter.reset_stats()
        out = run_public(X_ND, held_BD, a.steps, work, lr=lr)
        filter_runs.append(native_filter.summary())
        return out
    dense_runs: list[dict] = []  # the same for the public fp32 variant with the pre-filter switched off

    def public_fp32_dense():
        native_filter.reset_stats()
        out = _dense(lambda: run_public(X_ND, held_BD, a.steps, work, lr=lr))
        dense_runs.append(native_filter.summary())
        return out
    variants = {"public": public_fp32,
                "bare": lambda: run_bare(X_ND, held_BD, a.steps, order_SB, lr)}
    if native_filter.enabled() and cpu_has_bf16():  # else "public" already is the dense float32 step
        variants["public_fp32_dense"] = public_fp32_dense
    if cpu_has_bf16() and not a.no_bf16:
        variants["public_bf16"] = lambda: run_public(X_ND, held_BD, a.steps, work, "bf16", lr)
    notes = []
    if sparsify_version():
        variants["sparsify"] = lambda: run_sparsify(X_ND, held_BD, a.steps, order_SB, work)
    else:
        notes.append("eai-sparsify not installed (pip install saekit[bench]): no sparsify column")
    if a.naive:
        variants["naive"] = lambda: run_naive(X_ND, held_BD, a.steps, order_SB, lr)
    names = list(variants)
    # the same warm-up for each, not timed: imports (the first Adam imports torch._dynamo: seconds),
    # the native kernels' build, first-touch allocations
    warm_order = batch_order(X_ND, 2)
    for name, fn in {"public": lambda: run_public(X_ND, held_BD, 2, work),
                     **({"public_fp32_dense": lambda: _dense(lambda: run_public(X_ND, held_BD, 2, work))}
                        if "public_fp32_dense" in variants else {}),
                     "bare": lambda: run_bare(X_ND, held_BD, 2, warm_order),
                     **({"sparsify": lambda: run_sparsify(X_ND, held_BD, 2, warm_order, work)}
                        if "sparsify" in variants else {})}.items():
        fn()
    secs: dict[str, list[float]] = {n: [] for n in names}
    fvus: dict[str, list[float]] = {n: [] for n in names}
    dense_runs.clear()
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotating order
            dt, f = variants[name]()
            secs[name].append(dt)
            fvus[name].append(f)
            print(f"round {r} {name}: {a.steps * BATCH / dt:.0f} tok/s, FVU {f:.4f}", file=sys.stderr)
    med = statistics.median

    def ratio(num: str, den: str) -> float | None:  # median over rounds of den's time / num's time
        return round(med(secs[den][i] / secs[num][i] for i in range(a.rounds)), 3) if den in secs and num in secs else None

    print(json.dumps({
        "workload": {"d_in": D_IN, "d_sae": D_SAE, "k": K, "batch": BATCH, "steps": a.steps, "rounds": a.rounds,
                     "train_rows": len(X_ND), "threads": a.threads, "cpu_bf16": cpu_has_bf16()},
        "clock": a.clock,
        "schedule": {"name": a.schedule, "optimizer": "adam", "lr": round(lr, 7), "warmup_steps": 0,
                     "decay": "linear, last 20 %", "grad_clip": 1.0},
        "load_avg_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "tokens_per_s": {n: round(a.steps * BATCH / med(secs[n])) for n in names},
        "tokens_per_s_per_round": {n: [round(a.steps * BATCH / s) for s in secs[n]] for n in names},
        "public_over_bare": ratio("public", "bare"),
        "public_over_sparsify": ratio("public", "sparsify"),
        "bf16_over_fp32": ratio("public_bf16", "public"),
        "bf16_over_fp32_dense": ratio("public_bf16", "public_fp32_dense"),
        "fp32_filter_over_dense": ratio("public", "public_fp32_dense"),
        "public_bf16_over_sparsify": ratio("public_bf16", "sparsify"),
        "heldout_fvu": {n: round(med(fvus[n]), 5) for n in names},
        "fp32_topk_encoder": _filter_summary(filter_runs),
        "fp32_dense_topk_encoder": _filter_summary(dense_runs) if dense_runs else None,
        "sparsify_version": sparsify_version(),
        "notes": notes,
    }))


@contextlib.contextmanager
def bf16_filter(on: bool):
    """The certified bf16 pre-filter switched on or off inside the block (`SAEKIT_BF16_FILTER`, which
    `native_filter.enabled()` reads at every call), the variable restored after (shared by bench_filter.py
    and profile_step.py)."""
    before = os.environ.get("SAEKIT_BF16_FILTER")
    os.environ["SAEKIT_BF16_FILTER"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SAEKIT_BF16_FILTER")
        else:
            os.environ["SAEKIT_BF16_FILTER"] = before


def _dense(fn):
    """`fn()` on the dense float32 product (the pre-filter off)."""
    with bf16_filter(False):
        return fn()


def _filter_summary(runs: list[dict]) -> dict:
    """The public fp32 variant's top-k encoder path over the rounds (`saekit.sae.kernels.native_filter`: the
    certified bf16 pre-filter, or the dense float32 product; `SAEKIT_BF16_FILTER=0` forces the latter) and
    its mean candidates per row (recomputed in float32) over the timed rounds."""
    per_row = [r["candidates_per_row"] for r in runs if r["candidates_per_row"] is not None]
    return {"path": "/".join(sorted({r["path"] for r in runs})) or "none",
            "candidates_per_row": round(statistics.mean(per_row), 1) if per_row else None}


if __name__ == "__main__":
    main()
