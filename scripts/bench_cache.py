"""Caching overhead and store-reader speed (issue 2). Prints one JSON line.

- cache: `cache_activations` on SmolLM2 (hooking a middle layer) over ~20k tokens, against a bare
  forward pass of the same model up to that layer over the same batches, in the same process,
  interleaved shard by shard so both see the same machine load. Target: ratio >= 0.90.
- reader: shuffled rows/s from the store it just wrote, against the rows/s a top-k training step
  consumes on the same rows (d_sae = 8 x d_in, k = 32, batch 4096). Target: >= 10x.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@torch.no_grad()
def bare_forward(src, docs, per_shard, cfg, hook) -> int:
    """The same batches (length-sorted within shards, as the cache does) through the model up to the hook."""
    from saekit.sources.hf import tokenize
    from saekit.sources.hooks import hook_point, run_until_stop

    tokens = 0
    for i in range(0, len(docs), per_shard):
        shard = sorted(docs[i: i + per_shard], key=lambda d: len(d["text"]))
        for j in range(0, len(shard), cfg.batch_size):
            enc = tokenize(src.tok, [d["text"] for d in shard[j: j + cfg.batch_size]], cfg)
            tokens += int(enc["attention_mask"].sum())
            with hook_point(src.model, hook, lambda t: None, stop=True):
                run_until_stop(lambda: src.model(**enc, use_cache=False))
    return tokens


def main(target_tokens: int = 20_000, layer: int = 15) -> dict:
    from saekit.data.corpus import CorpusConfig, load_documents
    from saekit.sae.registry import create
    from saekit.sources.base import SourceConfig
    from saekit.sources.hf import HFSource
    from saekit.store.reader import ActivationStore
    from saekit.store.writer import StoreConfig, cache_activations

    torch.set_num_threads(2)
    hook = f"model.layers.{layer}"
    cfg = SourceConfig(kind="hf", hooks=[hook], max_length=64, batch_size=32)
    src = HFSource(cfg)
    docs = load_documents(CorpusConfig(max_docs=1200))
    n_docs = max(64, int(target_tokens / 30))  # tweets average ~30 tokens
    docs = docs[:n_docs]
    per_shard = 128
    root = tempfile.mkdtemp(prefix="bench_cache_")
    t_cache = t_bare = 0.0
    tokens = 0
    try:
        for rnd in range(2):  # A B A B: caching and the bare forward alternate, so both see the same load
            t0 = time.perf_counter()
            cache_activations(src, docs, os.path.join(root, f"r{rnd}"), StoreConfig(docs_per_shard=per_shard))
            t_cache += time.perf_counter() - t0
            t0 = time.perf_counter()
            tokens += bare_forward(src, docs, per_shard, cfg, hook)
            t_bare += time.perf_counter() - t0
        store = ActivationStore(os.path.join(root, "r0", hook))
        rows = len(store)
        reader = store.batches(4096, seed=0)
        n_batches = 20
        t0 = time.perf_counter()
        for _ in range(n_batches):
            reader.next_batch()
        reader_rows_s = n_batches * 4096 / (time.perf_counter() - t0)
        sae = create({"architecture": "topk", "d_in": store.d_in, "d_sae": 8 * store.d_in, "k": 32})
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
        x = reader.next_batch()
        sae.train()
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            out = sae(x)
            loss = sae.loss(x, out).total
            opt.zero_grad()
            loss.backward()
            sae.before_optimizer_step()
            opt.step()
            sae.after_optimizer_step()
            times.append(time.perf_counter() - t0)
        train_rows_s = 4096 / sorted(times)[len(times) // 2]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "bench": "cache", "model": "SmolLM2-135M-Instruct (embedded)", "hook": hook, "tokens": tokens,
        "store_rows": rows, "cache_tokens_per_s": round(2 * rows / t_cache, 1),
        "bare_forward_tokens_per_s": round(tokens / t_bare, 1), "cache_over_bare_ratio": round((2 * rows / t_cache) / (tokens / t_bare), 3),
        "target_ratio": 0.9, "reader_shuffled_rows_per_s": round(reader_rows_s), "train_rows_per_s": round(train_rows_s),
        "reader_over_train_ratio": round(reader_rows_s / train_rows_s, 1), "target_reader_ratio": 10,
        "load_avg_1m": os.getloadavg()[0], "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)))
