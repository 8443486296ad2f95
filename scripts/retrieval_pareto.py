"""Retrieval Pareto table of an embedding SAE (issue 16, item 3): does the SAE keep the neighbours?

For each k of a sweep a top-k SAE is trained on the store's training documents, split exactly as a
run splits them (`store.split_by_document(holdout, seed)`), with the main job's training settings
unless flags say otherwise. On held-out documents it measures, with 95 % bootstrap intervals over the
query documents: recall@10 and nDCG@10 (against the raw embedding's neighbours, among the first
`--retrieval-rows` held-out documents, as the eval report does) of the SAE's reconstruction and of
its sparse code (cosine between codes), next to PCA with as many components as the SAE has active
latents (fitted on the training rows); FVU of the reconstructions on every held-out document.
`--sae-json` adds SAE config keys (e.g. '{"sim_coef": 0.5}' for the retrieval-aware loss), so one
script measures every variant. Prints ONE JSON line; `--plot PATH` also writes L0 vs recall@10.

    python scripts/retrieval_pareto.py --store runs/quickstart-minilm/store [--ks 8,16,32] [--d-sae 3072]
        [--tokens 600000] [--sae-json '{"sim_coef": 0.5}'] [--plot pareto.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from saekit.eval.bootstrap import Bootstrap, fvu_from_sums, mean_interval  # noqa: E402
from saekit.eval.retrieval import ndcg_per_query, recall_per_query  # noqa: E402
from saekit.sae.registry import create  # noqa: E402
from saekit.store.reader import ActivationStore  # noqa: E402
from saekit.train import TrainConfig, train  # noqa: E402

RESAMPLES = 1000


def split(store: ActivationStore, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows) as row indices, the run's own document split."""
    return store.split_by_document(holdout, seed=seed)


def pca_recon(train_ND: torch.Tensor, test_ND: torch.Tensor, n: int) -> torch.Tensor:
    mean_D = train_ND.mean(0)
    _, _, V = torch.linalg.svd(train_ND - mean_D, full_matrices=False)
    P_nD = V[:n]
    return (test_ND - mean_D) @ P_nD.T @ P_nD + mean_D


def fvu_with_ci(x_ND: torch.Tensor, recon_ND: torch.Tensor) -> dict:
    """FVU over the held-out rows (one row = one document) and its document-bootstrap ci95."""
    x = x_ND.double()
    stats = {"sse": (x - recon_ND.double()).pow(2).sum(-1), "sumsq": x.pow(2).sum(-1), "sum_x": x,
             "n": torch.ones(len(x), dtype=torch.float64)}
    point = float(fvu_from_sums({k: v.sum(0) for k, v in stats.items()}))
    return {"fvu": point, "fvu_ci95": Bootstrap(len(x), RESAMPLES, 0).ci(fvu_from_sums, stats)}


def figures(query_ND: torch.Tensor, other_ND: torch.Tensor) -> dict:
    """recall@10 and nDCG@10 of `other`'s neighbours against the raw embedding's, with ci95."""
    rec = recall_per_query(query_ND, other_ND, 10)
    nd = ndcg_per_query(query_ND, other_ND, 10)
    return {"recall_at_10": float(rec.mean()), "recall_ci95": mean_interval(rec, RESAMPLES, 0),
            "ndcg_at_10": float(nd.mean()), "ndcg_ci95": mean_interval(nd, RESAMPLES, 0)}


def train_sae(store: ActivationStore, rows: torch.Tensor, k: int, args, work: Path):
    sae_cfg = {"architecture": "topk", "d_in": store.d_in, "d_sae": args.d_sae, "k": k, "seed": args.seed,
               **json.loads(args.sae_json)}
    sae = create(sae_cfg)
    cfg = TrainConfig(total_tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, warmup_steps=20,
                      decay=args.decay, decay_fraction=args.decay_fraction,
                      normalize_activations="expected_average_only_in", progress_bar=False, checkpoint_every=0,
                      log_every=10_000, eval_every=0, seed=args.seed)
    t0 = time.perf_counter()
    train(sae, store.batches(args.batch_size, seed=args.seed, rows=rows), cfg, work / f"k{k}")
    return sae, time.perf_counter() - t0


