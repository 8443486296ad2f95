"""Splice-in downstream loss: how much of the language model's loss survives the SAE.

The hooked activation is replaced by the SAE's reconstruction (through the one hook adapter, so
HF module paths and TransformerLens hook names behave the same) and the next-token cross-entropy
and the KL divergence to the clean model are measured, against zero- and mean-ablation of the
same activation. As SAELens / dictionary_learning / SAEBench define it:

    loss_recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean)

so an identity replacement scores 1 and the ablation itself scores 0.

Pass-through positions: the store leaves special tokens (BOS) out and flags massive-activation
outliers (`saekit.store.outliers`), so the SAE is neither trained nor judged on them. Positions
whose token is in `passthrough_ids` or whose activation norm exceeds `passthrough_norm` keep their
own activation in every variant (spliced, zero- and mean-ablated): the loss measures the SAE on the
positions it is responsible for, and the ablation baselines remove the same positions. The result
says how many positions were passed through and why (`passthrough`).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.eval.bootstrap import DEFAULT_RESAMPLES, Bootstrap, loss_recovered_from_sums
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


def passthrough_mask(acts_BTD: Tensor, ids_BT: Tensor, norm_threshold: float | None,
                     special_ids: set[int] | frozenset = frozenset()) -> tuple[Tensor, Tensor]:
    """(outlier_BT, special_BT): positions whose activation norm exceeds the threshold, and positions
    holding a special token; both keep their own activation."""
    norm_BT = acts_BTD.double().pow(2).sum(-1).sqrt()
    outlier_BT = norm_BT > norm_threshold if norm_threshold is not None else torch.zeros_like(norm_BT, dtype=torch.bool)
    special_BT = torch.isin(ids_BT.to(acts_BTD.device), torch.tensor(sorted(special_ids), device=acts_BTD.device,
                                                                     dtype=ids_BT.dtype)) \
        if special_ids else torch.zeros_like(outlier_BT)
    return outlier_BT, special_BT & ~outlier_BT


def _passing_through(fn: Replacement, keep_BT: Tensor) -> Replacement:
    def replace(acts: Tensor) -> Tensor:
        new = fn(acts)
        return torch.where(keep_BT.to(acts.device).unsqueeze(-1), acts, new)

    return replace


@torch.no_grad()
def splice_lm_loss(model, tokenizer, hook: str, sae=None, texts: list[str] = (), *,
                   reconstruct: Replacement | None = None, mean_acts_D: Tensor | None = None,
                   max_length: int = 64, batch_size: int = 8, passthrough_norm: float | None = None,
                   passthrough_ids: set[int] | frozenset = frozenset(), resamples: int = DEFAULT_RESAMPLES,
                   seed: int = 0) -> dict:
    """CE / KL of the clean, spliced, zero-ablated and (if `mean_acts_D`) mean-ablated model.

    Give an SAE (its reconstruction is spliced in) or any `reconstruct(acts) -> acts` function.
    Positions with activation norm > `passthrough_norm` or a token in `passthrough_ids` keep their
    own activation in every variant (see the module docstring). `ci95` holds intervals of the CEs,
    KLs and loss recovered, bootstrapped over documents from per-document sums (`resamples` 0: none).
    """
    replace = reconstruct or _sae_replacement(sae)
    variants: dict[str, Replacement] = {"spliced": replace, "zero_ablation": torch.zeros_like}
    if mean_acts_D is not None:
        variants["mean_ablation"] = lambda a: mean_acts_D.to(a).expand_as(a).clone()
    ce = {k: [] for k in ["clean", *variants]}
    kl = {k: [] for k in variants}
    cfg = SourceConfig(hooks=[hook], max_length=max_length, padding_side="right")
    passed = {"outlier_positions": 0, "special_positions": 0}
    doc_of: list[Tensor] = []  # the document index of every measured position
    for i in range(0, len(texts), batch_size):
        enc = tokenize(tokenizer, list(texts[i: i + batch_size]), cfg)
        with capture_point(model, hook) as got:
            clean_logits = model_logits(model, enc)
        clean_ce, _, clean_logp = token_losses(clean_logits, enc["input_ids"], enc["attention_mask"])
        ce["clean"].append(clean_ce)
        doc_BT = torch.arange(i, i + enc["input_ids"].shape[0])[:, None].expand_as(enc["input_ids"])
        doc_of.append(doc_BT[:, 1:][(enc["attention_mask"][:, 1:] * enc["attention_mask"][:, :-1]).bool().cpu()])
        outlier_BT, special_BT = passthrough_mask(got[0], enc["input_ids"], passthrough_norm, passthrough_ids)
        real_BT = enc["attention_mask"].bool().to(outlier_BT.device)
        passed["outlier_positions"] += int((outlier_BT & real_BT).sum())
        passed["special_positions"] += int((special_BT & real_BT).sum())
        keep_BT = outlier_BT | special_BT
        for name, fn in variants.items():
            with hook_point(model, hook, _passing_through(fn, keep_BT)):
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
    out["ci95"] = splice_intervals(torch.cat(doc_of), ce, kl, len(texts), resamples, seed) if resamples else None
    out["passthrough"] = {**passed, "norm_threshold": passthrough_norm, "special_ids": sorted(passthrough_ids),
                          "note": "these positions kept their own activation in the spliced and ablated models"}
    return out


def splice_intervals(doc_P: Tensor, ce: dict[str, list[Tensor]], kl: dict[str, list[Tensor]], n_docs: int,
                     resamples: int, seed: int) -> dict | None:
    """Bootstrap over documents of the splice-in figures: per-document sums of each variant's CE
    and KL and of the token count, so every resample is one matrix product."""
    if n_docs < 2 or doc_P.numel() == 0:
        return None
    doc_P = doc_P.cpu().long()

    def per_doc(v_P: Tensor) -> Tensor:
        return torch.zeros(n_docs, dtype=torch.float64).index_add_(0, doc_P, v_P.detach().double().cpu())

    stats = {name: per_doc(torch.cat(v)) for name, v in ce.items()}
    stats.update({f"kl_{name}": per_doc(torch.cat(v)) for name, v in kl.items()})
    stats["n"] = per_doc(torch.ones(doc_P.numel()))
    keep = stats["n"] > 0
    stats = {k: v[keep] for k, v in stats.items()}
    boot = Bootstrap(int(keep.sum()), resamples, seed)
    out = {f"ce_{k}" if k != "clean" else "ce_clean": boot.ratio_ci(v, stats["n"])
           for k, v in stats.items() if k != "n" and not k.startswith("kl_")}
    out.update({k: boot.ratio_ci(v, stats["n"]) for k, v in stats.items() if k.startswith("kl_")})
    abl = "mean_ablation" if "mean_ablation" in ce else "zero_ablation"
    for name in {"zero_ablation", abl}:
        out[f"loss_recovered_vs_{name.split('_')[0]}"] = boot.ci(lambda s, a=name: loss_recovered_from_sums(s, a), stats)
    out["loss_recovered"] = out[f"loss_recovered_vs_{abl.split('_')[0]}"]
    return out


@contextlib.contextmanager
def capture_point(model, hook: str):
    """Record the activation at `hook` during the block's clean forward (list of one tensor [B, T, D])."""
    got: list[Tensor] = []
    with hook_point(model, hook, lambda a: got.append(a.detach()) or None):
        yield got


def _recovered(mean: dict[str, float], ablation: str) -> float | None:
    gap = mean[ablation] - mean["clean"]
    if abs(gap) < 1e-12:
        return None
    return (mean[ablation] - mean["spliced"]) / gap
