"""Profile: where each millisecond of a top-k training step goes, for the bf16 step (`precision: bf16`), the
float32 step with the certified bf16 pre-filter and the dense float32 step. Prints ONE JSON line.

Why: `bench_train.py` says how fast each precision is; this says why, part by part, so a speed-up is aimed at
a part that is large and the ratio between two steps can be explained by what they share (the bf16 GEMM, the
selection, Adam). The step is `saekit.train.step.train_step`'s compute in the same order (forward and loss
under the precision's autocast, backward, the decoder's parallel-gradient removal, the gradient norm, clipping,
fused Adam, row renormalisation), without its bookkeeping. Workload: `bench_train.py`'s (planted rows,
d_in 512, d_sae 8192, k 32, batch 4096, Adam at sparsify's lr).

Each part is a `torch.profiler.record_function` range put around the library function that does it (patched
in here, the library is unchanged), timed by this thread's CPU clock (the machine is shared: the profiler's
wall clock measured 3x the CPU time under load); ops outside every range are timed one by one (a
`TorchDispatchMode`) and named by what they are (the encoder GEMM and the W_enc cast by op and shape), and
what is left is Python and dispatch, so the parts add up to the profiled step. `--trace` also writes the
profiler's chrome traces. The JSON line also gives each step's CPU time without any of this (`step_ms_cpu`).

    python scripts/profile_step.py [--steps 8] [--threads 1] [--trace PREFIX]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
import bench_train as bt  # noqa: E402  (the same planted data, batch order and lr as bench_train.py)

RANGES = {  # (module path, attribute) -> part name
    ("saekit.sae.kernels.native", "topk_rows"): "topk_selection",
    ("saekit.sae.kernels.native_filter", "prepare"): "filter_prep_WT_norms",
    ("saekit.sae.kernels.native_filter", "_filter_rows"): "filter_bound_candidates_recompute",
    ("saekit.sae.kernels.native", "embed_sum"): "sparse_decode",
    ("saekit.sae.kernels.sparse", "_bf16_table"): "W_dec_to_bf16",
    ("saekit.sae.kernels.native", "decode_backward"): "decoder_backward",
    ("saekit.sae.kernels.native", "sparse_t_matmul"): "encoder_weight_grad",
    ("saekit.sae.kernels.native", "remove_parallel_rows_"): "decoder_row_projection",
    ("saekit.sae.kernels.native", "unit_norm_rows_"): "decoder_row_projection",
    ("saekit.sae.topk", "squared_error_sum"): "loss",
}


class Clock:
    """CPU seconds per part: a named range's whole time (the ops inside it included), and outside every range
    each aten op's time under the name of what it is (`TorchDispatchMode`: backward ops too, on CPU the autograd
    engine runs them on this thread). One thread: this thread's CPU time is the step's."""

    def __init__(self):
        self.parts: dict[str, float] = defaultdict(float)
        self.depth = 0

    def wrap(self, fn, name):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with self.range(name):
                return fn(*args, **kwargs)
        return inner

    @contextlib.contextmanager
    def range(self, name: str):
        outer = self.depth == 0
        self.depth += 1
        t = time.thread_time()
        try:
            with record_function(name):
                yield
        finally:
            self.depth -= 1
            if outer:
                self.parts[name] += time.thread_time() - t

    def op_mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        clock = self

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if clock.depth:
                    return func(*args, **(kwargs or {}))
                t = time.thread_time()
                out = func(*args, **(kwargs or {}))
                clock.parts[_op_part(func, args)] += time.thread_time() - t
                return out
        return Ops()


def _op_part(func, args) -> str:
    """The bf16 / float32 encoder GEMM and the W_enc cast by op and shape; any other op by its name."""
    name = func.__name__.split(".")[0]
    shapes = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
    if name in ("mm", "addmm") and [bt.D_IN, bt.D_SAE] in shapes:
        return "encoder_gemm"
    if name in ("_to_copy", "copy_") and [bt.D_IN, bt.D_SAE] in shapes:
        return "W_enc_to_bf16"
    return "op:" + name


@contextlib.contextmanager
def ranges(clock: Clock):
    """Patch the library functions in RANGES with named ranges (restored after); absent ones are skipped."""
    import importlib

    saved = []
    for (mod, attr), name in RANGES.items():
        m = importlib.import_module(mod)
        if hasattr(m, attr):
            saved.append((m, attr, getattr(m, attr)))
            setattr(m, attr, clock.wrap(getattr(m, attr), name))
    try:
        yield
    finally:
        for m, attr, fn in saved:
            setattr(m, attr, fn)


def step(sae, opt, x_BD, precision: str, clock: Clock | None = None):
    """train_step's compute (saekit/train/step.py), in its order."""
    from saekit.sae.kernels import grad_sumsq
    from saekit.train.precision import autocast_for
    from saekit.train.step import clip_, grad_norm

    rng = clock.range if clock else (lambda name: contextlib.nullcontext())
    with autocast_for(precision, "cpu"):
        out = sae(x_BD)
        loss = sae.loss(x_BD, out)
    opt.zero_grad(set_to_none=True)
    with grad_sumsq.collecting():  # the norm as train_step takes it: the kernels' sums of squares
        loss.total.backward()
        sae.before_optimizer_step()
        with rng("grad_norm"):
            norm = grad_norm([q.grad for q in sae.parameters() if q.grad is not None])
            float(norm)
            clip_(sae, 1.0, norm)
    with rng("adam"):
        opt.step()
    sae.after_optimizer_step()


