"""Per-feature statistics and the sparse latent index, streamed over an activation store.

Two passes, memory bounded by the number of features, never by the number of rows:

1. **encode** every chunk of the store with the SAE; append the chunk's sparse code to the latent
   index (one safetensors part per chunk: `indices [n, k] int32`, `values [n, k] float16`), and
   fold it into running per-feature counts, sums, maxima and top-`K` examples (a grouped top-k
   merge of the kept examples with the chunk's firings, pre-filtered by each feature's current
   K-th best value);
2. **re-read the index** (no second encode): activation histograms on `[0, max_f]` (the maxima are
   known after pass 1), reservoir samples per activation interval (random priorities, grouped top-s),
   and co-firing pair counts (sparse keys `a * F + b`, merged per chunk; when the number of distinct
   pairs passes `max_pairs` only the most frequent half is kept — lossy counting, flagged in the
   result).

Then, from the small per-feature tables: decoder-cosine neighbours, feature families (parents whose
firing set contains the child's, "Disentangling Dense Embeddings", O'Neill et al. 2024), the logit
lens (`W_dec @ W_U`, after the final norm's weight); and for the examples kept by the two passes,
their token contexts (`gather_examples`), the label distribution of a feature's top examples and
the list table's search text (`feature_summary`). The browser build only assembles these into files.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saekit.artifacts import save_tensors
from saekit.config import Config, param
from saekit.sae.base import SparseAutoencoder, inference_mode

log = logging.getLogger(__name__)
INDEX_PART = "part-{:05d}.safetensors"


@dataclass
class AnalyzeConfig(Config):
    """What the feature analysis computes (the `analyze:` section of a run config)."""

    chunk_rows: int = param(8192, "store rows encoded per chunk (bounds peak memory)", ge=1)
    pair_chunk_rows: int = param(2048, "rows per co-occurrence step (k² pairs per row)", ge=1)
    top_examples: int = param(20, "top-activating examples kept per feature", ge=1)
    quantiles: int = param(5, "activation intervals of [0, max] sampled per feature", ge=1)
    per_quantile: int = param(3, "examples sampled per interval", ge=0)
    hist_bins: int = param(32, "bins of each feature's activation histogram", ge=1)
    context: int = param(8, "tokens shown on each side of an LLM example", ge=0)
    neighbours: int = param(10, "decoder-cosine neighbours per feature", ge=0)
    cooccur: int = param(10, "top co-firing features per feature", ge=0)
    logit_tokens: int = param(10, "promoted / suppressed tokens per feature (LLM runs)", ge=0)
    logit_lens: bool = param(True, "compute the logit lens (loads the language model's unembedding)")
    family_threshold: float = param(0.9, "P(parent fires | child fires) for a parent link", gt=0.0, le=1.0)
    family_min_count: int = param(3, "firings a child needs to be placed in a family", ge=1)
    max_pairs: int = param(4_000_000, "distinct co-firing pairs kept (lossy counting beyond)", ge=1000)
    seed: int = param(0, "seed of the quantile reservoir samples")
    device: str = param("cpu", "device for encoding")


# -- small pure helpers -------------------------------------------------------------------
def grouped_top(group_M: Tensor, score_M: Tensor, k: int) -> Tensor:
    """Positions of the `k` highest scores within each group (ties keep the earlier position)."""
    if group_M.numel() == 0:
        return group_M.new_zeros(0, dtype=torch.int64)
    order = torch.argsort(score_M, descending=True, stable=True)
    order = order[torch.argsort(group_M[order], stable=True)]
    g = group_M[order]
    pos = torch.arange(len(g))
    starts = torch.ones(len(g), dtype=torch.bool)
    starts[1:] = g[1:] != g[:-1]
    first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), 0).values
    return order[(pos - first) < k]


def firings(indices_NK: Tensor, values_NK: Tensor, row0: int) -> tuple[Tensor, Tensor, Tensor]:
    """Flat (feature, value, global row) of the active slots of a chunk's sparse code."""
    active = values_NK > 0
    n, k = values_NK.shape
    rows = (torch.arange(n, dtype=torch.int64) + row0).unsqueeze(1).expand(n, k)
    return indices_NK[active].to(torch.int64), values_NK[active].float(), rows[active]


