"""Benchmark: training across processes and many SAEs from one stream. Prints ONE JSON line.

* `train_1proc_tok_s` / `train_2proc_tok_s`: top-k training (d_in 256, d_sae 4096, k 32, global
  batch 2048, planted data) with one process and with two gloo processes on this machine, each
  process with `threads / world` torch threads. Timed inside the run from step `warmup` on
  (steps/s × global batch), so process start-up and init are excluded.
* `stream_multi_tok_s` / `stream_separate_tok_s`: three SAEs trained from the MiniLM embedding
  stream (no store): one pass feeding all three (saekit.train.multi) against three separate
  streaming runs. tokens/s = SAE-rows trained (3 × steps × batch) / wall time, model time included.

    python scripts/bench_scale.py [--steps 30] [--stream-steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saekit.data.synthetic import planted_features  # noqa: E402
from saekit.store.batches import TensorBatches  # noqa: E402
from saekit.train import Callback, TrainConfig, train  # noqa: E402

D_IN, D_SAE, K, BATCH = 256, 4096, 32, 2048


class StepClock(Callback):
    """Wall time from the end of step `warmup` to the end of training."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.steps = warmup, None, None, 0

    def on_step_end(self, run, info):
        if info.step == self.warmup:
            self.t0 = time.perf_counter()
        elif info.step > self.warmup:
            self.steps += 1
            self.t1 = time.perf_counter()


def _train_tok_s(rank: int, world: int, root: str, steps: int, warmup: int, threads: int) -> float:
    from saekit.sae.topk import TopKConfig, TopKSAE

    torch.set_num_threads(max(1, threads // world))
    x = planted_features(16384, D_IN, 2048, avg_active=8, seed=0).x_ND
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    cfg = TrainConfig(total_steps=steps, batch_size=BATCH, checkpoint_every=0, log_every=10**6, progress_bar=False)
    clock = StepClock(warmup)
    train(sae, TensorBatches(x, BATCH, seed=0, rank=rank, world_size=world), cfg, Path(root) / f"w{world}",
          callbacks=[clock])
    return clock.steps * BATCH / (clock.t1 - clock.t0)


def _worker(rank: int, world: int, root: str, steps: int, warmup: int, threads: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        tok_s = _train_tok_s(rank, world, root, steps, warmup, threads)
        if rank == 0:
            Path(root, "tok_s").write_text(str(tok_s))
    finally:
        dist.destroy_process_group()


def bench_training(steps: int, warmup: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        one = _train_tok_s(0, 1, d1, steps, warmup, threads)
        torch.set_num_threads(threads)
        mp.start_processes(_worker, args=(2, d2, steps, warmup, threads), nprocs=2, start_method="spawn")
        two = float(Path(d2, "tok_s").read_text())
    return {"train_1proc_tok_s": round(one), "train_2proc_tok_s": round(two), "train_2proc_speedup": round(two / one, 3)}


def bench_stream(steps: int) -> dict:
    from saekit.data.corpus import CorpusConfig, load_documents
    from saekit.sae.registry import create
    from saekit.sources.base import SourceConfig
    from saekit.sources.embeddings import EmbeddingSource
    from saekit.run.config import MultiConfig
    from saekit.run.multi import train_multi
    from saekit.train.multi import ShuffleBuffer, stream_blocks

    docs = load_documents(CorpusConfig(max_docs=3000))
    source = EmbeddingSource(SourceConfig(kind="embedding", batch_size=64))
    hook = source.hooks[0]
    batch, capacity = 128, 512
    train_cfg = {"total_steps": steps, "batch_size": batch, "checkpoint_every": 0, "log_every": 10**6,
                 "progress_bar": False}
    saes = [{"name": f"s{i}", "sae": {"architecture": "topk", "d_sae": w, "k": k}}
            for i, (w, k) in enumerate([(1024, 16), (2048, 32), (4096, 32)])]
    with tempfile.TemporaryDirectory() as d:
        cfg = MultiConfig.from_dict({"output_dir": f"{d}/multi", "mode": "stream", "source": {"kind": "embedding"},
                                     "buffer": {"capacity_rows": capacity}, "train": train_cfg, "saes": saes})
        t0 = time.perf_counter()
        train_multi(cfg, source=source, docs=docs)
        multi_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for spec in saes:
            buf = ShuffleBuffer(lambda: (b[hook] for b in stream_blocks(source, docs)), source.d_in[hook], capacity,
                                batch)
            sae = create({"d_in": source.d_in[hook], **spec["sae"]})
            train(sae, buf, TrainConfig.from_dict(train_cfg), f"{d}/{spec['name']}")
        sep_s = time.perf_counter() - t0
    rows = len(saes) * steps * batch
    return {"stream_multi_tok_s": round(rows / multi_s), "stream_separate_tok_s": round(rows / sep_s),
            "stream_multi_speedup": round(sep_s / multi_s, 3), "stream_saes": len(saes)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--stream-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"cpus": os.cpu_count(), "threads": args.threads, "workload": f"topk d_in={D_IN} d_sae={D_SAE} k={K} "
           f"batch={BATCH}", "load_avg_1m": round(os.getloadavg()[0], 2)}
    out.update(bench_training(args.steps, args.warmup, args.threads))
    out.update(bench_stream(args.stream_steps))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