def make(batches, lr):
    from saekit.sae.topk import TopKConfig, TopKSAE

    sae = TopKSAE(TopKConfig(d_in=bt.D_IN, d_sae=bt.D_SAE, k=bt.K, seed=0))
    sae.init_from_data(batches[0])
    return sae, torch.optim.Adam(sae.parameters(), lr=lr, fused=True)


def profile_variant(batches, lr, precision: str, filter_on: bool, n_steps: int, trace: str | None) -> dict:
    from saekit.sae.kernels import native_filter

    with bt.bf16_filter(filter_on):
        sae, opt = make(batches, lr)
        for x in batches[:2]:  # warm-up: allocations, the workspace, Adam's state
            step(sae, opt, x, precision)
        t = time.process_time()
        for x in batches[2:2 + n_steps]:
            step(sae, opt, x, precision)
        cpu_ms = (time.process_time() - t) / n_steps * 1e3
        native_filter.reset_stats()
        clock = Clock()
        prof = profile(activities=[ProfilerActivity.CPU]) if trace else contextlib.nullcontext()
        with ranges(clock), prof, clock.op_mode():
            t = time.thread_time()
            for x in batches[2 + n_steps:2 + 2 * n_steps]:
                step(sae, opt, x, precision, clock)
            total = time.thread_time() - t
        if trace:
            prof.export_chrome_trace(f"{trace}-{precision}-{'filter' if filter_on else 'dense'}.json")
        path = native_filter.summary()["path"]
    ms = {k: v / n_steps * 1e3 for k, v in clock.parts.items()}
    named = {k: round(v, 1) for k, v in sorted(ms.items(), key=lambda kv: -kv[1]) if not k.startswith("op:")}
    ops = sorted(((k, v) for k, v in ms.items() if k.startswith("op:")), key=lambda kv: -kv[1])
    named["other_ops"] = round(sum(v for _, v in ops), 1)
    named["python_and_dispatch"] = round(total / n_steps * 1e3 - sum(ms.values()), 1)
    return {"step_ms_cpu": round(cpu_ms, 1), "profiled_step_ms_cpu": round(total / n_steps * 1e3, 1),
            "parts_ms": named, "other_ops_top_ms": {k[3:]: round(v, 2) for k, v in ops[:6]}, "encoder_path": path}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="steps timed and steps profiled per variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trace", help="also write torch.profiler chrome traces to TRACE-<variant>.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    train_x, held_BD = bt.make_data(max((2 + 2 * a.steps) // 8, 2))
    X_ND = train_x.reshape(-1, bt.D_IN)
    batches = [X_ND[i] for i in bt.batch_order(X_ND, 2 + 2 * a.steps)]
    lr = bt.schedule_lr("sparsify")
    out = {"workload": {"d_in": bt.D_IN, "d_sae": bt.D_SAE, "k": bt.K, "batch": bt.BATCH, "steps": a.steps,
                        "threads": a.threads}, "load_avg_1min": round(os.getloadavg()[0], 2)}
    for name, prec, filt in (("bf16", "bf16", True), ("fp32_filtered", "fp32", True), ("fp32_dense", "fp32", False)):
        out[name] = profile_variant(batches, lr, prec, filt, a.steps, a.trace)
        print(f"{name}: {out[name]['step_ms_cpu']} ms/step (cpu)", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
