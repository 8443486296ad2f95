"""Vendored oracle implementations: the plainest dense code of an architecture's maths, kept here so a
refactor of the real one is compared with something it cannot share a bug with (promise 39)."""

from __future__ import annotations

import math

import torch
from torch import nn


class NaiveTopK(nn.Module):
    """Top-k SAE (Gao et al.), dense: ReLU pre-activations, keep the k largest, decode, MSE summed over d_in
    and averaged over rows. Same maths as scripts/bench_train.py's reference."""

    def __init__(self, W_enc, W_dec, b_enc, b_dec, k: int):
        super().__init__()
        self.W_enc, self.W_dec = nn.Parameter(W_enc.clone()), nn.Parameter(W_dec.clone())
        self.b_enc, self.b_dec = nn.Parameter(b_enc.clone()), nn.Parameter(b_dec.clone())
        self.k = k

    def codes(self, x_ND):
        pre_NF = torch.relu((x_ND - self.b_dec) @ self.W_enc + self.b_enc)
        vals, idx = pre_NF.topk(self.k, dim=-1)
        return torch.zeros_like(pre_NF).scatter(-1, idx, vals)

    def forward(self, x_ND):
        return self.codes(x_ND) @ self.W_dec + self.b_dec

    def loss(self, x_ND):
        return (self(x_ND) - x_ND).pow(2).sum(-1).mean()

    def step(self, opt, x_ND) -> None:
        """One Adam step with the decoder rows' gradient projected off the rows and the rows renormalised."""
        unit_rows_step(self.W_dec, opt, self.loss(x_ND))


class _SurrogateStep(torch.autograd.Function):
    """The firing indicator 1[pre > θ] (times a fixed keep mask) with the gradient of σ((pre − θ)/τ).

    Written as its own autograd function (saekit writes `hard + soft − soft.detach()`), so the oracle and
    the library reach the same straight-through gradient by different code. The derivative of the
    sigmoid is σ'(u)/τ = σ(u)(1 − σ(u))/τ; θ gets its negative; pre gets it only when `to_encoder`.
    The keep mask (a row's top-k under the cap) does not enter the gradient: the surrogate is the
    sigmoid alone, as the MDL module docstring states."""

    @staticmethod
    def forward(ctx, pre_NF, theta_F, keep_NF, tau: float, to_encoder: bool):
        ctx.save_for_backward(pre_NF, theta_F)
        ctx.tau, ctx.to_encoder = tau, to_encoder
        return (pre_NF > theta_F).to(pre_NF.dtype) * keep_NF

    @staticmethod
    def backward(ctx, g_NF):
        pre_NF, theta_F = ctx.saved_tensors
        s_NF = torch.sigmoid((pre_NF - theta_F) / ctx.tau)
        d_NF = g_NF * s_NF * (1 - s_NF) / ctx.tau
        return (d_NF if ctx.to_encoder else None), -d_NF.sum(0), None, None, None


def unit_rows_step(W_dec, opt, loss) -> None:
    """Backward and one optimiser step with the decoder rows kept unit-norm the plain way: the gradient's
    component along each row removed before the step, the rows renormalised after."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
    opt.step()
    with torch.no_grad():
        W_dec /= W_dec.norm(dim=1, keepdim=True)


def saekit_step(sae, opt, x_ND) -> None:
    """One training step of saekit's SAE as the trainer takes it (loss, backward, the decoder hook before
    and the bookkeeping after the optimiser): the side the oracles' `step` is compared with."""
    loss = sae.loss(x_ND, sae(x_ND))
    opt.zero_grad(set_to_none=True)
    loss.total.backward()
    sae.before_optimizer_step()
    opt.step()
    sae.after_optimizer_step()


def binary_entropy_bits(p):
    """H(p) in bits through `torch.special.entr` (−p ln p), not log2 as saekit writes it."""
    return (torch.special.entr(p) + torch.special.entr(1 - p)) / math.log(2)


