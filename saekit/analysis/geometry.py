"""Representation geometry per layer, and the structure of an SAE's dictionary.

Per layer (rows of one hook's store): IsoScore (Rudman et al. 2022: how uniformly the variance is
spread over the dimensions), TwoNN intrinsic dimension (Facco et al. 2017), effective rank (Roy &
Vetterli 2007), row-norm statistics with the mean pairwise cosine (anisotropy), and a mean-pooled
linear probe on a document label ("Layer by layer", Skean et al. 2025).
Per SAE: the eigenvalue spectrum of the decoder directions' covariance with a power-law fit, and
"lobes": clusters of latents that fire in the same documents ("The geometry of concepts", Li et al.).

All statistics are pure functions of tensors with known-answer tests; `layer_geometry` and
`dictionary_geometry` only gather the rows they need. Analysis layer: imports store/sae, never eval.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saekit.errors import SaekitError, ShapeMismatchError
from saekit.sae.base import SparseAutoencoder, inference_mode


def _check_2d(X: Tensor, what: str, min_rows: int = 3) -> Tensor:
    if X.dim() != 2 or X.shape[0] < min_rows:
        raise ShapeMismatchError(f"{what}: expected a [N >= {min_rows}, d] matrix, found {tuple(X.shape)}")
    return X.double()


# -- per-layer statistics ----------------------------------------------------------------------------


def pca_variances(X_ND: Tensor) -> Tensor:
    """Variance along each principal direction (eigenvalues of the covariance), descending."""
    Xc = _check_2d(X_ND, "pca_variances") - X_ND.double().mean(0)
    s = torch.linalg.svdvals(Xc)
    var = s ** 2 / (X_ND.shape[0] - 1)
    d = X_ND.shape[1]
    return torch.cat([var, var.new_zeros(max(0, d - var.numel()))])[:d]


def isoscore(X_ND: Tensor) -> dict:
    """IsoScore (Rudman et al. 2022, Algorithm 1): `isoscore` in [0, 1] is 1 for isotropic data and 0
    when all variance lies on one axis; `fraction` φ is the share of dimensions used uniformly, 1 for
    isotropic data and 1/d for one-axis data (IsoScore = (d·φ − 1)/(d − 1))."""
    var_D = pca_variances(X_ND)
    d = var_D.numel()
    if d < 2 or float(var_D.norm()) == 0.0:
        return {"isoscore": 0.0, "fraction": 1.0 / max(1, d)}
    hat_D = math.sqrt(d) * var_D / var_D.norm()
    defect = float((hat_D - 1).norm()) / math.sqrt(2 * (d - math.sqrt(d)))
    phi = (d - defect ** 2 * (d - math.sqrt(d))) ** 2 / d ** 2
    return {"isoscore": (d * phi - 1) / (d - 1), "fraction": phi}


def two_nearest(X_ND: Tensor, block: int = 2048) -> tuple[Tensor, Tensor]:
    """Distances of every row to its first and second nearest other row."""
    X = _check_2d(X_ND, "two_nearest")
    sq_N = (X ** 2).sum(1)
    r1, r2 = [], []
    for lo in range(0, X.shape[0], block):
        d2 = (sq_N[lo:lo + block, None] + sq_N[None] - 2 * X[lo:lo + block] @ X.T).clamp_min(0)
        d2[torch.arange(d2.shape[0]), torch.arange(lo, lo + d2.shape[0])] = math.inf  # not itself
        top = d2.topk(2, dim=1, largest=False).values.sqrt()
        r1.append(top[:, 0])
        r2.append(top[:, 1])
    return torch.cat(r1), torch.cat(r2)


def twonn_dimension(X_ND: Tensor, discard: float = 0.1) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017): with μ = r2/r1 per point, −log(1 − F(μ)) = d·log μ;
    d is the slope through the origin over the empirical F, the largest `discard` share of μ left out.
    Duplicate points (r1 = 0) are skipped."""
    r1, r2 = two_nearest(X_ND)
    ok = r1 > 0
    mu = (r2[ok] / r1[ok]).sort().values
    n = mu.numel()
    if n < 3:
        raise SaekitError(f"twonn_dimension: expected at least 3 distinct points, found {n}")
    m = max(2, int(n * (1 - discard)))
    x = mu[:m].log()
    y = -torch.log1p(-torch.arange(m, dtype=torch.float64) / n)
    return float((x * y).sum() / (x * x).sum().clamp_min(1e-300))


