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
- precision (`--part precision`): `cache_activations` with `source.forward_dtype` float32 and bfloat16
  (bf16 autocast), interleaved round by round (the order alternates), on the same documents (held out
  of the main job's 3,000: documents 3000.. of the packaged corpus order), with the embedded SmolLM2
  (layer 15, max_length 64, batch 32, as the main job) and with MiniLM (pooled, batch 128). Reported:
  tokens/s both ways and their ratio, on the wall clock and per CPU-second of the process (the work
  itself: on a shared machine the wall clock partly measures who had the cores); per-row relative error ||a_bf16 - a_fp32|| / ||a_fp32|| (median,
  p99, max) over all rows, the ordinary rows, the massive-activation rows (the store's `outlier`
  column, `saekit.store.outliers`) and the first tokens after BOS (pos 1) apart; the cosine (median, p1,
  min); the three worst rows. With `--sae FOLDER` (an SAE
  trained on fp32 rows of that hook, e.g. the main job's train/final_sae), its FVU on the fp32 and the
  bf16 rows of the same tokens (ordinary rows, as the main job's headline) and their difference, each
  with a 95 % document-bootstrap interval (paired: the same resamples for both).

    python scripts/bench_cache.py [--tokens 20000] [--part all|cache|memory|precision] [--docs 50000]
                                  [--precision-docs 600] [--rounds 2] [--sae RUN/train/final_sae]
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


# -- bf16 caching forward against fp32 ---------------------------------------------------------------
def _timed_cache(cfg_kw: dict, docs: list[dict], root: str, model=None) -> tuple:
    """(store, (wall seconds, CPU seconds of the process)) of one caching run with the given source config."""
    from saekit.sources.base import SourceConfig
    from saekit.sources.embeddings import EmbeddingSource
    from saekit.sources.hf import HFSource
    from saekit.store.reader import ActivationStore
    from saekit.store.writer import StoreConfig, cache_activations

    cfg = SourceConfig(**cfg_kw)
    src = EmbeddingSource(cfg, model[0]) if cfg.kind == "embedding" else HFSource(cfg, *model)
    t0, c0 = time.perf_counter(), time.process_time()
    paths = cache_activations(src, docs, root, StoreConfig(docs_per_shard=200))
    seconds = (time.perf_counter() - t0, time.process_time() - c0)
    return ActivationStore(next(iter(paths.values()))), seconds


def _quantiles(v: torch.Tensor) -> dict:
    if v.numel() == 0:
        return {"rows": 0}
    q = torch.quantile(v.double(), torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
    return {"rows": int(v.numel()), "median": round(q[0], 6), "p99": round(q[1], 6), "max": round(float(v.max()), 6),
            "over_0.1": int((v > 0.1).sum())}


def row_errors(a_ND: torch.Tensor, ref_ND: torch.Tensor, outlier_N: torch.Tensor, pos_N: torch.Tensor) -> dict:
    """Per-row relative error of `a` against `ref` (all rows, ordinary, outliers, the first token after BOS
    where the massive activations form) and the cosine."""
    a_ND, ref_ND = a_ND.double(), ref_ND.double()
    rel_N = (a_ND - ref_ND).norm(dim=1) / ref_ND.norm(dim=1).clamp_min(1e-30)
    cos_N = torch.nn.functional.cosine_similarity(a_ND, ref_ND, dim=1)
    out = outlier_N.bool()
    q = torch.quantile(cos_N, torch.tensor([0.5, 0.01], dtype=torch.float64)).tolist()
    return {"rel_err": _quantiles(rel_N), "rel_err_ordinary": _quantiles(rel_N[~out]),
            "rel_err_outliers": _quantiles(rel_N[out]), "rel_err_pos1": _quantiles(rel_N[pos_N == 1]),
            "cosine": {"median": round(q[0], 7), "p1": round(q[1], 7), "min": round(float(cos_N.min()), 7)}}


@torch.no_grad()
def fvu_pair(sae, x32_ND: torch.Tensor, x16_ND: torch.Tensor, doc_N: torch.Tensor) -> dict:
    """FVU of `sae` on the fp32 and the bf16 rows and bf16 - fp32, 95 % document-bootstrap intervals
    (the same resamples for both, so the difference's interval is paired)."""
    from saekit.eval.bootstrap import Bootstrap, fvu_from_sums

    _, doc_G = torch.unique(doc_N, return_inverse=True)
    G = int(doc_G.max()) + 1
    stats = {}
    for tag, x_ND in (("a", x32_ND), ("b", x16_ND)):
        x_ND = x_ND.float()
        recon_ND = torch.cat([sae(x_ND[i: i + 4096]).recon for i in range(0, len(x_ND), 4096)])
        xc_ND = (x_ND - x32_ND.float().mean(0)).double()  # one fixed shift for both (FVU does not depend on it)
        for key, val in (("sse", ((recon_ND - x_ND).double() ** 2).sum(1)), ("sumsq", (xc_ND ** 2).sum(1)),
                         ("n", torch.ones(len(x_ND), dtype=torch.float64))):
            stats[f"{tag}_{key}"] = torch.zeros(G, dtype=torch.float64).index_add_(0, doc_G, val)
        stats[f"{tag}_sum_x"] = torch.zeros(G, xc_ND.shape[1], dtype=torch.float64).index_add_(0, doc_G, xc_ND)

    def fvu(s, tag):
        return fvu_from_sums({k: s[f"{tag}_{k}"] for k in ("sse", "sum_x", "sumsq", "n")})
    full = {k: v.sum(0, keepdim=True) for k, v in stats.items()}
    boot = Bootstrap(G, resamples=1000, seed=0)
    ci = {name: boot.ci(fn, stats) for name, fn in (("fp32", lambda s: fvu(s, "a")), ("bf16", lambda s: fvu(s, "b")),
                                                     ("bf16_minus_fp32", lambda s: fvu(s, "b") - fvu(s, "a")))}
    point = {"fp32": float(fvu(full, "a")[0]), "bf16": float(fvu(full, "b")[0])}
    point["bf16_minus_fp32"] = point["bf16"] - point["fp32"]
    return {"rows": len(x32_ND), "documents": G, **{k: round(v, 6) for k, v in point.items()},
            "ci95": {k: [round(x, 6) for x in v] for k, v in ci.items()}, "bootstrap": boot.describe("document")}


def precision_model(name: str, cfg_kw: dict, docs: list[dict], rounds: int, root: str, model) -> tuple:
    """fp32 and bf16 caching of `docs`, interleaved; (summary, fp32 store, bf16 store)."""
    secs, cpu, stores = {"float32": 0.0, "bfloat16": 0.0}, {"float32": 0.0, "bfloat16": 0.0}, {}
    for rnd in range(rounds):
        order = ("float32", "bfloat16") if rnd % 2 == 0 else ("bfloat16", "float32")
        for fd in order:
            store, t = _timed_cache({**cfg_kw, "forward_dtype": fd}, docs, os.path.join(root, f"{name}-{fd}-{rnd}"),
                                    model)
            secs[fd] += t[0]
            cpu[fd] += t[1]
            stores.setdefault(fd, store)
    ref, low = stores["float32"], stores["bfloat16"]
    a32, a16 = ref[:], low[:]
    assert torch.equal(ref.meta("doc_id"), low.meta("doc_id")) and torch.equal(ref.meta("pos"), low.meta("pos"))
    rows = len(ref)
    tok_s = {fd: round(rounds * rows / s, 1) for fd, s in secs.items()}
    tok_cpu_s = {fd: round(rounds * rows / s, 1) for fd, s in cpu.items()}
    unit = "documents" if cfg_kw["kind"] == "embedding" else "tokens"  # a pooled row is a document
    summary = {"rows": rows, f"{unit}_per_s": tok_s, "bf16_over_fp32": round(tok_s["bfloat16"] / tok_s["float32"], 3),
               f"{unit}_per_cpu_s": tok_cpu_s,
               "bf16_over_fp32_cpu_time": round(tok_cpu_s["bfloat16"] / tok_cpu_s["float32"], 3),
               "manifest_forward_dtype": low.manifest.source.get("forward_dtype"),
               "bit_identical": bool(torch.equal(a32, a16)),
               **row_errors(a16, a32, ref.meta("outlier"), ref.meta("pos")), "worst_rows": worst_rows(a16, a32, ref.meta("pos"))}
    return summary, ref, low


def worst_rows(a_ND: torch.Tensor, ref_ND: torch.Tensor, pos_N: torch.Tensor, n: int = 3) -> list[dict]:
    """The `n` rows with the largest relative error: position, norm over the median norm, error."""
    norm_N = ref_ND.double().norm(dim=1)
    rel_N = (a_ND.double() - ref_ND.double()).norm(dim=1) / norm_N.clamp_min(1e-30)
    return [{"pos": int(pos_N[i]), "norm_over_median": round(float(norm_N[i] / norm_N.median()), 2),
             "rel_err": round(float(rel_N[i]), 4)} for i in rel_N.argsort(descending=True)[:n].tolist()]


def precision_part(n_docs: int = 600, rounds: int = 2, sae_path: str | None = None, layer: int = 15) -> dict:
    from saekit.data.corpus import CorpusConfig, load_documents
    from saekit.sources.models import load_embedder, load_lm

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    docs = load_documents(CorpusConfig(max_docs=3000 + n_docs))[3000:]
    root = tempfile.mkdtemp(prefix="bench_cache_prec_")
    hook = f"model.layers.{layer}"
    out: dict = {"bench": "cache-precision", "documents": len(docs), "rounds": rounds,
                 "method": "torch.autocast bf16 (fp32 weights)", "threads": torch.get_num_threads(),
                 "load_avg_1m": {"before": os.getloadavg()[0]}}
    try:
        llm, ref, low = precision_model("smollm2", dict(kind="hf", hooks=[hook], max_length=64, batch_size=32),
                                        docs, rounds, root, load_lm("default"))
        if sae_path:
            from saekit import load_sae

            keep = ~ref.meta("outlier").bool()
            llm["sae_fvu_ordinary_rows"] = {"sae": os.path.basename(os.path.normpath(sae_path)), **fvu_pair(
                load_sae(sae_path), ref[:][keep], low[:][keep], ref.meta("doc_id")[keep])}
        out["smollm2_layer%d" % layer] = llm
        out["minilm"] = precision_model("minilm", dict(kind="embedding", batch_size=128), docs, rounds, root,
                                        (load_embedder("default"),))[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["load_avg_1m"]["after"] = os.getloadavg()[0]
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20_000, help="tokens cached by the cache part")
    ap.add_argument("--part", choices=["all", "cache", "memory", "precision"], default="all")
    ap.add_argument("--precision-docs", type=int, default=600, help="documents cached each way (precision part)")
    ap.add_argument("--rounds", type=int, default=2, help="fp32/bf16 rounds, interleaved (precision part)")
    ap.add_argument("--sae", default=None, help="SAE folder trained on fp32 rows of layer 15 (precision part: FVU)")
    ap.add_argument("--docs", type=int, default=50_000, help="documents of the smaller corpus (memory part)")
    ap.add_argument("--mem-child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mem_child:
        print(json.dumps(memory_child(*a.mem_child)))
        sys.exit(0)
    result = {}
    if a.part == "precision":
        print(json.dumps(precision_part(a.precision_docs, a.rounds, a.sae)))
        sys.exit(0)
    if a.part in ("all", "cache"):
        result.update(main(a.tokens))
    if a.part in ("all", "memory"):
        mem = memory_part(a.docs)
        result = {**result, "memory": mem} if result else mem
    print(json.dumps(result))
