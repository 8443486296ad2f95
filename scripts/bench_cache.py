"""Caching overhead and store-reader speed (issue 2). Prints one JSON line.

- cache: `cache_activations` on SmolLM2 (hooking a middle layer) over ~20k tokens, against a bare
  forward pass of the same model up to that layer over the same batches, in the same process,
  interleaved shard by shard so both see the same machine load. Target: ratio >= 0.90.
- reader: shuffled rows/s from the store it just wrote, against the rows/s a top-k training step
  consumes on the same rows (d_sae = 8 x d_in, k = 32, batch 4096). Target: >= 10x.
- memory (`--part memory`): peak memory of `cache_activations` against corpus size, on synthetic
  .parquet corpora of N and 4N documents (~400 characters each, generated here) and a cheap pooled
  source (one hashed row per document, so the store stays small and the corpus is what grows), each
  size in a fresh process, once with `open_documents` (Arrow, streamed) and once with
  `load_documents` (a list of dicts). Reported: the peak of anonymous memory (RssAnon, sampled every
  20 ms: the heap, what the corpus costs) and VmHWM (which also counts the pages of the memory-mapped
  Arrow file the process touched: page cache the kernel can drop). Target: 4N -> <= 1.2x the peak of N.
  `prepare` is `datasets`' one-time conversion of the file into its Arrow cache (a process of its
  own, before the two caching runs, which then both read that cache); its peak is reported apart.

    python scripts/bench_cache.py [--tokens 20000] [--part all|cache|memory] [--docs 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
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


# -- memory against corpus size -------------------------------------------------------------------------
WORDS = ("the a cat dog bird fish red blue green happy sad angry calm fast slow big small runs eats sleeps "
         "over under near far house tree river road city night day rain sun wind").split()


def write_corpus(path: str, n_docs: int, seed: int = 0, group: int = 10_000) -> None:
    """A synthetic .parquet corpus (row groups of `group` documents, written one at a time): ~70
    words (~400 characters) and a label per document."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    schema = pa.schema([("text", pa.string()), ("label", pa.int64())])
    with pq.ParquetWriter(path, schema) as w:
        for lo in range(0, n_docs, group):
            n = min(group, n_docs - lo)
            w.write_table(pa.table({"text": [" ".join(rng.choices(WORDS, k=70)) for _ in range(n)],
                                    "label": [(lo + i) % 3 for i in range(n)]}, schema=schema))


class HashedPooledSource:
    """One row per document (like a pooled embedding source) from a hash of its words: no model, so
    the corpus, not a forward pass, is what the measurement sees."""

    hooks = ["pooled"]
    d_in = {"pooled": 16}

    def spec(self) -> dict:
        return {"kind": "embedding", "model": "hashed-bench", "revision": "local", "hooks": self.hooks,
                "d_in": self.d_in, "dtype": "float32"}

    def iter_batches(self, docs):
        from saekit.sources.base import ActivationBatch

        ids = torch.tensor([[hash(w) % 9973 for w in d["text"].split()[:16]] for d in docs], dtype=torch.float32)
        n = len(docs)
        yield ActivationBatch(acts={"pooled": torch.sin(ids)}, doc_id=torch.tensor([d["doc_id"] for d in docs]),
                              pos=torch.full((n,), -1, dtype=torch.int32), token_id=torch.full((n,), -1, dtype=torch.int32))


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_child(mode: str, corpus: str, root: str) -> dict:
    """Cache `corpus` (streamed or as a list) into `root`; the peaks of RssAnon and VmHWM."""
    from saekit.data.corpus import CorpusConfig, load_documents
    from saekit.data.streaming import open_documents
    from saekit.store.writer import StoreConfig, cache_activations

    peak, done = [_status_kb("RssAnon")], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak.append(_status_kb("RssAnon"))
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    cfg = CorpusConfig(name=corpus, label_fields=["label"])
    docs = open_documents(cfg) if mode in ("stream", "prepare") else load_documents(cfg)
    if mode != "prepare":
        cache_activations(HashedPooledSource(), docs, root, StoreConfig(docs_per_shard=8192))
    done.set()
    t.join()
    peak.append(_status_kb("RssAnon"))
    return {"docs": len(docs), "peak_rss_anon_mb": round(max(peak) / 1024, 1),
            "vm_hwm_mb": round(_status_kb("VmHWM") / 1024, 1)}


def memory_part(n_docs: int) -> dict:
    work = tempfile.mkdtemp(prefix="bench_cache_mem_")
    env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(work, "hf"), "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    out: dict = {"bench": "cache-memory", "corpus_docs": {}, "prepare": {}, "stream": {}, "list": {}}
    try:
        for scale in (1, 4):
            corpus = os.path.join(work, f"corpus-{scale}x.parquet")
            write_corpus(corpus, scale * n_docs)
            out["corpus_docs"][f"{scale}x"] = scale * n_docs
            out.setdefault("corpus_mb", {})[f"{scale}x"] = round(os.path.getsize(corpus) / 2**20, 1)
            for mode in ("prepare", "stream", "list"):
                res = subprocess.run([sys.executable, os.path.abspath(__file__), "--mem-child", mode, corpus,
                                      os.path.join(work, f"store-{mode}-{scale}")], env=env, check=True,
                                     capture_output=True, text=True)
                out[mode][f"{scale}x"] = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for mode in ("prepare", "stream", "list"):
        for key in ("peak_rss_anon_mb", "vm_hwm_mb"):
            out[mode][f"{key}_4x_over_1x"] = round(out[mode]["4x"][key] / out[mode]["1x"][key], 3)
    out["target_4x_over_1x"] = 1.2
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20_000, help="tokens cached by the cache part")
    ap.add_argument("--part", choices=["all", "cache", "memory"], default="all")
    ap.add_argument("--docs", type=int, default=50_000, help="documents of the smaller corpus (memory part)")
    ap.add_argument("--mem-child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mem_child:
        print(json.dumps(memory_child(*a.mem_child)))
        sys.exit(0)
    result = {}
    if a.part in ("all", "cache"):
        result.update(main(a.tokens))
    if a.part in ("all", "memory"):
        mem = memory_part(a.docs)
        result = {**result, "memory": mem} if result else mem
    print(json.dumps(result))
