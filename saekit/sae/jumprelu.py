"""JumpReLU SAE trained with straight-through estimators and an L0 penalty.

After Rajamanoharan et al. (2024), "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
Sparse Autoencoders" (the Gemma Scope architecture):

    pre_NF = (x_ND - b_dec_D) @ W_enc_DF + b_enc_F      (b_dec subtracted only if apply_b_dec_to_input)
    z_NF   = JumpReLU_theta(pre_NF) = pre_NF * H(pre_NF - theta_F)     (then ReLU, as SAELens and Gemma Scope)
    x_hat  = z_NF @ W_dec_FD + b_dec_D
    loss   = mean_rows ||x - x_hat||^2 + l0_coefficient * mean_rows sum_j H(pre_j - theta_j)

The step H has zero gradient almost everywhere, so the threshold would never learn. The paper gives
theta pseudo-derivatives from a rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth eps:

    d/dtheta H(z - theta)          := -(1/eps)     K((z - theta)/eps)
    d/dtheta JumpReLU_theta(z)     := -(theta/eps) K((z - theta)/eps)

while the gradients with respect to z stay the true ones (0 for H, H(z - theta) for JumpReLU). So the
L0 term pushes theta up wherever pre-activations sit just above it, and the reconstruction pushes it
down where the latent would have helped: theta is an ordinary parameter that moves. It is stored as
`threshold` (SAELens and Gemma Scope's inference name), and kept above `min_threshold` after each
step. Decoder rows are kept at unit norm (as in the paper's training) so the L0 price is comparable
across latents; files from elsewhere load with whatever row norms they have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saekit.config import param
from saekit.sae.base import (ForwardOutput, LossOutput, SAEConfig, SparseAutoencoder, SparseCode,
                             remove_parallel_grad_, renormalise_rows_, tied_init)
from saekit.sae.registry import register
from saekit.sae.relu import code_from_dense
from saekit.sae.topk import geometric_median


@dataclass
class JumpReLUConfig(SAEConfig):
    l0_coefficient: float = param(1e-3, "lambda: weight of the L0 penalty (mean active latents per row)", ge=0.0)
    bandwidth: float = param(1e-3, "eps: width of the rectangle kernel in the threshold's pseudo-derivative "
                                   "(pre-activation units)", gt=0.0)
    init_threshold: float = param(1e-3, "initial threshold theta_j of every latent", gt=0.0)
    min_threshold: float = param(1e-6, "theta is clamped to at least this after each optimizer step", gt=0.0)
    apply_b_dec_to_input: bool = param(False, "subtract b_dec from the input before encoding (the paper and "
                                              "Gemma Scope do not)")


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class StepSTE(torch.autograd.Function):
    """H(z - theta): forward exact; backward 0 for z and -(1/eps) K((z - theta)/eps) for theta."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        g_theta = -(1.0 / ctx.eps) * _rectangle((z - theta) / ctx.eps) * grad
        return torch.zeros_like(z), _sum_to(g_theta, theta.shape), None


class JumpReLUSTE(torch.autograd.Function):
    """z * H(z - theta) * H(z): backward H(z - theta) H(z) for z (exact) and -(theta/eps) K((z - theta)/eps)
    for theta. The H(z) (a ReLU after the jump) only matters for a threshold < 0 (possible in loaded files,
    never after a saekit step): like SAELens and Gemma Scope, no negative value gets through. It is inside
    the function because a `torch.relu` outside would zero theta's pseudo-derivative for every z in
    (theta - eps/2, theta], whose code is 0, so theta learnt from only half the paper's window."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * ((z > theta) & (z > 0)).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        g_z = ((z > theta) & (z > 0)).to(z.dtype) * grad
        g_theta = -(theta / ctx.eps) * _rectangle((z - theta) / ctx.eps) * grad
        return g_z, _sum_to(g_theta, theta.shape), None


def _sum_to(g: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient `[N, F]` back to the parameter's shape `[F]`."""
    while g.ndim > len(shape):
        g = g.sum(0)
    return g


@register
class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"
    config_class = JumpReLUConfig
    decoder_is_affine = True  # z @ W_dec + b_dec
    decoder_norm_folded = ("b_enc", "threshold")  # pre and θ both times n: the same latents jump

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.cfg: JumpReLUConfig = cfg
        self.W_enc, self.W_dec, self.b_enc, self.b_dec = tied_init(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.init_threshold, dtype=cfg.torch_dtype,
                                                 device=cfg.device))

    def _pre(self, x_ND: Tensor) -> Tensor:
        x_in = x_ND - self.b_dec if self.cfg.apply_b_dec_to_input else x_ND
        return x_in @ self.W_enc + self.b_enc

    def _dense(self, pre_NF: Tensor) -> Tensor:
        return JumpReLUSTE.apply(pre_NF, self.threshold, self.cfg.bandwidth)

    def _encode_flat(self, x_ND: Tensor) -> SparseCode:
        return code_from_dense(self._dense(self._pre(x_ND)))

    def _decode_flat(self, code: SparseCode) -> Tensor:
        return code.dense() @ self.W_dec + self.b_dec

    def _forward_flat(self, x_ND: Tensor) -> ForwardOutput:
        pre_NF = self._pre(x_ND)
        z_NF = self._dense(pre_NF)
        aux = {"pre_NF": pre_NF} if self.training else {}
        return ForwardOutput(z_NF @ self.W_dec + self.b_dec, code_from_dense(z_NF), aux)

    def loss(self, x: Tensor, out: ForwardOutput) -> LossOutput:
        """mse + l0_coefficient * L0, the L0 through the step's straight-through estimator."""
        x_ND = x.reshape(-1, self.cfg.d_in)
        mse = (out.recon.reshape(x_ND.shape) - x_ND).pow(2).sum(-1).mean()
        pre_NF = out.aux.get("pre_NF")
        if pre_NF is None:  # eval mode: the hard count (no gradient path needed)
            l0 = out.code.l0().reshape(-1).to(mse.dtype).mean()
        else:
            l0 = StepSTE.apply(pre_NF, self.threshold, self.cfg.bandwidth).sum(-1).mean()
        total = mse + self.cfg.l0_coefficient * l0
        return LossOutput(total, {"mse": mse.item(), "l0": l0.item()})

    # -- training callbacks -----------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x_ND: Tensor) -> None:
        """b_dec <- geometric median of `x_ND` (as for top-k)."""
        self.b_dec.copy_(geometric_median(x_ND.reshape(-1, self.cfg.d_in).double()).to(self.b_dec.dtype))

    def before_optimizer_step(self) -> None:
        remove_parallel_grad_(self.W_dec)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        renormalise_rows_(self.W_dec)
        self.threshold.clamp_(min=self.cfg.min_threshold)

    def _fold_input_scale_(self, s: float) -> None:
        """With x' = s*x, pre' = s*pre(x): dividing both biases and the threshold by s gives codes z/s and
        x_hat/s on raw x; the active set is unchanged for s > 0."""
        self.b_enc.div_(s)
        self.b_dec.div_(s)
        self.threshold.div_(s)