def sae_row(store, train_rows, test_ND, train_ND, k: int, args, work: Path) -> dict:
    sae, seconds = train_sae(store, train_rows, k, args, work)
    with torch.no_grad():
        out = sae(test_ND)
    q = args.retrieval_rows
    codes_NF = out.code.dense()
    l0 = float((codes_NF != 0).sum(-1).double().mean())
    n_pca = max(1, int(round(l0)))
    pca_ND = pca_recon(train_ND, test_ND, n_pca)
    return {"k": k, "l0": l0, "train_seconds": round(seconds, 1),
            "sae_recon": {**figures(test_ND[:q], out.recon[:q]), **fvu_with_ci(test_ND, out.recon)},
            "sae_code": figures(test_ND[:q], codes_NF[:q]),
            "pca": {"components": n_pca, **figures(test_ND[:q], pca_ND[:q]), **fvu_with_ci(test_ND, pca_ND)}}


def references(train_ND: torch.Tensor, test_ND: torch.Tensor, q: int, seed: int) -> dict:
    """What it takes to keep the neighbours without an SAE: PCA with more components, and the raw
    embedding plus isotropic Gaussian noise scaled to a given FVU (an error that, like an SAE's, is
    different for every row; PCA's is the same projection for all of them)."""
    pca = {n: {**figures(test_ND[:q], pca_recon(train_ND, test_ND, n)[:q]),
               "fvu": fvu_with_ci(test_ND, pca_recon(train_ND, test_ND, n))["fvu"]} for n in (32, 64, 96, 128)}
    tv = float((test_ND - test_ND.mean(0)).pow(2).sum(-1).mean())
    g = torch.Generator().manual_seed(seed)
    noise_ND = torch.randn(test_ND.shape, generator=g)
    noisy = {}
    for f in (0.05, 0.1, 0.15, 0.2, 0.25):
        e_ND = noise_ND * (f * tv / test_ND.shape[1]) ** 0.5
        noisy[f] = figures(test_ND[:q], test_ND[:q] + e_ND[:q])
    return {"pca": pca, "isotropic_noise_at_fvu": noisy}


def plot(rows: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    l0 = [r["l0"] for r in rows]
    for key, label in (("sae_recon", "SAE reconstruction"), ("sae_code", "SAE sparse code"), ("pca", "PCA (n = L0)")):
        ax.plot(l0, [r[key]["recall_at_10"] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("L0 (active latents / PCA components)")
    ax.set_ylabel("recall@10 vs raw embedding")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="an embedding activation store")
    ap.add_argument("--ks", default="8,16,32")
    ap.add_argument("--d-sae", type=int, default=3072)
    ap.add_argument("--tokens", type=int, default=600_000, help="training rows seen (the main job: 600k)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--decay", default="linear", choices=["none", "linear", "cosine"])
    ap.add_argument("--decay-fraction", type=float, default=0.2)
    ap.add_argument("--sae-json", default="{}", help="extra top-k SAE config keys, as JSON")
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--retrieval-rows", type=int, default=1200, help="held-out documents searched (eval default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--label", default="", help="a name for this variant, copied into the JSON line")
    ap.add_argument("--references", action="store_true", help="also PCA-32..128 and raw + noise at FVU 0.05..0.25")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    store = ActivationStore(args.store)
    train_rows, held_rows = split(store, args.holdout, args.seed)
    test_ND = store[held_rows].float()
    train_ND = store[train_rows].float()
    with tempfile.TemporaryDirectory() as d:
        rows = [sae_row(store, train_rows, test_ND, train_ND, int(k), args, Path(d))
                for k in args.ks.split(",") if k]
    if args.plot:
        plot(rows, args.plot)
    ref = references(train_ND, test_ND, args.retrieval_rows, args.seed) if args.references else None
    print(json.dumps({"label": args.label, "store": str(args.store), "train_rows": len(train_rows),
                      "heldout_rows": len(held_rows), "retrieval_rows": min(args.retrieval_rows, len(held_rows)),
                      "d_sae": args.d_sae, "tokens": args.tokens, "batch_size": args.batch_size, "lr": args.lr,
                      "decay": args.decay, "sae": json.loads(args.sae_json), "rows": rows, "references": ref}))


if __name__ == "__main__":
    main()
