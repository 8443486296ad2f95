"""Retrieval Pareto table of an embedding SAE (issue 16, item 3): does the SAE keep the neighbours?

For each k of a sweep a top-k SAE is trained on the store's training documents; on held-out
documents recall@10 and nDCG@10 (against the raw embedding's neighbours) are measured for the SAE's
reconstruction and for its sparse code (cosine between codes), next to PCA with as many components as
the SAE has active latents (PCA fitted on the training rows). FVU of the reconstructions too.
Prints ONE JSON line; `--plot PATH` also writes L0 vs recall@10.

    python scripts/retrieval_pareto.py --store runs/quickstart-minilm/store [--ks 8,16,32,64] [--d-sae 1536]
        [--steps 1500] [--heldout 2000] [--plot pareto.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from saekit.eval.reconstruction import fvu  # noqa: E402
from saekit.eval.retrieval import ndcg_at_k, recall_at_k  # noqa: E402
from saekit.sae.registry import create  # noqa: E402
from saekit.store.batches import TensorBatches  # noqa: E402
from saekit.store.reader import ActivationStore  # noqa: E402
from saekit.train import TrainConfig, train  # noqa: E402


def split(store: ActivationStore, heldout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows) of the store, seeded (a row of an embedding store is a document)."""
    x = torch.cat([c.float() for _, c in store.iter_chunks(65536)])
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[heldout:]], x[perm[:heldout]]


def pca_recon(train_ND: torch.Tensor, test_ND: torch.Tensor, n: int) -> torch.Tensor:
    mean_D = train_ND.mean(0)
    _, _, V = torch.linalg.svd(train_ND - mean_D, full_matrices=False)
    P_nD = V[:n]
    return (test_ND - mean_D) @ P_nD.T @ P_nD + mean_D


def figures(test_ND: torch.Tensor, other: torch.Tensor, recon: bool = True) -> dict:
    out = {"recall_at_10": recall_at_k(test_ND, other, 10), "ndcg_at_10": ndcg_at_k(test_ND, other, 10)}
    if recon:
        out["fvu"] = fvu(test_ND, other)
    return out


def sae_row(train_ND, test_ND, k: int, d_sae: int, steps: int, seed: int, work: Path) -> dict:
    sae = create({"architecture": "topk", "d_in": train_ND.shape[1], "d_sae": d_sae, "k": k, "seed": seed})
    cfg = TrainConfig(total_steps=steps, batch_size=1024, progress_bar=False, checkpoint_every=0, log_every=10_000)
    train(sae, TensorBatches(train_ND, 1024, seed=seed), cfg, work / f"k{k}")
    with torch.no_grad():
        out = sae(test_ND)
    codes_NF = out.code.dense()
    l0 = float((codes_NF != 0).sum(-1).double().mean())
    n_pca = max(1, int(round(l0)))
    return {"k": k, "l0": l0, "sae_recon": figures(test_ND, out.recon), "sae_code": figures(test_ND, codes_NF, False),
            "pca": {"components": n_pca, **figures(test_ND, pca_recon(train_ND, test_ND, n_pca))}}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="an embedding activation store")
    ap.add_argument("--ks", default="8,16,32,64")
    ap.add_argument("--d-sae", type=int, default=1536)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--heldout", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    store = ActivationStore(args.store)
    train_ND, test_ND = split(store, args.heldout, args.seed)
    with tempfile.TemporaryDirectory() as d:
        rows = [sae_row(train_ND, test_ND, int(k), args.d_sae, args.steps, args.seed, Path(d))
                for k in args.ks.split(",") if k]
    if args.plot:
        plot(rows, args.plot)
    print(json.dumps({"store": str(args.store), "train_rows": len(train_ND), "heldout_rows": len(test_ND),
                      "d_sae": args.d_sae, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
