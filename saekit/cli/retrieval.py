"""`saekit index RUN` (the sparse index's recall/FLOPs Pareto sweep) and `saekit retrieve RUN --query TEXT`
(search an embedding run's corpus through the SAE's inverted index, optionally steered).

Thin: `saekit.retrieval` does the work; this module picks the run's SAE and store, adds the bootstrap
intervals (eval layer) to the sweep's recall, writes `retrieval/pareto.json` + `pareto.png`, prints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saekit.artifacts import atomic_write_json, to_strict_json
from saekit.cli.analysis import int_list, edits_from_args
from saekit.errors import ConfigError
from saekit.eval.bootstrap import mean_interval
from saekit.layout import RunFolder
from saekit.retrieval import SparseIndex, pareto_sweep
from saekit.run.stages import checked_sae_and_store


def _run(args):
    folder = RunFolder(Path(args.run)).require_run()
    folder = (folder.for_sae(args.sae) if args.sae else folder).require_one_sae()
    sae, store, _ = checked_sae_and_store(folder)
    if store.kind != "embedding":
        raise ConfigError(f"{args.run}: expected an embedding run (one vector per document), found a "
                          f"'{store.kind}' store")
    return folder, sae.eval(), store


def sweep_table(points, resamples: int, seed: int) -> list[dict]:
    rows = []
    for p in points:
        s = p.summary()
        s["recall@10_ci95"] = mean_interval(torch.tensor(p.recall_Q), resamples, seed) if resamples else None
        s["ndcg@10_ci95"] = mean_interval(torch.tensor(p.ndcg_Q), resamples, seed) if resamples else None
        rows.append(s)
    return rows


def plot_pareto(rows: list[dict], dense_flops: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for rr in sorted({r["rerank"] for r in rows}):
        pts = [r for r in rows if r["rerank"] == rr]
        ax.plot([r["flops_per_query"] for r in pts], [r["recall@10"] for r in pts], "o-",
                label=f"sparse index, re-rank {rr}" if rr else "sparse index")
        for r in pts:
            ax.annotate(f"k={r['k']}", (r["flops_per_query"], r["recall@10"]), fontsize=7)
    ax.axvline(dense_flops, color="grey", ls="--", label="dense search (recall 1)")
    ax.set_xscale("log")
    ax.set(xlabel="FLOPs per query (encode + postings + re-rank)", ylabel="recall@10 vs exact dense", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_index(args) -> int:
    folder, sae, store = _run(args)
    index = SparseIndex.from_store(sae, store)
    g = torch.Generator().manual_seed(args.seed)
    rows = torch.randperm(index.n_docs, generator=g)[: args.queries].tolist()
    points = pareto_sweep(index, sae, rows, int_list(args.ks), reranks=int_list(args.reranks))
    table = sweep_table(points, args.resamples, args.seed)
    dense_flops = 2.0 * index.n_docs * store.d_in
    out = Path(args.out) if args.out else folder.retrieval
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "pareto.json", to_strict_json({"n_docs": index.n_docs, "d_sae": index.d_sae,
                                                           "dense_flops_per_query": dense_flops, "points": table}))
    plot_pareto(table, dense_flops, out / "pareto.png")
    print(f"{index.n_docs} documents, {index.nnz} postings, dense search {dense_flops:.3g} FLOPs/query")
    print(f"{'k':>3} {'rerank':>6} {'recall@10':>20} {'nDCG@10':>8} {'FLOPs/q':>9} {'ms/q':>6} {'dense ms/q':>10}")
    for r in table:
        ci = r["recall@10_ci95"]
        ci_text = f" [{ci[0]:.3f},{ci[1]:.3f}]" if ci else ""
        print(f"{r['k']:>3} {r['rerank']:>6} {r['recall@10']:>6.3f}{ci_text:<14} {r['ndcg@10']:>8.3f} "
              f"{r['flops_per_query']:>9.3g} {1e3 * r['seconds_per_query']:>6.2f} {1e3 * r['dense_seconds_per_query']:>10.2f}")
    print(f"saved {out / 'pareto.json'} and {out / 'pareto.png'}")
    return 0


def cmd_retrieve(args) -> int:
    from saekit.sources.models import load_for_spec

    folder, sae, store = _run(args)
    edits = edits_from_args(args) if (args.feature or args.clamp or args.ablate) else []
    index = SparseIndex.from_store(sae, store, keep_dense=bool(args.rerank))
    model, _ = load_for_spec(store.manifest["source"])
    query_D = torch.as_tensor(model.encode([args.query], convert_to_tensor=True))[0].float().cpu()
    doc_ids = store.meta("doc_id")
    text = lambda row: (store.docs.get(int(doc_ids[row]), {}).get("text") or "")[:90]
    if edits:
        res = index.steered_search(sae, query_D, edits, top_n=args.top_n)
        print(f"query: {args.query!r}  (steered: {len(res['entered'])} entered the top {args.top_n})")
        for i, ((b, sb), (a, sa)) in enumerate(zip(res["before"], res["after"])):
            print(f"{i + 1:>3}  {sb:.3f} {text(b)[:45]:<45} | {sa:.3f} {text(a)[:45]}")
        return 0
    with torch.no_grad():
        code = sae.encode(query_D[None])
    hits = index.search((code.indices[0], code.values[0]), args.top_n, rerank=args.rerank, query_D=query_D)
    print(f"query: {args.query!r}")
    for i, (r, s) in enumerate(hits):
        print(f"{i + 1:>3}  {s:.3f}  doc {int(doc_ids[r])}: {text(r)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("index", help="sparse inverted index of an embedding run: recall/FLOPs Pareto sweep vs dense")
    p.add_argument("run", help="embedding run folder")
    p.add_argument("--sae", default=None, help="which SAE of a multi-SAE run")
    p.add_argument("--ks", default="2,4,8,16", help="code sizes: each document's and query's k largest values")
    p.add_argument("--reranks", default="0,100", help="re-rank depths (0: sparse scores only)")
    p.add_argument("--queries", type=int, default=500, help="indexed documents used as queries (left out)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples over queries (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: the run's retrieval/ folder)")
    p.set_defaults(fn=cmd_index)
    p = sub.add_parser("retrieve", help="search an embedding run's corpus through the SAE's sparse index")
    p.add_argument("run", help="embedding run folder")
    p.add_argument("--sae", default=None, help="which SAE of a multi-SAE run")
    p.add_argument("--query", required=True, help="query text (embedded with the run's model)")
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--rerank", type=int, default=100, help="re-rank this many candidates with dense cosines (0: none)")
    p.add_argument("--feature", type=int, action="append", default=[], help="steer: add feature (repeatable)")
    p.add_argument("--alpha", type=float, action="append", default=[], help="strength per --feature")
    p.add_argument("--clamp", action="append", default=[], metavar="N=V", help="steer: clamp feature N to V")
    p.add_argument("--ablate", type=int, action="append", default=[], help="steer: ablate feature N")
    p.set_defaults(fn=cmd_retrieve)
