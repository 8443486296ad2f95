"""Matryoshka vs flat top-k SAE on an embedding store (issue 23). Prints ONE JSON line.

Trains a flat top-k SAE and a matryoshka SAE of the same width and L0 on the store's training documents
(the held-out documents are the run's own split: `split_by_document(holdout, seed)`), then reports on the
held-out documents:

* for each packaged label (every `topic` value one-vs-rest, `sentiment = negative`): the best single
  latent's accuracy (column and threshold chosen on training rows, ci95 by document bootstrap) next to
  the best single raw dimension, and the majority baseline;
* absorption per label (saekit.analysis.absorption) for both SAEs;
* adaptive-length retrieval (recall@10 / nDCG@10 at each prefix size: code, prefix reconstruction,
  raw-m and PCA-m), as a table and a plot;
* FVU and L0 of both SAEs.

    python scripts/matryoshka_demo.py --store RUN/store --out /tmp/matryoshka-demo [--epochs 18] [--flat-sae RUN/train]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from saekit.analysis.absorption import absorption  # noqa: E402
from saekit.analysis.single_feature import choose_and_score, dense_chunks  # noqa: E402
from saekit.eval.adaptive_retrieval import adaptive_retrieval, format_table, pca_basis, plot_table  # noqa: E402
from saekit.eval.bootstrap import mean_interval  # noqa: E402
from saekit.sae.base import inference_mode  # noqa: E402
from saekit.sae.registry import create, load_sae  # noqa: E402
from saekit.store.reader import ActivationStore  # noqa: E402
from saekit.train import TrainConfig, train  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--out", default="/tmp/matryoshka-demo")
    p.add_argument("--d-sae", type=int, default=1536)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--widths", default="64,256,1024")
    p.add_argument("--batch-topk", action="store_true", help="BatchTopK for both SAEs (default: row-wise top-k)")
    p.add_argument("--prefix-selection", default="nested", choices=["global", "nested"],
                   help="the matryoshka SAE's prefix_selection (nested: each inner prefix its own top-k)")
    p.add_argument("--epochs", type=float, default=18)
    p.add_argument("--flat-sae", default=None, help="an already trained flat SAE (e.g. RUN/train) to compare with "
                                                    "instead of training one; its width and k are used")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (the main job's flat SAE's; Gao et "
                                                        "al.'s width-scaled 6.5e-4 under-trains in 1,172 steps)")
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrieval-rows", type=int, default=3000)
    p.add_argument("--resamples", type=int, default=1000)
    return p.parse_args()


def labels_of(store, rows: torch.Tensor) -> dict[str, np.ndarray]:
    """Binary label columns: each topic one-vs-rest, and sentiment = negative."""
    docs = store.docs
    doc_ids = store.meta("doc_id")[rows].tolist()
    topics = np.array([docs[d]["labels"].get("topic") for d in doc_ids])
    out = {f"topic={t}": topics == t for t in sorted(set(topics.tolist()) - {None})}
    out["sentiment=negative"] = np.array([docs[d]["labels"].get("sentiment") == "negative" for d in doc_ids])
    return out


def train_sae(name: str, sae_cfg: dict, x_train: torch.Tensor, args, out: Path):
    steps = int(args.epochs * len(x_train) / args.batch_size)
    if (out / name / "final_sae").is_dir():  # trained by an earlier call with the same --out: reuse it
        log(f"reusing {out / name / 'final_sae'}")
        return load_sae(out / name / "final_sae").eval()
    from saekit.store.batches import TensorBatches

    cfg = TrainConfig(total_steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=20, checkpoint_every=0,
                      log_every=max(steps // 10, 1), progress_bar=False, deterministic=False,
                      normalize_activations="expected_average_only_in", max_epochs_warning=1e9, seed=args.seed)
    log(f"training {name}: {steps} steps")
    run = train(create(sae_cfg), TensorBatches(x_train, args.batch_size, seed=args.seed), cfg, out / name)
    return load_sae(run.final_sae).eval()


def dense_codes(sae, x: torch.Tensor) -> torch.Tensor:
    with inference_mode(sae):
        return torch.cat([sae.encode(x[s: s + 4096]).dense() for s in range(0, len(x), 4096)])


def single_best(X_tr: torch.Tensor, X_te: torch.Tensor, y_tr: dict, y_te: dict, resamples: int) -> dict:
    """Per label: the best single column chosen on training rows, its held-out accuracy and ci95."""
    names = list(y_tr)
    Y_tr = torch.from_numpy(np.stack([y_tr[n] for n in names]))
    Y_te = torch.from_numpy(np.stack([y_te[n] for n in names]))
    out = {}
    for name, (rule, correct) in zip(names, choose_and_score(lambda: dense_chunks(X_tr), Y_tr, lambda j: X_te[:, j],
                                                             Y_te)):
        out[name] = {"column": rule.column, "train_acc": round(rule.train_accuracy, 4),
                     "acc": round(float(correct.double().mean()), 4), "ci95": _r(mean_interval(correct, resamples))}
    return out


def _r(ci: list[float] | None) -> list[float] | None:
    return None if ci is None else [round(v, 4) for v in ci]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fvu_l0(sae, x: torch.Tensor) -> dict:
    with inference_mode(sae):
        out = sae(x)
    fvu = float((out.recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return {"fvu": round(fvu, 4), "l0": round(float(out.code.l0().double().mean()), 2)}


def main() -> None:
    args = parse()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = ActivationStore(args.store)
    tr_rows, te_rows = store.split_by_document(args.holdout, seed=args.seed)
    x_tr, x_te = store.gather("acts", tr_rows.numpy()), store.gather("acts", te_rows.numpy())
    widths = [int(w) for w in args.widths.split(",")] + [args.d_sae]
    base = {"d_in": store.d_in, "d_sae": args.d_sae, "k": args.k, "batch_topk": args.batch_topk, "seed": args.seed}
    flat = load_sae(args.flat_sae).eval() if args.flat_sae else train_sae("topk", base | {"architecture": "topk"},
                                                                           x_tr, args, out)
    if (flat.cfg.d_sae, flat.cfg.k) != (args.d_sae, args.k):
        raise SystemExit(f"--flat-sae has d_sae={flat.cfg.d_sae}, k={flat.cfg.k}; pass --d-sae/--k to match it")
    saes = {"topk": flat,
            "matryoshka": train_sae("matryoshka", base | {"architecture": "matryoshka", "matryoshka_widths": widths,
                                                               "prefix_selection": args.prefix_selection},
                                    x_tr, args, out)}
    y_tr, y_te = labels_of(store, tr_rows), labels_of(store, te_rows)
    report = {"store": str(args.store), "flat_sae": args.flat_sae, "epochs": args.epochs, "lr": args.lr,
              "n_train": len(tr_rows), "n_heldout": len(te_rows), "widths": widths, "k": args.k,
              "batch_topk": args.batch_topk, "prefix_selection": args.prefix_selection,
              "quality": {n: fvu_l0(s, x_te) for n, s in saes.items()}}
    log(f"quality {report['quality']}")
    best = {"raw": single_best(x_tr, x_te, y_tr, y_te, args.resamples)}
    for n, sae in saes.items():
        best[n] = single_best(dense_codes(sae, x_tr), dense_codes(sae, x_te), y_tr, y_te, args.resamples)
        log(f"single-best {n} done")
    labels = {}
    for lab in y_te:
        row = {"majority": round(float(max(y_te[lab].mean(), 1 - y_te[lab].mean())), 4)}
        row |= {n: b[lab] for n, b in best.items()}
        for n, sae in saes.items():
            with inference_mode(sae):
                code = sae.encode(x_te)
            ab = absorption(code.indices, code.values, torch.from_numpy(y_te[lab]), args.d_sae)
            row[n] = row[n] | {"absorption": round(ab.absorption_rate, 4), "best_f1_latent": ab.best_latent,
                               "absorption_ci95": _r(mean_interval(ab.absorbed_N[torch.from_numpy(y_te[lab])].double(),
                                                                   args.resamples))}
        labels[lab] = row
    report["labels"] = labels
    log("labels done")
    n_ret = min(args.retrieval_rows, len(x_te))
    pca = pca_basis(x_tr, max(w for w in widths if w < store.d_in) if any(w < store.d_in for w in widths) else 1)
    tables = {n: adaptive_retrieval(s, x_te[:n_ret], widths, k=10, pca=pca, resamples=args.resamples)
              for n, s in saes.items()}
    report["retrieval"] = tables
    (out / "retrieval.md").write_text("\n\n".join(f"### {n}\n\n{format_table(t)}" for n, t in tables.items()) + "\n")
    plot_table(tables, out / "adaptive_retrieval.png")
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    print(json.dumps(summary(report), allow_nan=False))


def summary(report: dict) -> dict:
    """The one JSON line: per label the held-out best-single accuracies and absorption; retrieval at each m."""
    lab = {k: {"majority": v["majority"], "raw": v["raw"]["acc"], "raw_ci95": v["raw"]["ci95"],
               **{n: v[n]["acc"] for n in ("topk", "matryoshka")},
               **{f"{n}_ci95": v[n]["ci95"] for n in ("topk", "matryoshka")},
               **{f"{n}_absorption": v[n]["absorption"] for n in ("topk", "matryoshka")}}
           for k, v in report["labels"].items()}
    ret = {n: {f"{r['view']}@{r['m']}": round(r["recall@10"]["mean"], 3) for r in rows}
           for n, rows in report["retrieval"].items()}
    return {"bench": "matryoshka_demo", "quality": report["quality"], "labels": lab, "recall@10": ret}


if __name__ == "__main__":
    main()
