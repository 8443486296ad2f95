"""ReLU SAE with an L1 penalty: the classic SAE, SAELens's "standard" architecture.

    pre_NF = (x_ND - b_dec_D) @ W_enc_DF + b_enc_F      (b_dec subtracted when apply_b_dec_to_input)
    z_NF   = ReLU(pre_NF)
    x_hat  = z_NF @ W_dec_FD + b_dec_D
    loss   = mean_rows ||x - x_hat||^2 + l1_coefficient * mean_rows sum_j z_j * ||W_dec_j||

Why these choices: the L1 term is weighted by the decoder row norms (Anthropic's April 2024 update,
also SAELens's default) so the penalty cannot be dodged by shrinking codes and growing decoder rows;
the decoder is therefore left unconstrained, as in SAELens, and files from SAELens (whose rows are
not unit norm) load and train on unchanged. The number of active latents varies per row, so the
sparse code is padded with zeros to the widest row of the batch. Parameters use SAELens names and
shapes (`W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc`, `b_dec`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.config import param
from saekit.sae.base import ForwardOutput, LossOutput, SAEConfig, SparseAutoencoder, SparseCode, tied_init
from saekit.sae.registry import register
from saekit.sae.topk import geometric_median


@dataclass
class ReLUConfig(SAEConfig):
    l1_coefficient: float = param(5.0, "weight of the decoder-norm-weighted L1 penalty on the codes", ge=0.0)
    apply_b_dec_to_input: bool = param(True, "subtract b_dec from the input before encoding")


def code_from_dense(z_NF: Tensor) -> SparseCode:
    """The sparse view of a dense code: the non-zero entries of each row, zero-padded to the widest row.
    Values are gathered from `z_NF`, so gradients flow through them."""
    width = max(int((z_NF != 0).sum(1).max()) if z_NF.shape[0] else 0, 1)
    vals_NK, idx_NK = z_NF.topk(min(width, z_NF.shape[1]), dim=1, sorted=False)
    return SparseCode(idx_NK, vals_NK, z_NF.shape[1])


@register
class ReLUSAE(SparseAutoencoder):
    architecture = "relu"
    config_class = ReLUConfig
    decoder_is_affine = True  # z @ W_dec + b_dec
    decoder_norm_folded = ("b_enc",)  # ReLU(n*pre) = n*ReLU(pre)

    def __init__(self, cfg: ReLUConfig):
        super().__init__(cfg)
        self.cfg: ReLUConfig = cfg
        self.W_enc, self.W_dec, self.b_enc, self.b_dec = tied_init(cfg)

    def _pre(self, x_ND: Tensor) -> Tensor:
        x_in = x_ND - self.b_dec if self.cfg.apply_b_dec_to_input else x_ND
        return x_in @ self.W_enc + self.b_enc

    def _dense(self, x_ND: Tensor) -> Tensor:
        return torch.relu(self._pre(x_ND))

    def _encode_flat(self, x_ND: Tensor) -> SparseCode:
        return code_from_dense(self._dense(x_ND))

    def _decode_flat(self, code: SparseCode) -> Tensor:
        # dense product, the same arithmetic as forward (so forward == decode(encode(x)))
        return code.dense() @ self.W_dec + self.b_dec

    def _forward_flat(self, x_ND: Tensor) -> ForwardOutput:
        z_NF = self._dense(x_ND)
        return ForwardOutput(z_NF @ self.W_dec + self.b_dec, code_from_dense(z_NF), {"z_NF": z_NF})

    def loss(self, x: Tensor, out: ForwardOutput) -> LossOutput:
        """mse + l1_coefficient * mean over rows of sum_j z_j ||W_dec_j||."""
        x_ND = x.reshape(-1, self.cfg.d_in)
        mse = (out.recon.reshape(x_ND.shape) - x_ND).pow(2).sum(-1).mean()
        z_NF = out.aux.get("z_NF")
        if z_NF is None:
            z_NF = out.code.dense().reshape(-1, self.cfg.d_sae)
        l1 = (z_NF * self.W_dec.norm(dim=1)).sum(-1).mean()
        total = mse + self.cfg.l1_coefficient * l1
        return LossOutput(total, {"mse": mse.item(), "l1": l1.item(), "l0": float((z_NF != 0).sum(-1).float().mean())})

    @torch.no_grad()
    def init_from_data(self, x_ND: Tensor) -> None:
        """b_dec <- geometric median of `x_ND` (as for top-k)."""
        self.b_dec.copy_(geometric_median(x_ND.reshape(-1, self.cfg.d_in).double()).to(self.b_dec.dtype))

    def _fold_input_scale_(self, s: float) -> None:
        """With x' = s*x, pre' = s*pre(x), so dividing both biases by s gives codes z/s and x_hat/s on raw x
        (ReLU is positively homogeneous)."""
        self.b_enc.div_(s)
        self.b_dec.div_(s)
