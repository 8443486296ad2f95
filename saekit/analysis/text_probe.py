"""Reading texts through a model: pooled activations at a hook, and a linear probe on them.

    pooled_GD = pooled_activations(model, tok, texts, "model.layers.20")          # one row per text
    probe = fit_linear_probe(pooled_pos, pooled_neg, hook="model.layers.20")       # airline vs the rest
    scores_G = probe_scores(model, tok, texts, probe)                              # P(positive) per text
    scores_G = probe_scores(model, tok, texts, probe, steer_hook="model.layers.15", sae=sae,
                            edits=[FeatureEdit(f, "ablate")])                      # with an edit upstream

Why: the steering sweep scores generated text with "the run's probe", and the contrastive search
compares two sets of texts by their pooled SAE codes; both need the same careful read of a batch of
texts: right padding with an attention mask, and position 0 left out of the pool (the first token is
an attention sink whose norm is tens of times the others' and would dominate every mean).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from saekit.analysis.steering import hf_model, steer
from saekit.errors import ConfigError, ShapeMismatchError
from saekit.sources.hooks import hook_points

Transform = Callable[[Tensor], Tensor]


def encode_batch(tokenizer, texts: Sequence[str], max_length: int, device, side: str = "right") -> dict:
    """Token ids and attention mask of `texts`, padded on `side` (the tokenizer's setting is restored)."""
    if not texts:
        raise ConfigError("expected at least one text, found none")
    old = tokenizer.padding_side
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = side
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    finally:
        tokenizer.padding_side = old
    return {"input_ids": enc.input_ids.to(device), "attention_mask": enc.attention_mask.to(device)}


def position_ids(mask_BT: Tensor) -> Tensor:
    """Positions that count real tokens only (what `generate` uses with left padding)."""
    return (mask_BT.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def forward_capture(model, batch: dict, hooks: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits `[B, T, V]` of one forward of the HF model behind `model`, and the activations at `hooks`
    (names resolved on `model`, so TransformerLens hook names work on a bridge)."""
    got: dict[str, Tensor] = {}
    fns = {h: (lambda t, h=h: got.__setitem__(h, t.detach())) for h in hooks}
    with hook_points(model, fns):
        out = hf_model(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=position_ids(batch["attention_mask"]))
    return out.logits.float(), got


def masked_mean(x_BTF: Tensor, keep_BT: Tensor) -> Tensor:
    """Mean over the kept positions of each row, `[B, F]` (zeros for a row with none kept)."""
    w = keep_BT.to(x_BTF.dtype)
    return (x_BTF * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)


@torch.no_grad()
def pooled_activations(model, tokenizer, texts: Sequence[str], hook: str, *, transform: Transform | None = None,
                       batch_size: int = 16, max_length: int = 64, skip_first: bool = True) -> Tensor:
    """One row per text: the mean over its tokens (position 0 left out) of the activation at `hook`,
    or of `transform(acts_BTD)` (e.g. the SAE's dense code) when given. `[G, D or F]`, float32 CPU."""
    dev = next(hf_model(model).parameters()).device
    rows = []
    for lo in range(0, len(texts), batch_size):
        batch = encode_batch(tokenizer, texts[lo: lo + batch_size], max_length, dev)
        _, acts = forward_capture(model, batch, [hook])
        x = acts[hook].float()
        x = transform(x) if transform is not None else x
        keep = batch["attention_mask"].bool().clone()
        if skip_first and keep.shape[1] > 1:
            keep[:, 0] = False
        rows.append(masked_mean(x.float(), keep.to(x.device)).cpu())
    return torch.cat(rows)


@dataclass
class LinearProbe:
    """A logistic probe on pooled activations at `hook`: P(positive) = σ(((x − mean) / scale) · w + b)."""

    hook: str
    w_D: Tensor
    b: float
    mean_D: Tensor
    scale_D: Tensor
    positive: str = "positive"

    def __call__(self, pooled_GD: Tensor) -> Tensor:
        if pooled_GD.shape[-1] != self.w_D.shape[0]:
            raise ShapeMismatchError(f"LinearProbe: expected rows of width {self.w_D.shape[0]}, "
                                     f"found {tuple(pooled_GD.shape)}")
        z = ((pooled_GD.float().cpu() - self.mean_D) / self.scale_D) @ self.w_D + self.b
        return torch.sigmoid(z)


def fit_linear_probe(pos_GD: Tensor, neg_HD: Tensor, hook: str, C: float = 1.0, positive: str = "positive",
                     ) -> LinearProbe:
    """Fit a standardised L2 logistic probe (sklearn) separating `pos_GD` from `neg_HD`."""
    from sklearn.linear_model import LogisticRegression

    if len(pos_GD) < 2 or len(neg_HD) < 2:
        raise ConfigError(f"fit_linear_probe: expected >= 2 rows per class, found {len(pos_GD)} and {len(neg_HD)}")
    X = torch.cat([pos_GD, neg_HD]).float().cpu()
    y = np.r_[np.ones(len(pos_GD)), np.zeros(len(neg_HD))]
    mean_D, scale_D = X.mean(0), X.std(0).clamp_min(1e-6)
    clf = LogisticRegression(C=C, max_iter=2000).fit(((X - mean_D) / scale_D).numpy(), y)
    return LinearProbe(hook, torch.from_numpy(clf.coef_[0]).float(), float(clf.intercept_[0]), mean_D, scale_D,
                       positive)


@torch.no_grad()
def probe_scores(model, tokenizer, texts: Sequence[str], probe: LinearProbe, *, steer_hook: str | None = None,
                 batch_size: int = 16, max_length: int = 64, **steer_kwargs) -> Tensor:
    """The probe's P(positive) for each text `[G]`, read with an edit at `steer_hook` when given (the
    probe's hook should then lie at or after it, so the probe sees the edit's consequences)."""
    ctx = steer(model, steer_hook, **steer_kwargs) if steer_hook is not None else contextlib.nullcontext()
    with ctx:
        pooled = pooled_activations(model, tokenizer, texts, probe.hook, batch_size=batch_size,
                                    max_length=max_length)
    return probe(pooled)