def scaled_error(x_ND, recon_ND, scale: str, clip_multiple: float = 4.0):
    """The error term: 'batch' Σ‖e_i‖² / Σ‖x_i − x̄‖²; 'row' the mean of ‖e_i‖² / ‖x_i − x̄‖²; 'clipped' the
    batch ratio with row weights w_i = min(1, c²·m / ‖x_i − x̄‖²), m the lower median of ‖x_i − x̄‖² (the
    middle value for odd N, the smaller middle one for even N). Row norms and weights are constants."""
    e_N = (x_ND - recon_ND).pow(2).sum(1)
    c_N = (x_ND - x_ND.mean(0)).pow(2).sum(1).detach()
    if scale == "row":
        return (e_N / c_N).mean()
    if scale == "clipped":
        m = c_N.sort().values[(len(c_N) - 1) // 2]
        w_N = torch.minimum(torch.ones_like(c_N), clip_multiple ** 2 * m / c_N)
        return (w_N * e_N).sum() / (w_N * c_N).sum()
    return e_N.sum() / c_N.sum()


class NaiveMDL(nn.Module):
    """MDL-SAE (Ayonrinde, Pearce & Sharkey 2024) from its formulas, dense:

        pre = (x − b_dec) W_enc + b_enc,  θ = exp(log θ),  g = 1[pre > θ] (∧ row top-k when capped)
        z = pre · g,  x̂ = z W_dec + b_dec
        p̂_j = mean_rows g_j,  p = ε + (1 − 2ε) p̂ with ε = 1/(2N)
        loss = error(x, x̂)  +  λ (Σ_j H(p_j) + b Σ_j p̂_j)          (error: `scaled_error`)

    Training step: Adam on every parameter, the decoder rows' gradient projected off the rows and the
    rows renormalised after it; with `shared_rms`, log θ leaves Adam and steps by lr·m/√v with momentum m
    (β 0.9) and ONE second moment v of mean(g²) over latents (β 0.999, the first v = mean(g²)); with
    `target_l0`, every log θ then moves by rate·clip((L0 − t)/t, ±1) where L0 = Σ_j p̂_j of the batch
    just trained on (the threshold controller), or log λ does (`steer_coef`: the controller on λ); with
    `ema` > 0 the controller steers on the moving average L̄0 ← ema·L̄0 + (1 − ema)·L0 (the first batch's L0
    taken as it is) instead of the batch's own L0."""

    def __init__(self, W_enc, W_dec, b_enc, b_dec, log_threshold, dl_coef: float, value_bits: float = 4.0,
                 tau: float = 0.05, k: int | None = None, to_encoder: bool = False,
                 target_l0: float | None = None, rate: float = 0.1, scale: str = "batch", clip_multiple: float = 4.0,
                 shared_rms_lr: float | None = None, steer_coef: bool = False, ema: float = 0.0):
        super().__init__()
        self.W_enc, self.W_dec = nn.Parameter(W_enc.clone()), nn.Parameter(W_dec.clone())
        self.b_enc, self.b_dec = nn.Parameter(b_enc.clone()), nn.Parameter(b_dec.clone())
        self.log_threshold = nn.Parameter(log_threshold.clone())
        self.dl_coef, self.value_bits, self.tau, self.k, self.to_encoder = dl_coef, value_bits, tau, k, to_encoder
        self.target_l0, self.rate, self.scale, self.clip_multiple = target_l0, rate, scale, clip_multiple
        self.shared_rms_lr, self.thr_m, self.thr_v = shared_rms_lr, torch.zeros_like(log_threshold), None
        self.steer_coef, self.ema, self.l0_avg = steer_coef, ema, None

    def gate(self, x_ND):
        pre_NF = (x_ND - self.b_dec) @ self.W_enc + self.b_enc
        keep_NF = torch.ones_like(pre_NF)
        if self.k is not None:
            keep_NF = torch.zeros_like(pre_NF).scatter(1, pre_NF.detach().topk(self.k, dim=1).indices, 1.0)
        return pre_NF, _SurrogateStep.apply(pre_NF, self.log_threshold.exp(), keep_NF, self.tau, self.to_encoder)

    def codes(self, x_ND):
        pre_NF, g_NF = self.gate(x_ND)
        return pre_NF * g_NF

    def forward(self, x_ND):
        return self.codes(x_ND) @ self.W_dec + self.b_dec

    def loss(self, x_ND):
        """(total, parts) where parts holds the FVU, the activity and value bits and the batch L0."""
        pre_NF, g_NF = self.gate(x_ND)
        recon_ND = (pre_NF * g_NF) @ self.W_dec + self.b_dec
        err = scaled_error(x_ND, recon_ND, self.scale, self.clip_multiple)
        fvu = (x_ND - recon_ND).pow(2).sum() / (x_ND - x_ND.mean(0)).pow(2).sum()
        n = x_ND.shape[0]
        p_hat_F = g_NF.mean(0)
        eps = 1 / (2 * n)
        activity = binary_entropy_bits(eps + (1 - 2 * eps) * p_hat_F).sum()
        value = self.value_bits * p_hat_F.sum()
        parts = {"fvu": fvu.detach(), "activity_bits": activity, "value_bits": value, "l0": p_hat_F.detach().sum()}
        return err + self.dl_coef * (activity + value), parts

    def step(self, opt, x_ND) -> None:
        """One Adam step, decoder rows kept unit-norm, then the threshold controller's step when targeted."""
        loss, parts = self.loss(x_ND)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W = self.W_dec
            W.grad -= (W.grad * W).sum(1, keepdim=True) * W
            g_F = self.log_threshold.grad.clone()
            if self.shared_rms_lr is not None:
                self.log_threshold.grad = None  # Adam skips a parameter without a gradient
        opt.step()
        with torch.no_grad():
            W /= W.norm(dim=1, keepdim=True)
            if self.shared_rms_lr is not None:
                self._shared_rms(g_F)
            if self.target_l0 is not None:
                l0 = float(parts["l0"])
                self.l0_avg = l0 if self.l0_avg is None else self.ema * self.l0_avg + (1 - self.ema) * l0
                rel = (self.l0_avg - self.target_l0) / self.target_l0
                step = self.rate * min(max(rel, -1.0), 1.0)
                if self.steer_coef:
                    self.dl_coef = math.exp(math.log(self.dl_coef) + step)
                else:
                    self.log_threshold += step

    def _shared_rms(self, g_F) -> None:
        g2 = float(g_F.double().pow(2).mean())
        self.thr_v = g2 if self.thr_v is None else 0.999 * self.thr_v + 0.001 * g2
        self.thr_m = 0.9 * self.thr_m + 0.1 * g_F
        self.log_threshold -= self.shared_rms_lr * self.thr_m / (math.sqrt(self.thr_v) + 1e-12)


# -- ReLU, JumpReLU, gated, matryoshka ------------------------------------------------------------------
class NaiveReLU(nn.Module):
    """The standard SAE with the decoder-norm-weighted L1 (Anthropic, April 2024 update), dense:

        z = ReLU((x − b_dec) W_enc + b_enc),  x̂ = z W_dec + b_dec
        loss = mean_rows ‖x − x̂‖² + λ · mean_rows Σ_j z_j ‖W_dec,j‖

    The decoder is unconstrained (the norm sits in the penalty), so a step is plain Adam."""

    def __init__(self, W_enc, W_dec, b_enc, b_dec, l1_coef: float, b_dec_to_input: bool = True):
        super().__init__()
        self.W_enc, self.W_dec = nn.Parameter(W_enc.clone()), nn.Parameter(W_dec.clone())
        self.b_enc, self.b_dec = nn.Parameter(b_enc.clone()), nn.Parameter(b_dec.clone())
        self.l1_coef, self.b_dec_to_input = l1_coef, b_dec_to_input

    def codes(self, x_ND):
        x_in = x_ND - self.b_dec if self.b_dec_to_input else x_ND
        return torch.relu(x_in @ self.W_enc + self.b_enc)

    def forward(self, x_ND):
        return self.codes(x_ND) @ self.W_dec + self.b_dec

    def loss(self, x_ND):
        z_NF = self.codes(x_ND)
        mse = (z_NF @ self.W_dec + self.b_dec - x_ND).pow(2).sum(-1).mean()
        l1 = (z_NF * torch.linalg.vector_norm(self.W_dec, dim=1)).sum(-1).mean()
        return mse + self.l1_coef * l1, {"mse": mse.detach(), "l1": l1.detach(), "l0": (z_NF > 0).sum(-1).float().mean()}

    def step(self, opt, x_ND) -> None:
        opt.zero_grad(set_to_none=True)
        self.loss(x_ND)[0].backward()
        opt.step()


def _window(pre_NF, theta_F, eps: float):
    """A term with value 0 whose gradient in θ is −(1/ε)·1[|pre − θ| < ε/2] and 0 in pre: the clamp of
    (pre − θ)/ε + ½ to [0, 1] has slope −1/ε in θ exactly inside the rectangle kernel's window."""
    s_NF = ((pre_NF.detach() - theta_F) / eps + 0.5).clamp(0.0, 1.0)
    return s_NF - s_NF.detach()


class NaiveJumpReLU(nn.Module):
    """JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"), dense, from the paper's pseudo-derivatives:

        pre = x W_enc + b_enc  (x − b_dec when `b_dec_to_input`),  z = pre · H(pre − θ),  x̂ = z W_dec + b_dec
        loss = mean_rows ‖x − x̂‖² + λ · mean_rows Σ_j H(pre_j − θ_j)
        ∂H(pre − θ)/∂θ := −(1/ε) K((pre − θ)/ε),   ∂z/∂θ := −(θ/ε) K((pre − θ)/ε),   K = 1[|u| < ½]
        ∂H/∂pre := 0,  ∂z/∂pre = H(pre − θ)   (the true ones)

    Written with a clamp whose slope is the kernel (`_window`), not an autograd function. A step: Adam,
    decoder rows' gradient projected off the unit rows, rows renormalised, θ clamped to ≥ `min_theta`."""

    def __init__(self, W_enc, W_dec, b_enc, b_dec, theta, l0_coef: float, eps: float, min_theta: float = 1e-6,
                 b_dec_to_input: bool = False):
        super().__init__()
        self.W_enc, self.W_dec = nn.Parameter(W_enc.clone()), nn.Parameter(W_dec.clone())
        self.b_enc, self.b_dec = nn.Parameter(b_enc.clone()), nn.Parameter(b_dec.clone())
        self.theta = nn.Parameter(theta.clone())
        self.l0_coef, self.eps, self.min_theta, self.b_dec_to_input = l0_coef, eps, min_theta, b_dec_to_input

    def pre(self, x_ND):
        x_in = x_ND - self.b_dec if self.b_dec_to_input else x_ND
        return x_in @ self.W_enc + self.b_enc

    def codes(self, x_ND):
        pre_NF = self.pre(x_ND)
        H_NF = (pre_NF > self.theta).to(pre_NF.dtype)
        return pre_NF * H_NF + self.theta.detach() * _window(pre_NF, self.theta, self.eps)

    def forward(self, x_ND):
        return self.codes(x_ND) @ self.W_dec + self.b_dec

    def loss(self, x_ND):
        pre_NF = self.pre(x_ND)
        H_NF = (pre_NF > self.theta).to(pre_NF.dtype)
        z_NF = pre_NF * H_NF + self.theta.detach() * _window(pre_NF, self.theta, self.eps)
        mse = (z_NF @ self.W_dec + self.b_dec - x_ND).pow(2).sum(-1).mean()
        l0 = (H_NF + _window(pre_NF, self.theta, self.eps)).sum(-1).mean()
        return mse + self.l0_coef * l0, {"mse": mse.detach(), "l0": l0.detach()}

    def step(self, opt, x_ND) -> None:
        unit_rows_step(self.W_dec, opt, self.loss(x_ND)[0])
        with torch.no_grad():
            self.theta.copy_(torch.maximum(self.theta, torch.full_like(self.theta, self.min_theta)))


class NaiveGated:
    """Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs"), inference,
    with the paper's weight sharing W_mag = diag(exp r_mag) W_gate written column by column:

        x̃ = x − b_dec,  f_gate = 1[x̃ W_gate + b_gate > 0],  f_mag = ReLU(x̃ W_mag + b_mag),  z = f_gate ⊙ f_mag
        x̂ = z W_dec + b_dec"""

    def __init__(self, W_enc, W_dec, b_gate, b_mag, r_mag, b_dec, b_dec_to_input: bool = True):
        self.W_gate, self.W_dec, self.b_gate, self.b_mag = W_enc.clone(), W_dec.clone(), b_gate.clone(), b_mag.clone()
        self.r_mag, self.b_dec, self.b_dec_to_input = r_mag.clone(), b_dec.clone(), b_dec_to_input

    def codes(self, x_ND):
        x_in = x_ND - self.b_dec if self.b_dec_to_input else x_ND
        W_mag = torch.stack([self.W_gate[:, j] * math.exp(float(self.r_mag[j])) for j in range(len(self.r_mag))], 1)
        gate = torch.heaviside(x_in @ self.W_gate + self.b_gate, torch.zeros(()))
        return gate * (x_in @ W_mag + self.b_mag).clamp(min=0)

    def __call__(self, x_ND):
        return self.codes(x_ND) @ self.W_dec + self.b_dec


class NaiveMatryoshka(NaiveTopK):
    """Matryoshka top-k SAE (Bussmann et al. 2025), dense: one top-k code over the whole dictionary; the
    loss sums, over the nested prefixes w_1 < … < w_P = d_sae, the MSE of decoding only the code's latents
    below w_p (a masked copy of the code). With `nested`, an inner prefix instead decodes the top-k of its
    own first w_p ReLU pre-activations."""

    def __init__(self, W_enc, W_dec, b_enc, b_dec, k: int, widths: list[int], nested: bool = False):
        super().__init__(W_enc, W_dec, b_enc, b_dec, k)
        self.widths, self.nested = list(widths), nested

    def prefix_codes(self, x_ND):
        pre_NF = torch.relu((x_ND - self.b_dec) @ self.W_enc + self.b_enc)
        z_NF = self.codes(x_ND)
        out = []
        for w in self.widths[:-1]:
            if self.nested:
                vals, idx = pre_NF[:, :w].topk(min(self.k, w), dim=-1)
                out.append(torch.zeros_like(pre_NF).scatter(-1, idx, vals))
            else:
                mask_F = (torch.arange(z_NF.shape[1]) < w).to(z_NF.dtype)
                out.append(z_NF * mask_F)
        return out + [z_NF]

    def prefix_losses(self, x_ND):
        return [(z_NF @ self.W_dec + self.b_dec - x_ND).pow(2).sum(-1).mean() for z_NF in self.prefix_codes(x_ND)]

    def loss(self, x_ND):
        return sum(self.prefix_losses(x_ND))


# -- AuxK and BatchTopK ---------------------------------------------------------------------------------
def dead_topk(pre_NF, dead_F, aux_k: int):
    """The AuxK selection (Gao et al. 2024, §A.2): in every row, the `aux_k` largest pre-activations among
    the dead latents (fewer when fewer are dead). Returns (indices [N, A], dense codes [N, F] with ReLU)."""
    masked_NF = torch.where(dead_F, pre_NF, torch.full_like(pre_NF, -math.inf))
    vals, idx = masked_NF.topk(min(aux_k, int(dead_F.sum())), dim=-1)
    return idx, torch.zeros_like(pre_NF).scatter(-1, idx, torch.relu(vals))


class NaiveAuxTopK(NaiveTopK):
    """Top-k with AuxK (Gao et al. 2024) and optionally BatchTopK (Bussmann et al. 2024), dense.

    Dead: a latent whose code has not been > 0 for `dead_after` or more tokens, counted over the batches
    stepped on so far (the current batch does not count for its own loss). AuxK: ê = z_aux W_dec (no bias)
    reconstructs the detached residual e = x − x̂; loss = mse + aux_coef · mean_rows ‖e − ê‖² (saekit's
    variant: no division by the residual's variance). BatchTopK (training): the k·N largest pre-activations
    of the whole batch, ReLU after. Its inference threshold θ: the smallest positive kept value of each
    training batch, averaged with an EMA (θ ← m θ + (1 − m) min; the first batch sets it); at inference
    z = ReLU(pre) · 1[pre > θ]."""

    def __init__(self, W_enc, W_dec, b_enc, b_dec, k: int, aux_k: int, aux_coef: float, dead_after: int,
                 since=None, batch: bool = False, momentum: float = 0.99):
        super().__init__(W_enc, W_dec, b_enc, b_dec, k)
        self.aux_k, self.aux_coef, self.dead_after, self.batch, self.momentum = aux_k, aux_coef, dead_after, batch, momentum
        self.since = since.clone() if since is not None else torch.zeros(W_dec.shape[0], dtype=torch.long)
        self.threshold = None

    def pre(self, x_ND):
        return (x_ND - self.b_dec) @ self.W_enc + self.b_enc

    def codes(self, x_ND):
        pre_NF = self.pre(x_ND)
        if self.batch and self.training:
            vals, flat = pre_NF.flatten().topk(self.k * pre_NF.shape[0])
            return torch.zeros_like(pre_NF).flatten().scatter(0, flat, torch.relu(vals)).view_as(pre_NF)
        if self.batch and self.threshold is not None:
            return torch.relu(pre_NF) * (pre_NF > self.threshold).to(pre_NF.dtype)
        return super().codes(x_ND)

    def dead(self):
        return self.since >= self.dead_after

    def aux(self, x_ND):
        """(indices, dense codes) of the AuxK selection, or None when no latent is dead or AuxK is off."""
        dead_F = self.dead()
        if not bool(dead_F.any()) or self.aux_coef == 0:
            return None
        return dead_topk(self.pre(x_ND), dead_F, self.aux_k)

    def loss_parts(self, x_ND):
        z_NF = self.codes(x_ND)
        recon_ND = z_NF @ self.W_dec + self.b_dec
        parts = {"mse": (recon_ND - x_ND).pow(2).sum(-1).mean()}
        aux = self.aux(x_ND)
        if aux is not None:
            parts["auxk"] = (aux[1] @ self.W_dec - (x_ND - recon_ND).detach()).pow(2).sum(-1).mean()
        return parts, z_NF

    def total(self, parts):
        return sum(v for n, v in parts.items() if n != "auxk") + self.aux_coef * parts.get("auxk", 0.0)

    def loss(self, x_ND):
        return self.total(self.loss_parts(x_ND)[0])

    def observe(self, z_NF) -> None:
        """After a training batch: the dead counters and, for BatchTopK, the threshold's EMA."""
        with torch.no_grad():
            self.since += z_NF.shape[0]
            self.since[(z_NF > 0).any(0)] = 0
            if self.batch:
                low = float(z_NF[z_NF > 0].min())
                m = self.momentum
                self.threshold = low if self.threshold is None else m * self.threshold + (1 - m) * low

    def step(self, opt, x_ND) -> None:
        parts, z_NF = self.loss_parts(x_ND)
        unit_rows_step(self.W_dec, opt, self.total(parts))
        self.observe(z_NF)


class NaiveMatryoshkaAux(NaiveAuxTopK):
    """Matryoshka top-k (global prefixes) with AuxK per level (SAELens's matryoshka aux loss, the variant
    saekit states): the AuxK selection is made over all dead latents as in `NaiveAuxTopK`; its part in level
    l (latents w_{l−1} ≤ j < w_l) reconstructs the residual of prefix l, e_l = x − x̂_l (detached; x̂_l: the
    code's latents below w_l decoded with b_dec). auxk = Σ_l mean_rows ‖e_l − ê_l‖², over the levels that
    some row's AuxK selection reaches (a level no row selects in adds nothing, not ‖e_l‖²)."""

    def __init__(self, *args, widths: list[int], **kw):
        super().__init__(*args, **kw)
        self.widths = list(widths)

    def loss_parts(self, x_ND):
        z_NF = self.codes(x_ND)
        cols_F = torch.arange(z_NF.shape[1])
        recons = [(z_NF * (cols_F < w).to(z_NF.dtype)) @ self.W_dec + self.b_dec for w in self.widths]
        parts = {f"mse_w{w}": (r - x_ND).pow(2).sum(-1).mean() for w, r in zip(self.widths[:-1], recons)}
        parts["mse"] = (recons[-1] - x_ND).pow(2).sum(-1).mean()
        aux = self.aux(x_ND)
        if aux is not None:
            idx_NA, z_aux_NF = aux
            parts["auxk"], lo = torch.zeros(()), 0
            for w, r in zip(self.widths, recons):
                level_F = (cols_F >= lo) & (cols_F < w)
                lo = w
                if bool(level_F[idx_NA].any()):
                    e_hat_ND = (z_aux_NF * level_F.to(z_aux_NF.dtype)) @ self.W_dec
                    parts["auxk"] = parts["auxk"] + (e_hat_ND - (x_ND - r).detach()).pow(2).sum(-1).mean()
        return parts, z_NF
