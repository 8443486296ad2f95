"""Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries, general latents first.

A top-k (or BatchTopK) SAE whose latents are ordered into nested prefixes `widths = [w_1 < ... < w_P =
d_sae]`. The code is selected once over the whole dictionary, exactly as in `topk`; the loss then asks
every prefix to reconstruct the input on its own:

    x_hat_p = sum_{j in code, j < w_p} z_j W_dec[j] + b_dec        (prefix p uses its own latents only)
    loss    = sum_p ||x - x_hat_p||^2  (+ AuxK as in topk)

Why: a flat SAE may split a broad concept ("airline") into many narrow latents, because a narrow latent
can absorb the parent direction into its own. The first prefix has to reconstruct without the narrow
latents, so it learns the broad directions; later prefixes add the specifics on top. The first `w_1`
latents are then usable alone: a short, general code (adaptive-length retrieval, probing).

Layout follows SAELens's `matryoshka_batchtopk`: cumulative `matryoshka_widths` ending at `d_sae`, one
selection over all latents, the summed loss. Everything else (encoder, AuxK, threshold, folding, stats
buffers for distributed training) is `topk`'s, so the trainer needs nothing new. SAELens saves BatchTopK
matryoshka SAEs for inference as `jumprelu`; saekit's SAELens writer does the same (see formats/saelens).

With `prefix_selection: nested` (training only) each inner prefix instead reconstructs from its own top-k
(BatchTopK) among its first w_p latents, taken from the same pre-activations: x_hat_p = decode(TopK_k(pre[:, :w_p])).
Why: with one selection a general latent that the code passes over gets no gradient from its prefix's loss on
that row, and a first-prefix latent that settled early on a parent+child combination stays there. A prefix that
always chooses k of its own latents keeps every general latent in play; inference still uses the one code. On
planted hierarchies (tests/test_matryoshka_hierarchy.py) with a first prefix of 2 x the parents, every parent got
its own first-prefix latent in 8 of 8 seeds (global: 6 of 8). Cost: one top-k over `[N, w_p]` and k more
encoder slots per inner prefix (a step 1.32x the global one at 1,536 latents, k 32; scripts/bench_matryoshka.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.config import param
from saekit.errors import ConfigError
from saekit.sae.base import ForwardOutput, LossOutput, SparseCode
from saekit.sae.kernels.sparse import Select, serial, sparse_decode, squared_error_sum
from saekit.sae.registry import register
from saekit.sae.topk import TopKConfig, TopKSAE, batch_topk


def default_widths(d_sae: int) -> list[int]:
    """`[d_sae/16, d_sae/4, d_sae]` (rounded down, sizes below 1 dropped): three levels, each 4x wider."""
    return sorted({w for w in (d_sae // 16, d_sae // 4, d_sae) if w >= 1})


@dataclass
class MatryoshkaConfig(TopKConfig):
    matryoshka_widths: list[int] | None = param(
        None, "cumulative prefix sizes, strictly increasing, the last = d_sae (SAELens's name); "
              "None = [d_sae/16, d_sae/4, d_sae]")

    prefix_selection: str = param(
        "global", "which latents an inner prefix reconstructs with (training only; the code is always the one "
                  "selection): 'global' - the code's latents below w_p (SAELens, Bussmann et al.); 'nested' - its own "
                  "top-k (BatchTopK) among its first w_p latents, so a general latent the code passed over still "
                  "learns from its prefix's loss (more robust recovery of general directions, see the module doc)",
        choices=["global", "nested"])

    def validate(self) -> None:
        super().validate()
        w = self.matryoshka_widths
        if w is None:
            return
        if not w or any(b <= a for a, b in zip(w, w[1:])) or w[0] < 1:
            raise ConfigError(f"matryoshka: expected matryoshka_widths strictly increasing and >= 1, found {w}")
        if w[-1] != self.d_sae:
            raise ConfigError(f"matryoshka: expected the last of matryoshka_widths to equal d_sae={self.d_sae} "
                              f"(the whole dictionary is the outermost prefix), found {w}")

    @property
    def widths(self) -> list[int]:
        return list(self.matryoshka_widths) if self.matryoshka_widths is not None else default_widths(self.d_sae)


def prefix_levels(widths: list[int]) -> Tensor:
    """The prefix level of every latent `[d_sae]`: 0 for the first `w_1` latents, 1 up to `w_2`, ..."""
    sizes = torch.tensor([widths[0]] + [b - a for a, b in zip(widths, widths[1:])])
    return torch.repeat_interleave(torch.arange(len(widths)), sizes)


def prefix_reconstructions(idx_NK: Tensor, vals_NK: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor,
                           widths: list[int]) -> list[Tensor]:
    """`x_hat_p [N, d_in]` for every prefix: the code's latents with index < w_p decoded, the rest zeroed.
    Zeroed values also zero their gradient, so prefix p's loss never reaches a later latent."""
    return [sparse_decode(torch.where(idx_NK < w, vals_NK, torch.zeros_like(vals_NK)), idx_NK, W_dec_FD, b_dec_D)
            for w in widths]