def effective_rank(X_ND: Tensor) -> float:
    """exp(entropy) of the normalised singular values of the centred rows (Roy & Vetterli 2007)."""
    X = _check_2d(X_ND, "effective_rank")
    s = torch.linalg.svdvals(X - X.mean(0))
    p = s / s.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def norm_statistics(X_ND: Tensor) -> dict:
    """Row-norm mean/median/std/p99/max, and the mean cosine between two different rows (anisotropy: 0
    for directions spread evenly, 1 when every row points the same way)."""
    X = _check_2d(X_ND, "norm_statistics", 2)
    n_N = X.norm(dim=1)
    u = X / n_N.clamp_min(1e-12)[:, None]
    N = X.shape[0]
    mean_cos = float((u.sum(0).norm() ** 2 - (n_N > 0).sum()) / (N * (N - 1)))
    q = torch.quantile(n_N, torch.tensor([0.5, 0.99], dtype=n_N.dtype))
    return {"norm_mean": float(n_N.mean()), "norm_median": float(q[0]), "norm_std": float(n_N.std()),
            "norm_p99": float(q[1]), "norm_max": float(n_N.max()), "mean_cosine": mean_cos}


def geometry_of(X_ND: Tensor, twonn_rows: int = 4000, seed: int = 0) -> dict:
    """Every per-layer statistic of one matrix of rows (TwoNN on a seeded sample of `twonn_rows`)."""
    g = torch.Generator().manual_seed(seed)
    sample = X_ND[torch.randperm(X_ND.shape[0], generator=g)[:twonn_rows]]
    return {"rows": int(X_ND.shape[0]), "d": int(X_ND.shape[1]), **isoscore(X_ND),
            "twonn_dim": twonn_dimension(sample), "effective_rank": effective_rank(X_ND), **norm_statistics(X_ND)}


# -- rows of a store -------------------------------------------------------------------------------


def sample_rows(store, max_rows: int, seed: int = 0, exclude_outliers: bool = True) -> np.ndarray:
    """A seeded sample of store rows (sorted), massive-activation outliers left out by default."""
    keep = np.ones(len(store), dtype=bool)
    if exclude_outliers and store.kind != "embedding":
        keep &= ~store.outlier_mask().numpy()
    rows = np.flatnonzero(keep)
    if max_rows and len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    return rows


def pooled_by_document(store, rows: np.ndarray, X_ND: Tensor) -> tuple[np.ndarray, Tensor]:
    """(doc_ids [G], mean row per document [G, d]) of the given rows."""
    doc_N = store.gather("doc_id", rows).numpy()
    docs, inv = np.unique(doc_N, return_inverse=True)
    inv_t = torch.from_numpy(inv)
    sums = torch.zeros(len(docs), X_ND.shape[1], dtype=X_ND.dtype).index_add_(0, inv_t, X_ND)
    counts = torch.zeros(len(docs), dtype=X_ND.dtype).index_add_(0, inv_t, torch.ones_like(inv_t, dtype=X_ND.dtype))
    return docs, sums / counts[:, None]


def pooled_probe(store, docs: np.ndarray, X_GD: Tensor, label: str, positive=None, test_frac: float = 0.3,
                 seed: int = 0, interval=None) -> dict:
    """Accuracy of a logistic probe for `label == positive` on mean-pooled document rows, split by
    document; with the majority-class accuracy of the same test documents beside it."""
    from saekit.analysis.probing import binarize, fit_probe, split_documents

    values = [store.docs[int(d)].get("labels", {}).get(label) for d in docs]
    have = np.array([v is not None for v in values])
    if have.sum() < 10:
        raise SaekitError(f"pooled_probe: expected documents labelled '{label}', found {int(have.sum())}")
    y, pos, _ = binarize([v for v in values if v is not None], positive)
    X = X_GD[torch.from_numpy(have)].numpy()
    doc_G = np.asarray(docs)[have]
    train_ids, test_ids = split_documents(doc_G, test_frac, seed)
    train, test = np.isin(doc_G, train_ids), np.isin(doc_G, test_ids)
    res = fit_probe(X[train], y[train], X[test], y[test], interval=interval)
    majority = max(float(y[test].mean()), 1 - float(y[test].mean()))
    return {"label": label, "positive": pos, "accuracy": res["accuracy"], "majority": majority,
            "ci95": (res.get("ci95") or {}).get("accuracy"), "test_docs": int(test.sum())}


def layer_geometry(store, max_rows: int = 20000, label: str | None = None, positive=None, seed: int = 0,
                   interval=None) -> dict:
    """Geometry of one hook's rows (a seeded sample, outliers out), and the pooled probe when `label`."""
    rows = sample_rows(store, max_rows, seed)
    X_ND = store.gather("acts", rows).double()
    out = {"hook": store.hook, **geometry_of(X_ND, seed=seed)}
    if label:
        docs, X_GD = pooled_by_document(store, rows, X_ND.float())
        out["probe"] = pooled_probe(store, docs, X_GD, label, positive, seed=seed, interval=interval)
    return out


# -- the SAE's dictionary ---------------------------------------------------------------------------


