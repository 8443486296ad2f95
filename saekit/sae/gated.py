"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders"),
inference only: it exists so SAELens gated SAEs load and run exactly; saekit does not train it.

    x_in    = x - b_dec                                   (when apply_b_dec_to_input)
    gate    = 1[x_in @ W_enc + b_gate > 0]                which latents are active
    mag     = ReLU(x_in @ (W_enc * exp(r_mag)) + b_mag)   how strongly (shared directions, rescaled)
    z       = gate * mag
    x_hat   = z @ W_dec + b_dec

Parameters use SAELens names and shapes. Training it needs the paper's auxiliary gate loss, which is not
implemented, so `loss` refuses rather than silently training only the reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saekit.config import param
from saekit.sae.base import ForwardOutput, LossOutput, SAEConfig, SparseAutoencoder, SparseCode, tied_init
from saekit.sae.registry import register
from saekit.sae.relu import code_from_dense


@dataclass
class GatedConfig(SAEConfig):
    apply_b_dec_to_input: bool = param(True, "subtract b_dec from the input before encoding")


@register
class GatedSAE(SparseAutoencoder):
    architecture = "gated"
    config_class = GatedConfig
    decoder_is_affine = True  # z @ W_dec + b_dec
    decoder_norm_folded = ("b_gate", "b_mag")  # W_mag = W_enc * exp(r_mag) scales with W_enc

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        self.cfg: GatedConfig = cfg
        self.W_enc, self.W_dec, _, self.b_dec = tied_init(cfg)
        kw = {"dtype": cfg.torch_dtype, "device": cfg.device}
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, **kw))

    def _dense(self, x_ND: Tensor) -> Tensor:
        x_in = x_ND - self.b_dec if self.cfg.apply_b_dec_to_input else x_ND
        gate_NF = (x_in @ self.W_enc + self.b_gate > 0).to(x_in.dtype)
        mag_NF = torch.relu(x_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        return gate_NF * mag_NF

    def _encode_flat(self, x_ND: Tensor) -> SparseCode:
        return code_from_dense(self._dense(x_ND))

    def _decode_flat(self, code: SparseCode) -> Tensor:
        return code.dense() @ self.W_dec + self.b_dec

    def _forward_flat(self, x_ND: Tensor) -> ForwardOutput:
        z_NF = self._dense(x_ND)
        return ForwardOutput(z_NF @ self.W_dec + self.b_dec, code_from_dense(z_NF))

    def loss(self, x: Tensor, out: ForwardOutput) -> LossOutput:
        raise NotImplementedError("gated: inference only in saekit (the gate's auxiliary loss is not implemented); "
                                  "train a 'jumprelu' SAE instead, the gated SAE's successor")

    def _fold_input_scale_(self, s: float) -> None:
        """Both pre-activations scale with the input, so dividing b_gate, b_mag and b_dec by s gives z/s and
        x_hat/s on raw x (the gate's sign and the ReLU are unchanged for s > 0)."""
        self.b_gate.div_(s)
        self.b_mag.div_(s)
        self.b_dec.div_(s)
