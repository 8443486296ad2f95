"""Adaptive-length retrieval: how well does a short code find the same neighbours as the full embedding?

For every length m (a matryoshka SAE's prefix sizes), four m-sized views of each document are searched
by cosine and compared with the raw embedding's own k nearest neighbours (`retrieval.recall_per_query`,
`retrieval.ndcg_per_query`; the reference is always the full raw embedding):

* `code`  - the SAE code cut to its first m latents (a sparse vector of width m; a matryoshka SAE's
  general latents come first, so its short codes should search well - "Beyond Matryoshka", CSR);
* `recon` - the reconstruction from those first m latents only (back in embedding space);
* `raw`   - the raw embedding cut to its first m dimensions (what an MRL-trained model would allow;
  MiniLM was not trained for it, so this is the floor);
* `pca`   - the embedding projected on its top-m principal components (fitted on training rows) and
  mapped back (mean added): the best linear m-dimensional view, what a linear method reaches.

`raw` and `pca` exist only for m < d_in (at m >= d_in they are the embedding itself). Each figure carries
a bootstrap ci95 over query documents. `plot_table` draws recall@k against m for the four views.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from saekit.errors import ShapeMismatchError
from saekit.eval.bootstrap import mean_interval
from saekit.eval.retrieval import ndcg_per_query, recall_per_query
from saekit.sae.base import SparseAutoencoder, SparseCode, inference_mode

VIEWS = ("code", "recon", "raw", "pca")


def pca_basis(train_ND: Tensor, m_max: int) -> tuple[Tensor, Tensor]:
    """Mean `[D]` and the top `m_max` principal directions `[m_max, D]` (rows), in float64."""
    x = train_ND.double()
    mean_D = x.mean(0)
    _, _, V_DD = torch.linalg.svd(x - mean_D, full_matrices=False)
    if m_max > V_DD.shape[0]:
        raise ShapeMismatchError(f"pca_basis: expected m_max <= {V_DD.shape[0]}, found {m_max}")
    return mean_D, V_DD[:m_max]


def truncated_code(sae: SparseAutoencoder, x_ND: Tensor, m: int, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """The dense code restricted to latents `< m` `[N, m]`, and the reconstruction from them `[N, D]`."""
    codes, recons = [], []
    with inference_mode(sae):
        for s in range(0, x_ND.shape[0], chunk):
            c = sae.encode(x_ND[s: s + chunk])
            vals = torch.where(c.indices < m, c.values, torch.zeros_like(c.values))
            z = torch.zeros(vals.shape[0], m, dtype=vals.dtype).scatter_add_(1, c.indices.clamp_max(m - 1), vals)
            codes.append(z)
            recons.append(sae.decode(SparseCode(c.indices, vals, c.d_sae)))
    return torch.cat(codes), torch.cat(recons)


def views_at(sae: SparseAutoencoder, x_ND: Tensor, m: int, pca: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
    """The m-sized views of `x_ND` (module docstring); `raw`/`pca` only when m < d_in."""
    code_NM, recon_ND = truncated_code(sae, x_ND, m)
    out = {"code": code_NM, "recon": recon_ND}
    if m < x_ND.shape[1]:
        out["raw"] = x_ND[:, :m]
        if pca is not None:
            mean_D, V_MD = pca
            V_mD = V_MD[:m]
            out["pca"] = (mean_D + ((x_ND.double() - mean_D) @ V_mD.T) @ V_mD).float()
    return out


def _scored(per_query_N: Tensor, resamples: int, seed: int) -> dict:
    ci = mean_interval(per_query_N, resamples, seed) if resamples > 0 else None
    return {"mean": float(per_query_N.mean()), "ci95": ci}


def adaptive_retrieval(sae: SparseAutoencoder, x_ND: Tensor, lengths: list[int], *, k: int = 10,
                       pca: tuple[Tensor, Tensor] | None = None, resamples: int = 200, seed: int = 0) -> list[dict]:
    """One row per (length m, view): recall@k and nDCG@k against the raw embedding's neighbours, with ci95."""
    rows = []
    for m in lengths:
        for view, emb in views_at(sae, x_ND, m, pca).items():
            rows.append({"m": int(m), "view": view, "k": k,
                         f"recall@{k}": _scored(recall_per_query(x_ND, emb, k), resamples, seed),
                         f"ndcg@{k}": _scored(ndcg_per_query(x_ND, emb, k), resamples, seed)})
    return rows


def format_table(rows: list[dict], k: int = 10) -> str:
    """A markdown table: one line per m, recall@k / nDCG@k per view."""
    by_m: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_m.setdefault(r["m"], {})[r["view"]] = r
    head = "| m | " + " | ".join(f"{v} R@{k} / nDCG@{k}" for v in VIEWS) + " |"
    lines = [head, "|" + "---|" * (len(VIEWS) + 1)]
    for m, cells in sorted(by_m.items()):
        vals = [f"{c[f'recall@{k}']['mean']:.3f} / {c[f'ndcg@{k}']['mean']:.3f}" if (c := cells.get(v)) else "—"
                for v in VIEWS]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot_table(tables: dict[str, list[dict]], path: str | Path, k: int = 10) -> Path:
    """recall@k against m (log axis) for each SAE's code/recon and the raw / PCA views, with ci95 bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = set()
    for name, rows in tables.items():
        for view in VIEWS:
            if view in ("raw", "pca") and view in drawn:
                continue  # the same for every SAE
            pts = sorted((r["m"], r[f"recall@{k}"]) for r in rows if r["view"] == view)
            if not pts:
                continue
            drawn.add(view)
            ms = [m for m, _ in pts]
            mean = [s["mean"] for _, s in pts]
            err = [[s["mean"] - (s["ci95"] or [s["mean"]] * 2)[0] for _, s in pts],
                   [(s["ci95"] or [s["mean"]] * 2)[1] - s["mean"] for _, s in pts]]
            label = view if view in ("raw", "pca") else f"{name} {view}"
            ax.errorbar(ms, mean, yerr=err, marker="o", capsize=2, label=label)
    ax.set_xscale("log")
    ticks = sorted({r["m"] for rows in tables.values() for r in rows})
    ax.set_xticks(ticks, [str(m) for m in ticks])
    ax.minorticks_off()
    ax.set_xlabel("length m (latents or dimensions)")
    ax.set_ylabel(f"recall@{k} vs raw embedding")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