def histogram_bins(values_M: Tensor, max_M: Tensor, n_bins: int) -> Tensor:
    """Bin of each value on its feature's `[0, max]` range (the maximum falls in the last bin)."""
    scaled = values_M / max_M.clamp_min(torch.finfo(torch.float32).tiny)
    return (scaled * n_bins).floor().clamp(0, n_bins - 1).to(torch.int64)


def row_pairs(indices_NK: Tensor, values_NK: Tensor, d_sae: int) -> Tensor:
    """Keys `a * d_sae + b` (a < b) of every pair of latents active together in a row."""
    active = values_NK > 0
    idx = torch.where(active, indices_NK.to(torch.int64), torch.full_like(indices_NK, -1, dtype=torch.int64))
    a, b = idx.unsqueeze(2), idx.unsqueeze(1)
    ok = (a >= 0) & (b >= 0) & (a < b)
    return (a * d_sae + b).expand_as(ok)[ok] if ok.any() else torch.zeros(0, dtype=torch.int64)


def merge_counts(keys: Tensor, counts: Tensor, new_keys: Tensor, max_pairs: int) -> tuple[Tensor, Tensor, bool]:
    """Add `new_keys` occurrences to a sparse (keys, counts) table; returns (keys, counts, truncated)."""
    all_keys = torch.cat([keys, new_keys])
    all_counts = torch.cat([counts, torch.ones(len(new_keys), dtype=torch.int64)])
    uniq, inv = torch.unique(all_keys, return_inverse=True)
    summed = torch.zeros(len(uniq), dtype=torch.int64).scatter_add_(0, inv, all_counts)
    if len(uniq) <= max_pairs:
        return uniq, summed, False
    keep = torch.topk(summed, max_pairs // 2).indices.sort().values
    return uniq[keep], summed[keep], True


# -- pass 1: encode, index, running statistics ----------------------------------------------
@dataclass
class RunningStats:
    """Counts, sums, maxima and the current top examples of every feature."""

    d_sae: int
    top_k: int
    count_F: Tensor = None
    sum_F: Tensor = None
    max_F: Tensor = None
    top_f: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    top_v: Tensor = field(default_factory=lambda: torch.zeros(0))
    top_r: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def __post_init__(self):
        self.count_F = torch.zeros(self.d_sae, dtype=torch.int64)
        self.sum_F = torch.zeros(self.d_sae, dtype=torch.float64)
        self.max_F = torch.zeros(self.d_sae)
        self.thr_F = torch.zeros(self.d_sae)

    def update(self, f: Tensor, v: Tensor, r: Tensor) -> None:
        self.count_F += torch.bincount(f, minlength=self.d_sae)
        self.sum_F.index_add_(0, f, v.double())
        self.max_F.scatter_reduce_(0, f, v, reduce="amax")
        cand = v > self.thr_F[f]
        f, v, r = torch.cat([self.top_f, f[cand]]), torch.cat([self.top_v, v[cand]]), torch.cat([self.top_r, r[cand]])
        keep = grouped_top(f, v, self.top_k)
        self.top_f, self.top_v, self.top_r = f[keep], v[keep], r[keep]
        full = torch.bincount(self.top_f, minlength=self.d_sae) >= self.top_k
        kth = torch.full((self.d_sae,), float("inf")).scatter_reduce_(0, self.top_f, self.top_v, reduce="amin")
        self.thr_F = torch.where(full, kth, torch.zeros_like(kth))


def encode_pass(store, sae: SparseAutoencoder, cfg: AnalyzeConfig, index_dir: Path) -> tuple[RunningStats, list[dict]]:
    """Pass 1: encode the store chunk by chunk; write the latent index parts; running stats."""
    index_dir.mkdir(parents=True, exist_ok=True)
    stats, parts = RunningStats(sae.cfg.d_sae, cfg.top_examples), []
    sae = sae.to(cfg.device)
    n_chunks = -(-len(store) // cfg.chunk_rows)
    chunks = tqdm(store.iter_chunks(cfg.chunk_rows), total=n_chunks, desc="encoding", unit="chunk",
                  dynamic_ncols=True, disable=n_chunks < 4)
    with inference_mode(sae):
        for i, (row0, acts_ND) in enumerate(chunks):
            code = sae.encode(acts_ND.to(cfg.device, sae.cfg.torch_dtype))
            idx_NK, val_NK = code.indices.cpu().to(torch.int32), code.values.float().cpu().clamp(min=0)
            name = INDEX_PART.format(i)
            sha = save_tensors(index_dir / name, {"indices": idx_NK, "values": val_NK.clamp(max=65504).half()})
            parts.append({"file": name, "row_start": int(row0), "rows": int(len(idx_NK)), "sha256": sha})
            stats.update(*firings(idx_NK, val_NK, row0))
    return stats, parts


def iter_index(index_dir: Path, parts: list[dict], rows_per_step: int):
    """Re-read the latent index in steps of `rows_per_step`: (row0, indices [n,k], values [n,k] float)."""
    from saekit.artifacts import load_tensors

    for p in parts:
        t = load_tensors(index_dir / p["file"])
        for lo in range(0, p["rows"], rows_per_step):
            hi = min(p["rows"], lo + rows_per_step)
            yield p["row_start"] + lo, t["indices"][lo:hi], t["values"][lo:hi].float()


# -- pass 2: histograms, quantile samples, co-occurrence ------------------------------------
@dataclass
class IndexStats:
    hist_FB: Tensor
    sample_f: Tensor
    sample_q: Tensor
    sample_v: Tensor
    sample_r: Tensor
    pair_keys: Tensor
    pair_counts: Tensor
    pairs_truncated: bool


def index_pass(index_dir: Path, parts: list[dict], max_F: Tensor, cfg: AnalyzeConfig) -> IndexStats:
    """Pass 2 over the index only: histograms, interval samples and co-firing counts."""
    d_sae, B, Q = len(max_F), cfg.hist_bins, cfg.quantiles
    hist = torch.zeros(d_sae * B, dtype=torch.int64)
    s_g, s_p, s_v, s_r = (torch.zeros(0, dtype=torch.int64), torch.zeros(0), torch.zeros(0),
                          torch.zeros(0, dtype=torch.int64))
    keys, counts, truncated = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), False
    gen = torch.Generator().manual_seed(cfg.seed)
    for row0, idx_NK, val_NK in iter_index(index_dir, parts, cfg.pair_chunk_rows):
        f, v, r = firings(idx_NK, val_NK, row0)
        hist += torch.bincount(f * B + histogram_bins(v, max_F[f], B), minlength=d_sae * B)
        if cfg.per_quantile:
            g = f * Q + histogram_bins(v, max_F[f], Q)
            prio = torch.rand(len(g), generator=gen)
            g, p, v, r = torch.cat([s_g, g]), torch.cat([s_p, prio]), torch.cat([s_v, v]), torch.cat([s_r, r])
            keep = grouped_top(g, p, cfg.per_quantile)
            s_g, s_p, s_v, s_r = g[keep], p[keep], v[keep], r[keep]
        if cfg.cooccur or cfg.family_threshold:
            keys, counts, cut = merge_counts(keys, counts, row_pairs(idx_NK, val_NK, d_sae), cfg.max_pairs)
            truncated |= cut
    order = torch.argsort(s_v, descending=True, stable=True)
    order = order[torch.argsort(s_g[order], stable=True)]
    return IndexStats(hist.view(d_sae, B), s_g[order] // Q, s_g[order] % Q, s_v[order], s_r[order],
                      keys, counts, truncated)


# -- per-feature tables from small inputs ------------------------------------------------------
@torch.no_grad()
def decoder_neighbours(W_dec_FD: Tensor, n: int, block: int = 1024) -> tuple[Tensor, Tensor]:
    """The `n` other features with the most similar decoder direction: (indices [F, n], cosines [F, n])."""
    F = W_dec_FD.shape[0]
    n = min(n, F - 1)
    unit = torch.nn.functional.normalize(W_dec_FD.float(), dim=1)
    idx, cos = torch.zeros(F, max(n, 0), dtype=torch.int64), torch.zeros(F, max(n, 0))
    if n <= 0:
        return idx, cos
    for lo in range(0, F, block):
        sims = unit[lo:lo + block] @ unit.T
        sims[torch.arange(sims.shape[0]), torch.arange(lo, lo + sims.shape[0])] = -float("inf")
        top = sims.topk(n, dim=1)
        idx[lo:lo + block], cos[lo:lo + block] = top.indices, top.values
    return idx, cos


@torch.no_grad()
def logit_lens(W_dec_FD: Tensor, W_U_VD: Tensor, norm_D: Tensor | None, n: int, block: int = 512):
    """Tokens each feature's decoder direction promotes and suppresses through the unembedding.

    Returns (pos_ids [F, n], pos_vals, neg_ids, neg_vals). The final norm's weight scales the
    direction first (the norm's rescaling by the residual's RMS is a positive factor and drops out).
    """
    d = W_dec_FD.float() * (norm_D.float() if norm_D is not None else 1.0)
    F, n = d.shape[0], min(n, W_U_VD.shape[0])
    out = [torch.zeros(F, n, dtype=torch.int64), torch.zeros(F, n), torch.zeros(F, n, dtype=torch.int64), torch.zeros(F, n)]
    W_U = W_U_VD.float()
    for lo in range(0, F, block):
        logits = d[lo:lo + block] @ W_U.T
        top, bot = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        out[0][lo:lo + block], out[1][lo:lo + block] = top.indices, top.values
        out[2][lo:lo + block], out[3][lo:lo + block] = bot.indices, bot.values
    return tuple(out)


def pair_table(keys: Tensor, counts: Tensor, d_sae: int) -> tuple[Tensor, Tensor, Tensor]:
    """Both directions of the unordered pair counts: (feature, other, count)."""
    a, b = keys // d_sae, keys % d_sae
    return torch.cat([a, b]), torch.cat([b, a]), torch.cat([counts, counts])


def top_cooccurring(keys: Tensor, counts: Tensor, count_F: Tensor, n: int):
    """Per feature its `n` most frequent co-firing partners: (feature, other, count, P(other | feature))."""
    f, o, c = pair_table(keys, counts, len(count_F))
    keep = grouped_top(f, c.double() + 1e-9 * o.double().neg(), n) if n else torch.zeros(0, dtype=torch.int64)
    f, o, c = f[keep], o[keep], c[keep]
    order = torch.argsort(c, descending=True, stable=True)
    order = order[torch.argsort(f[order], stable=True)]
    f, o, c = f[order], o[order], c[order]
    return f, o, c, c.double() / count_F[f].clamp_min(1).double()


def feature_families(keys: Tensor, counts: Tensor, count_F: Tensor, threshold: float, min_count: int) -> tuple[Tensor, Tensor]:
    """Parent of each feature (-1 if none) and P(parent | child): the parent's firing set (nearly)
    contains the child's — P(parent fires | child fires) ≥ threshold — and the parent fires more often.

    Among candidates the most-contained (highest conditional) parent wins, ties to the denser one, so
    each child has at most one parent and the links form a forest (parents are strictly denser).
    """
    F = len(count_F)
    child, parent, c = pair_table(keys, counts, F)
    p_cond = c.double() / count_F[child].clamp_min(1).double()
    ok = (p_cond >= threshold) & (count_F[parent] > count_F[child]) & (count_F[child] >= min_count)
    child, parent, p_cond = child[ok], parent[ok], p_cond[ok]
    score = p_cond + 1e-12 * count_F[parent].double()
    best = grouped_top(child, score, 1)
    parent_F = torch.full((F,), -1, dtype=torch.int64)
    p_F = torch.zeros(F, dtype=torch.float64)
    parent_F[child[best]] = parent[best]
    p_F[child[best]] = p_cond[best]
    return parent_F, p_F


# -- examples: contexts and per-token activations ------------------------------------------------
def feature_values_at(index_rows: tuple[np.ndarray, np.ndarray], feature_M: np.ndarray) -> np.ndarray:
    """Activation of `feature_M[m]` in each gathered index row m (0 when it is not active there)."""
    idx, val = index_rows
    hit = idx == feature_M[:, None]
    return np.where(hit, val.astype(np.float32), 0.0).sum(1)


def example_windows(rows_E: np.ndarray, n_rows: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Global rows of each example's window `[r - c, r + c]` (clipped) and its validity mask."""
    offs = np.arange(-context, context + 1)
    win = rows_E[:, None] + offs[None, :]
    valid = (win >= 0) & (win < n_rows)
    return np.clip(win, 0, max(n_rows - 1, 0)), valid


IndexRows = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # rows -> (indices [m, k], values [m, k])


@dataclass
class TokenWindows:
    """For each example of an LLM store, the `[r - c, r + c]` window of rows around it (same document only)."""

    rows_EW: np.ndarray  # global rows of the window (clipped to the store)
    valid_EW: np.ndarray  # inside the store and in the example's document
    token_EW: np.ndarray  # token id at each window position
    acts_EW: np.ndarray  # the example's feature's activation at each window position


@dataclass
class ExampleSet:
    """Every example the bundle shows (top examples and interval samples), flat, in the passes' order."""

    feature_E: np.ndarray
    value_E: np.ndarray
    row_E: np.ndarray
    interval_E: np.ndarray  # -1: a top example, else the activation interval it was sampled from
    doc_E: np.ndarray
    pos_E: np.ndarray
    windows: TokenWindows | None  # None for embedding stores (one row per document)

    def by_feature(self, d_sae: int) -> list[np.ndarray]:
        """Example positions of each feature: top examples first (best first), then interval samples."""
        order = np.lexsort((np.arange(len(self.feature_E)), self.interval_E, self.feature_E))
        bounds = np.searchsorted(self.feature_E[order], np.arange(d_sae + 1))
        return [order[bounds[f]:bounds[f + 1]] for f in range(d_sae)]


def gather_examples(stats: RunningStats, istats: IndexStats, store, index_rows: IndexRows,
                    context: int) -> ExampleSet:
    """Doc ids and positions of every kept example; for LLM stores its token window and the feature's
    activation on each token (read back from the latent index, not re-encoded)."""
    n_top = len(stats.top_f)
    feature_E = torch.cat([stats.top_f, istats.sample_f]).numpy()
    row_E = torch.cat([stats.top_r, istats.sample_r]).numpy()
    ex = ExampleSet(feature_E=feature_E, value_E=torch.cat([stats.top_v, istats.sample_v]).numpy(), row_E=row_E,
                    interval_E=np.concatenate([np.full(n_top, -1), istats.sample_q.numpy()]),
                    doc_E=store.gather("doc_id", row_E).numpy(), pos_E=store.gather("pos", row_E).numpy(),
                    windows=None)
    if store.kind != "embedding" and len(row_E):
        ex.windows = _token_windows(ex, store, index_rows, context)
    return ex


def _token_windows(ex: ExampleSet, store, index_rows: IndexRows, context: int) -> TokenWindows:
    rows_EW, valid_EW = example_windows(ex.row_E, len(store), context)
    flat = rows_EW.ravel()
    doc_EW = store.gather("doc_id", flat).numpy().reshape(rows_EW.shape)
    token_EW = store.gather("token_id", flat).numpy().reshape(rows_EW.shape)
    acts_EW = feature_values_at(index_rows(flat), np.repeat(ex.feature_E, rows_EW.shape[1])).reshape(rows_EW.shape)
    return TokenWindows(rows_EW, valid_EW & (doc_EW == ex.doc_E[:, None]), token_EW, acts_EW)


def label_distribution(labels: list[dict]) -> dict[str, dict[str, int]]:
    """Per label key, how many of the given examples carry each (scalar) value, most common first."""
    out: dict[str, Counter] = {}
    for lab in labels:
        for k, v in (lab or {}).items():
            if v is not None and not isinstance(v, (dict, list)):
                out.setdefault(k, Counter())[str(v)] += 1
    return {k: dict(c.most_common()) for k, c in out.items()}


def join_tokens(tokens: list[str]) -> str:
    """Text of a token window: BPE pieces carry their own spaces, word-level tokens need them added."""
    return "".join(tokens) if any(t[:1].isspace() for t in tokens) else " ".join(tokens)


def feature_summary(top: list[dict], labels: dict[str, dict[str, int]], promoted: list) -> dict[str, str]:
    """The list table's search text of a feature: its top examples' centre tokens and text, dominant
    labels, and promoted tokens. `top` holds example records (`tokens` + `center`, or `text`)."""
    if top and "tokens" in top[0]:
        seen: list[str] = []
        for it in top:
            t = it["tokens"][it["center"]] if it["tokens"] else ""
            if t not in seen:
                seen.append(t)
        tokens, text = " | ".join(seen[:6]), join_tokens(top[0]["tokens"])
    else:
        tokens, text = "", (top[0]["text"] if top else "")
    n = max(len(top), 1)
    lab = ", ".join(f"{k}={max(c, key=c.get)} ({100 * max(c.values()) // n}%)" for k, c in labels.items() if c)
    return {"top_tokens": tokens, "top_text": text[:200], "top_labels": lab,
            "promoted": " | ".join(p[0] for p in promoted[:5])}
