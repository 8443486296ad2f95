"""Splice-in downstream loss: how much of the language model's loss survives the SAE.

The hooked activation is replaced by the SAE's reconstruction (through the one hook adapter, so
HF module paths and TransformerLens hook names behave the same) and the next-token cross-entropy
and the KL divergence to the clean model are measured, against zero- and mean-ablation of the
same activation. As SAELens / dictionary_learning / SAEBench define it:

    loss_recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean)

so an identity replacement scores 1 and the ablation itself scores 0.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.sources.base import SourceConfig
from saekit.sources.hf import tokenize
from saekit.sources.hooks import hook_point, is_lens_model

Replacement = Callable[[Tensor], Tensor]


def model_logits(model, enc: dict[str, Tensor]) -> Tensor:
    """Logits `[B, T, vocab]` from an HF causal LM or a TransformerLens model (right padding)."""
    if is_lens_model(model):
        return model(enc["input_ids"])
    return model(**enc, use_cache=False).logits


def token_losses(logits_BTV: Tensor, ids_BT: Tensor, mask_BT: Tensor, clean_logp_BTV: Tensor | None = None):
    """Per-position next-token CE (and KL to the clean distribution) over real target tokens."""
    logp = F.log_softmax(logits_BTV[:, :-1].float(), -1)
    target = ids_BT[:, 1:]
    valid = (mask_BT[:, 1:] * mask_BT[:, :-1]).bool()
    ce = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[valid]
    kl = None
    if clean_logp_BTV is not None:
        kl = (clean_logp_BTV.exp() * (clean_logp_BTV - logp)).sum(-1)[valid]
    return ce, kl, logp


def _sae_replacement(sae) -> Replacement:
    def replace(acts: Tensor) -> Tensor:
        return sae(acts.to(sae_dtype(sae))).recon.to(acts.dtype)

    return replace


def sae_dtype(sae) -> torch.dtype:
    return next(sae.parameters()).dtype


@torch.no_grad()
def splice_lm_loss(model, tokenizer, hook: str, sae=None, texts: list[str] = (), *,
                   reconstruct: Replacement | None = None, mean_acts_D: Tensor | None = None,
                   max_length: int = 64, batch_size: int = 8) -> dict:
    """CE / KL of the clean, spliced, zero-ablated and (if `mean_acts_D`) mean-ablated model.

    Give an SAE (its reconstruction is spliced in) or any `reconstruct(acts) -> acts` function.
    """
    replace = reconstruct or _sae_replacement(sae)
    variants: dict[str, Replacement] = {"spliced": replace, "zero_ablation": torch.zeros_like}
    if mean_acts_D is not None:
        variants["mean_ablation"] = lambda a: mean_acts_D.to(a).expand_as(a).clone()
    ce = {k: [] for k in ["clean", *variants]}
    kl = {k: [] for k in variants}
    cfg = SourceConfig(hooks=[hook], max_length=max_length, padding_side="right")
    for i in range(0, len(texts), batch_size):
        enc = tokenize(tokenizer, list(texts[i: i + batch_size]), cfg)
        clean_ce, _, clean_logp = token_losses(model_logits(model, enc), enc["input_ids"], enc["attention_mask"])
        ce["clean"].append(clean_ce)
        for name, fn in variants.items():
            with hook_point(model, hook, fn):
                logits = model_logits(model, enc)
            c, k, _ = token_losses(logits, enc["input_ids"], enc["attention_mask"], clean_logp)
            ce[name].append(c)
            kl[name].append(k)
    mean = {k: torch.cat(v).mean().item() for k, v in ce.items()}
    out = {"hook": hook, "n_tokens": int(torch.cat(ce["clean"]).numel()), "n_docs": len(texts),
           "ce_clean": mean["clean"], "ce_spliced": mean["spliced"], "ce_zero_ablation": mean["zero_ablation"],
           "kl_spliced": torch.cat(kl["spliced"]).mean().item(),
           "kl_zero_ablation": torch.cat(kl["zero_ablation"]).mean().item(),
           "loss_recovered_vs_zero": _recovered(mean, "zero_ablation")}
    if "mean_ablation" in mean:
        out.update(ce_mean_ablation=mean["mean_ablation"], kl_mean_ablation=torch.cat(kl["mean_ablation"]).mean().item(),
                   loss_recovered_vs_mean=_recovered(mean, "mean_ablation"))
    out["loss_recovered"] = out.get("loss_recovered_vs_mean", out["loss_recovered_vs_zero"])
    return out


def _recovered(mean: dict[str, float], ablation: str) -> float | None:
    gap = mean[ablation] - mean["clean"]
    if abs(gap) < 1e-12:
        return None
    return (mean[ablation] - mean["spliced"]) / gap
