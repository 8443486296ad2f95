"""Benchmark: what `saekit.train(...)` adds around the bare step, measured inside the same run. Prints ONE JSON line.

Why: on a shared machine `bench_train.py`'s public/bare ratio compares two runs that met different loads; a 2 %
cost drowns in it. Here one `saekit.train` run (bench_train's workload and defaults, SAE construction included, as
`bench_train.run_public` times it) is timed whole, and the parts the bare step also runs (SAE forward and loss,
zero_grad, backward, before/after_optimizer_step, the Adam step) are timed inside it, on the same clock;
`public_over_bare_est = shared / total` is the ratio without the run-to-run noise (it assumes those parts cost what
they cost in the bare loop). Also the final checkpoint's and `final_sae/`'s CPU and wall time, measured directly,
and `pieces_ms_per_step`: what the public path adds, piece by piece (the batch gather, its finiteness check, the
gradient norm, clipping, callbacks, the fresh start with its data-dependent init, checkpoints; `other` is the rest:
SAE construction, the loop's bookkeeping, `final_sae/`), each piece's clock time over the run divided by the steps.

    python scripts/bench_train_overhead.py [--steps 128] [--rounds 1] [--threads 1] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402


def timed(owner, name: str, sink: list, clock) -> None:
    """Replace `owner.name` by a wrapper that appends (clock, wall) seconds of every call to `sink`."""
    f = getattr(owner, name)

    def wrapper(*a, **k):
        c, w = clock(), time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            sink.append((clock() - c, time.perf_counter() - w))
    setattr(owner, name, wrapper)


def run_public(X_ND: torch.Tensor, steps: int, work: Path, clock) -> float:
    """`bench_train.run_public`'s timed span (SAE construction + `saekit.train` with its defaults), without
    its held-out forward afterwards, which would otherwise count among the shared parts."""
    import saekit
    from saekit.sae.topk import TopKConfig, TopKSAE
    from saekit.store.batches import TensorBatches

    run_dir = Path(tempfile.mkdtemp(dir=work))
    t = clock()
    sae = TopKSAE(TopKConfig(d_in=bt.D_IN, d_sae=bt.D_SAE, k=bt.K, seed=0))
    saekit.train(sae, TensorBatches(X_ND, bt.BATCH), saekit.TrainConfig(total_steps=steps, batch_size=bt.BATCH,
                                                                        lr=bt.schedule_lr("sparsify")), run_dir)
    return clock() - t


def piece_timers(clock) -> dict[str, list]:
    """Wrap the parts `saekit.train` runs around the bare step; returns piece -> list of (clock, wall) per call."""
    import saekit.train.callbacks as cb
    import saekit.train.loop as loop
    import saekit.train.step as st
    from saekit.store.batches import TensorBatches

    pieces: dict[str, list] = {k: [] for k in ("batch_gather", "batch_check", "grad_norm", "clip", "callbacks",
                                               "fresh_start", "checkpoints")}
    # saekit before the kernels' sums of squares called get_total_norm directly: time that as the norm there
    norm = (st, "grad_norm") if hasattr(st, "grad_norm") else (torch.nn.utils, "get_total_norm")
    for owner, name, key in [(TensorBatches, "next_batch", "batch_gather"), (st, "batch_bad_rows", "batch_check"),
                             (*norm, "grad_norm"), (st, "clip_", "clip"),
                             (cb.MetricsLogger, "on_step_end", "callbacks"), (cb.ProgressBar, "on_step_end", "callbacks"),
                             (loop, "_fresh_start", "fresh_start"), (loop.Trainer, "checkpoint", "checkpoints")]:
        timed(owner, name, pieces[key], clock)
    return pieces


def main() -> None:
    import saekit.train.checkpoint as ck
    import saekit.train.loop as loop
    from saekit.sae.topk import TopKSAE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    shared: list = []
    for owner, name in [(TopKSAE, "forward"), (TopKSAE, "loss"), (torch.Tensor, "backward"),
                        (TopKSAE, "before_optimizer_step"), (TopKSAE, "after_optimizer_step"),
                        (torch.optim.Adam, "step"), (torch.optim.Adam, "zero_grad")]:
        timed(owner, name, shared, clock)
    writes: dict[str, list] = {"final_checkpoint": [], "final_sae": []}
    timed(ck, "save_checkpoint", writes["final_checkpoint"], clock)
    timed(loop, "save_sae", writes["final_sae"], clock)
    pieces = piece_timers(clock)
    train_x, _ = bt.make_data(max(a.steps // 8, 2))
    X_ND = train_x.reshape(-1, bt.D_IN)
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    load = os.getloadavg()
    try:
        run_public(X_ND, 2, work, clock)  # warm-up: imports, native kernels, first-touch allocations
        rounds = []
        for _ in range(a.rounds):
            for sink in (shared, *writes.values(), *pieces.values()):
                sink.clear()
            total = run_public(X_ND, a.steps, work, clock)
            inside = sum(c for c, _ in shared)
            per_step = {k: sum(c for c, _ in v) / a.steps * 1e3 for k, v in pieces.items()}
            per_step["other"] = (total - inside) / a.steps * 1e3 - sum(per_step.values())
            rounds.append({"total_s": round(total, 3), "shared_s": round(inside, 3),
                           "public_over_bare_est": round(inside / total, 4),
                           "overhead_ms_per_step": round((total - inside) / a.steps * 1e3, 2),
                           **{k: {"clock_s": round(v[-1][0], 4), "wall_s": round(v[-1][1], 4)} for k, v in writes.items()},
                           "pieces_ms_per_step": {k: round(v, 2) for k, v in per_step.items()}})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"workload": {"d_in": bt.D_IN, "d_sae": bt.D_SAE, "k": bt.K, "batch": bt.BATCH, "steps": a.steps,
                                   "threads": a.threads}, "clock": a.clock,
                      "load_avg_1min": {"before": round(load[0], 2), "after": round(os.getloadavg()[0], 2)},
                      "public_over_bare_est": statistics.median(r["public_over_bare_est"] for r in rounds),
                      "pieces_ms_per_step_median": {k: statistics.median(r["pieces_ms_per_step"][k] for r in rounds)
                                                    for k in rounds[0]["pieces_ms_per_step"]},
                      "rounds": rounds}))


if __name__ == "__main__":
    main()