def _prefix_topk(pre_NW: Tensor, k: int, batch: bool) -> tuple[Tensor, Tensor]:
    """`(idx, vals)` of a prefix's own selection: each row's top-k (ReLU on the k values), or BatchTopK's
    k*N largest of the batch, packed per row."""
    if batch:
        return batch_topk(pre_NW, k * pre_NW.shape[0])
    vals_NK, idx_NK = pre_NW.topk(min(k, pre_NW.shape[1]), dim=1, sorted=False)
    return idx_NK, vals_NK.clamp_min(0)


def matryoshka_losses(x_ND: Tensor, idx_NK: Tensor, vals_NK: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor,
                      widths: list[int]) -> Tensor:
    """Per-prefix reconstruction losses `[P]`: mean over rows of ||x - x_hat_p||^2 (pure function)."""
    n_rows = max(x_ND.shape[0], 1)
    recons = prefix_reconstructions(idx_NK, vals_NK, W_dec_FD, b_dec_D, widths)
    return torch.stack([squared_error_sum(r, x_ND) / n_rows for r in recons])


@register
class MatryoshkaSAE(TopKSAE):
    architecture = "matryoshka"
    config_class = MatryoshkaConfig

    def __init__(self, cfg: MatryoshkaConfig):
        super().__init__(cfg)
        self.cfg: MatryoshkaConfig = cfg
        self._prefix_sizes: list[int] = []  # nested selection: widths of the appended prefix selections
        self._prefix_codes: list[tuple[Tensor, Tensor]] = []  # and the slots peeled off for this forward

    def prefix_levels(self) -> Tensor:
        """Each latent's nesting level `[d_sae]` (0 = the most general prefix)."""
        return prefix_levels(self.cfg.widths)

    def loss(self, x: Tensor, out: ForwardOutput) -> LossOutput:
        """total = sum over prefixes of mse_p (the last prefix is the full reconstruction) + aux_coef*auxk."""
        x_ND = x.reshape(-1, self.cfg.d_in)
        widths = self.cfg.widths
        with serial():
            recons = self._inner_reconstructions(out) + [out.recon.reshape(-1, self.cfg.d_in)]
            mses = [squared_error_sum(r, x_ND) / max(x_ND.shape[0], 1) for r in recons]
            total = torch.stack(mses).sum()
            parts = {"mse": mses[-1].item()} | {f"mse_w{w}": m.item() for w, m in zip(widths, mses[:-1])}
            if "auxk_idx" in out.aux:
                auxk = self._level_auxk(x_ND, recons, out.aux)
                parts["auxk"] = auxk.item()
                total = total + self.cfg.aux_coef * auxk
        return LossOutput(total, parts)

    def _inner_reconstructions(self, out: ForwardOutput) -> list[Tensor]:
        """Each inner prefix's reconstruction: from the code (global) or from its own selection (nested)."""
        widths = self.cfg.widths[:-1]
        if "prefix_idx_0" in out.aux:
            return [sparse_decode(out.aux[f"prefix_vals_{p}"], out.aux[f"prefix_idx_{p}"], self.W_dec, self.b_dec)
                    for p in range(len(widths))]
        code = out.code.reshape(-1)
        return prefix_reconstructions(code.indices, code.values, self.W_dec, self.b_dec, widths)

    def _level_auxk(self, x_ND: Tensor, recons: list[Tensor], aux: dict[str, Tensor]) -> Tensor:
        """AuxK per level (SAELens's `use_matryoshka_aux_loss`): the dead latents of level l reconstruct
        the residual of prefix l, not the full SAE's, so a dead general latent learns what the general
        prefix misses (a missing parent), not a detail the later levels already cover."""
        idx_NK, vals_NK = aux["auxk_idx"], aux["auxk_vals"]
        total = x_ND.new_zeros(())
        lo = 0
        for w, r in zip(self.cfg.widths, recons):
            mask = (idx_NK >= lo) & (idx_NK < w)
            lo = w
            if not bool(mask.any()):
                continue
            e_hat = sparse_decode(torch.where(mask, vals_NK, torch.zeros_like(vals_NK)), idx_NK, self.W_dec, None)
            total = total + (e_hat - (x_ND - r).detach()).pow(2).sum(-1).mean()
        return total

    def _nested(self) -> bool:
        return self.training and torch.is_grad_enabled() and self.cfg.prefix_selection == "nested"

    def _select(self, dead_idx: Tensor | None, widths: dict) -> Select:
        """topk's selection; under `prefix_selection: nested` each inner prefix's own top-k among its first
        w_p pre-activations is appended (same encoder product), their widths noted in `self._prefix_sizes`."""
        base = super()._select(dead_idx, widths)
        if not self._nested():
            return base
        k, batch = self.cfg.k, self.cfg.batch_topk

        def select(pre_NF: Tensor) -> tuple[Tensor, Tensor]:
            idx_NK, vals_NK = base(pre_NF)
            parts = [_prefix_topk(pre_NF[:, :w], k, batch) for w in self.cfg.widths[:-1]]
            self._prefix_sizes = [i.shape[1] for i, _ in parts]
            return torch.cat([idx_NK] + [i for i, _ in parts], 1), torch.cat([vals_NK] + [v for _, v in parts], 1)
        return select

    def _encode_parts(self, x_ND: Tensor, with_aux: bool) -> tuple[SparseCode, SparseCode | None]:
        """topk's encoding; the nested prefixes' selections (appended last by `_select`) are peeled off into
        `self._prefix_codes` for this forward's loss, so the code and the AuxK code are topk's."""
        self._prefix_codes = []
        if not self._nested():
            return super()._encode_parts(x_ND, with_aux)
        main, aux_code = super()._encode_parts(x_ND, with_aux)
        last = aux_code if aux_code is not None else main
        idx, vals = last.indices, last.values
        cut = lo = idx.shape[1] - sum(self._prefix_sizes)
        for size in self._prefix_sizes:
            self._prefix_codes.append((idx[:, lo:lo + size].contiguous(), vals[:, lo:lo + size]))
            lo += size
        trimmed = SparseCode(idx[:, :cut].contiguous(), vals[:, :cut], self.cfg.d_sae)
        return (main, trimmed) if aux_code is not None else (trimmed, None)

    def _forward_flat(self, x_ND: Tensor) -> ForwardOutput:
        """topk's forward, with the AuxK code itself kept for the per-level AuxK loss (and, nested, each
        inner prefix's own selection)."""
        train = self.training
        code, aux_code = self._encode_parts(x_ND, with_aux=train and self.cfg.aux_coef > 0)
        aux = {}
        if aux_code is not None:
            aux = {"auxk_idx": aux_code.indices, "auxk_vals": aux_code.values}
        for p, (idx, vals) in enumerate(self._prefix_codes):
            aux[f"prefix_idx_{p}"], aux[f"prefix_vals_{p}"] = idx, vals
        if train:
            with serial():
                self._update_stats(code, x_ND.shape[0])
        return ForwardOutput(self._decode_flat(code), code, aux)