def power_law_fit(eig_D: Tensor, lo: float = 0.05, hi: float = 0.9) -> dict:
    """Fit λ_i = c·i^(−α) by least squares of log λ on log i over ranks in [lo·d, hi·d] (the ends of a
    spectrum bend away from a power law); returns alpha and the fit's R²."""
    eig = eig_D.double().sort(descending=True).values
    d = eig.numel()
    i0, i1 = max(0, int(lo * d)), max(int(lo * d) + 3, int(hi * d))
    rank = torch.arange(1, d + 1, dtype=torch.float64)[i0:i1]
    lam = eig[i0:i1]
    ok = lam > 0
    x, y = rank[ok].log(), lam[ok].log()
    if x.numel() < 3:
        return {"alpha": None, "r2": None}
    A = torch.stack([x, torch.ones_like(x)], 1)
    coef = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
    resid = y - A @ coef
    r2 = 1 - float((resid ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp_min(1e-300))
    return {"alpha": float(-coef[0]), "log_c": float(coef[1]), "r2": r2, "fit_ranks": [i0 + 1, i1]}


def decoder_spectrum(W_dec_FD: Tensor) -> Tensor:
    """Eigenvalues (descending) of the covariance of the unit-norm decoder directions, `[d_in]`."""
    W = W_dec_FD.detach().double().cpu()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return pca_variances(W)


def firing_documents(sae: SparseAutoencoder, store, rows: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, Tensor]:
    """(doc_ids [G], fires [G, d_sae] bool): whether each latent fires anywhere in each document."""
    doc_N = store.gather("doc_id", rows).numpy()
    docs, inv = np.unique(doc_N, return_inverse=True)
    fires = torch.zeros(len(docs), sae.cfg.d_sae, dtype=torch.bool)
    with inference_mode(sae):
        for lo in tqdm(range(0, len(rows), chunk), desc="encoding for co-occurrence", leave=False):
            code = sae.encode(store.gather("acts", rows[lo:lo + chunk]))
            g_N = torch.from_numpy(inv[lo:lo + chunk])[:, None].expand_as(code.indices)
            on = code.values > 0
            fires[g_N[on], code.indices[on]] = True
    return docs, fires


def phi_coefficients(B_NM: Tensor) -> Tensor:
    """Phi (Pearson of binary) coefficient between every two columns of a 0/1 matrix, `[M, M]`."""
    B = B_NM.double()
    n = B.shape[0]
    p = B.mean(0)
    cov = B.T @ B / n - p[:, None] * p[None]
    sd = (p * (1 - p)).sqrt()
    return cov / (sd[:, None] * sd[None]).clamp_min(1e-12)


def cooccurrence_lobes(fires_GF: Tensor, n_lobes: int = 3, top_latents: int = 512, seed: int = 0) -> dict:
    """Spectral clustering of the `top_latents` most frequent latents by their phi co-occurrence
    coefficient over documents: `latents`, their `lobe`, a 2-d spectral embedding `xy` to draw, the
    lobe sizes, and `within_phi` / `between_phi` (mean phi inside vs across lobes)."""
    from scipy.cluster.vq import kmeans2

    freq = fires_GF.float().mean(0)
    latents = freq.argsort(descending=True)[: min(top_latents, int((freq > 0).sum()))]
    if latents.numel() < n_lobes + 1:
        raise SaekitError(f"cooccurrence_lobes: expected more than {n_lobes} latents that fire, found {latents.numel()}")
    phi = phi_coefficients(fires_GF[:, latents])
    A = phi.clamp_min(0)
    A.fill_diagonal_(0)
    deg = A.sum(1).clamp_min(1e-12)
    L = A / deg.sqrt()[:, None] / deg.sqrt()[None]
    vals, vecs = torch.linalg.eigh(L)
    emb = vecs[:, -n_lobes:].flip(1)
    emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    _, lobe = kmeans2(emb.numpy(), n_lobes, seed=seed, minit="++")
    lobe_t = torch.from_numpy(lobe)
    same = lobe_t[:, None] == lobe_t[None]
    off = ~torch.eye(len(lobe), dtype=torch.bool)
    return {"latents": latents.tolist(), "lobe": lobe.tolist(), "xy": vecs[:, -3:-1].flip(1).tolist(),
            "sizes": np.bincount(lobe, minlength=n_lobes).tolist(), "frequency": freq[latents].tolist(),
            "within_phi": float(phi[same & off].mean()), "between_phi": float(phi[~same].mean())}


def dictionary_geometry(sae: SparseAutoencoder, store=None, max_rows: int = 50000, n_lobes: int = 3,
                        top_latents: int = 512, seed: int = 0) -> dict:
    """The decoder's eigenvalue spectrum with its power-law fit, and (given a store) the co-occurrence lobes."""
    eig = decoder_spectrum(sae.W_dec)
    out = {"eigenvalues": eig.tolist(), "power_law": power_law_fit(eig), "d_sae": sae.cfg.d_sae,
           "d_in": sae.cfg.d_in}
    if store is not None:
        rows = sample_rows(store, max_rows, seed)
        _, fires = firing_documents(sae, store, rows)
        out["lobes"] = cooccurrence_lobes(fires, n_lobes, top_latents, seed)
        out["lobes"]["documents"] = int(fires.shape[0])
    return out
