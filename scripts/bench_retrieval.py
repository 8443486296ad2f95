"""Queries/s of the SAE sparse index (saekit.retrieval.SparseIndex) vs dense matrix-vector search, one JSON line.

    python scripts/bench_retrieval.py --store RUN/store --sae RUN/train/final_sae [--queries 300 --k 16 --rerank 100]

Both paths start from the same dense query embedding and end with the top 10 rows:
  sparse: encode the query with the SAE (x @ W_enc, top-k), gather the postings of its active latents,
          scatter-add, top-10 (and, with --rerank R, cosine re-ranking of the best R candidates);
  dense:  corpus_unit @ q (N x d), top-10.
They run in the same process, interleaved query by query, after the same warm-up; recall@10 is the sparse
path's overlap with the dense top 10 (the query document itself left out of both).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saekit.retrieval import SparseIndex, dense_top, recall_ndcg
from saekit.sae.registry import load_sae
from saekit.store.locate import store_for_hook


def _sparse(index: SparseIndex, sae, q_D: torch.Tensor, row: int, rerank: int) -> list[int]:
    code = sae.encode(q_D[None])
    return [r for r, _ in index.search((code.indices[0], code.values[0]), 10, rerank=rerank, query_D=q_D, exclude=row)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", required=True)
    ap.add_argument("--sae", required=True)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--k", type=int, default=0, help="truncate codes to k (0: the SAE's own k)")
    ap.add_argument("--rerank", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    sae = load_sae(args.sae).eval()
    store = store_for_hook(args.store, None)
    index = SparseIndex.from_store(sae, store, k=args.k or None)
    corpus = index.dense_unit_ND
    rows = torch.randperm(index.n_docs, generator=torch.Generator().manual_seed(args.seed))
    rows = rows[: args.warmup + args.queries].tolist()
    for r in rows[: args.warmup]:  # same warm-up for both
        _sparse(index, sae, corpus[r], r, args.rerank)
        dense_top(corpus, corpus[r], 10, exclude=r)
    t_sparse = t_dense = 0.0
    recall = []
    for r in rows[args.warmup:]:  # interleaved
        t0 = time.perf_counter()
        found = _sparse(index, sae, corpus[r], r, args.rerank)
        t1 = time.perf_counter()
        truth = dense_top(corpus, corpus[r], 10, exclude=r)
        t2 = time.perf_counter()
        t_sparse += t1 - t0
        t_dense += t2 - t1
        recall.append(recall_ndcg(found, truth)[0])
    q = args.queries
    print(json.dumps({"bench": "sparse_index_vs_dense_search", "n_docs": index.n_docs, "d_in": store.d_in,
                      "d_sae": index.d_sae, "k": args.k or sae.cfg.k, "rerank": args.rerank, "queries": q,
                      "sparse_qps": round(q / t_sparse, 1), "dense_qps": round(q / t_dense, 1),
                      "speedup": round(t_dense / t_sparse, 3), "recall@10": round(sum(recall) / q, 4),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
