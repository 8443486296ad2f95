"""MDL-SAE: a ReLU SAE trained to minimise description length within a reconstruction budget.

After Ayonrinde, Pearce & Sharkey (2024), "Interpretability as Compression: Reconsidering SAE
Explanations of Neural Activations with MDL-SAEs". The paper treats an SAE as a lossy code: the
*explanation* of an activation vector x is its sparse code z, sent to a receiver who holds the
dictionary (the decoder). The description length per vector is

    DL(z) = B + V
      B  (activity bits)  = Σ_j H(p_j)       which latents fire: binary entropy of each latent's
                                             firing probability p_j, latents coded independently
      V  (value bits)     = b · Σ_j p_j      the active values, each sent at b bits (the paper's
                                             "L0 · b" bound; b is the effective float precision)

and the MDL-SAE is the one with the shortest DL among those whose reconstruction error stays within
a budget ε. This architecture trains towards that optimum with the Lagrangian relaxation of
"minimise DL subject to error ≤ ε":

    loss = FVU(x, x̂) + λ · DL̂        (λ = `dl_coef`, in FVU per bit, or the controller's)
    FVU  = ‖x − x̂‖² / ‖x − mean(x)‖²   over the batch (scale-free, so λ means the same on any data)
    DL̂  = Σ_j H(p̂_j) + b · Σ_j p̂_j    p̂_j = the batch firing frequency of latent j

Differentiability: the encoder is a JumpReLU, `z_ij = pre_ij · 1[pre_ij > θ_j]` with a learned
per-latent threshold θ_j = exp(log_threshold_j). The forward value of p̂_j is the *hard* firing
frequency (the fraction of the batch's rows whose code has latent j active), so the logged
`dl_bits` is the batch's actual activity + flat value cost. Gradients come from a straight-through
surrogate: the firing indicator 1[pre_ij > θ_j] is given the gradient of σ((pre_ij − θ_j) / τ)
(τ = `gate_temperature`), both in p̂ and in z — so the threshold learns from the DL term and
from the reconstruction. p̂ is mapped affinely into [ε, 1 − ε] (ε = 1 / 2N) before the entropy, so
a latent that fires never (or always) keeps a finite gradient. The activity term's marginal price
of one more firing of latent j is ∂H/∂p = log2((1 − p_j) / p_j) — high for rare latents — which is
the paper's argument against feature splitting: splitting a feature into rarer children costs
activity bits that a reconstruction-plus-L0 objective never charges. λ is the sparsity
coefficient: a larger λ buys fewer bits with more error, so L0 falls as λ rises (tested).

On real activations (issue 24) five things decide whether this works, switched by config: the gate's
surrogate gradient goes to the thresholds only (`surrogate_to_encoder`, false by default since issue
24: on the encoder too, the DL term pushes pre-activations below any threshold); `init_l0` (or
`target_l0`) sets each latent's threshold from the first batch so it starts firing at the requested
rate (a constant `init_threshold` has nearly every latent firing on LLM rows); `target_l0` / `target_bits` hold the batches' mean L0 (or
bits per row) at a requested value with a controller (saekit.sae.mdl_control; by default it moves every
latent's log threshold by one common step after each optimizer step, so λ stays the price of a bit and
decides how the requested activity is spread over latents — with such a target λ defaults to 0.1, which
measured below top-k's DL frontier where 1e-3 tied it; `controller: dl_coef` steers λ instead,
which cannot raise L0 and missed its target on real activations); `loss_scale` ('row', 'clipped')
keeps a few massive rows from deciding the error term (`reconstruction_loss`); the per-row cap `k`
(rows the SAE never saw otherwise take hundreds of latents). Under torch.distributed the controller
steers on the global batch's statistic (`batch_stat`, a 'mean' stat buffer). Measured figures: the
README's MDL section and `scripts/mdl_real.py`.

Encoder and decoder: `pre = (x − b_dec) W_enc + b_enc`, `z = JumpReLU_θ(pre)` (optionally capped
to the k largest per row), `x̂ = z W_dec + b_dec` with unit-norm decoder rows (the norm would
otherwise absorb the value scale and make "bits per value" meaningless). Decoding is one dense
product `z W_dec` (the same arithmetic in forward and decode); this architecture targets the
moderate widths that MDL selection compares, not the 16k-latent top-k fast path. Parameters use
SAELens names (`W_enc`, `W_dec`, `b_enc`, `b_dec`, `log_threshold`). The trainer's input
normalisation folds into the biases and the threshold exactly (pre scales with the input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saekit.config import param
from saekit.errors import ConfigError
from saekit.sae.base import (ForwardOutput, LossOutput, SAEConfig, SparseAutoencoder, SparseCode,
                             remove_parallel_grad_, renormalise_rows_, tied_init)
from saekit.sae.mdl_control import controller_step, ema_step, shared_rms_step_
from saekit.sae.registry import register
from saekit.sae.topk import geometric_median


DL_COEF_FIXED = 1e-3  # λ's default without a target (or with the controller on λ: its start)
DL_COEF_STEERED = 0.1  # λ's default with the threshold controller (issue 24: 1e-3 tied top-k's DL frontier)


@dataclass
class MDLConfig(SAEConfig):
    dl_coef: float | None = param(None, "λ: weight of the description-length estimate (FVU per bit); the sparsity "
                                        "coefficient — larger gives fewer bits (lower L0) at more error. None: "
                                        "1e-3, or 0.1 with a target under the threshold controller (there L0 is held "
                                        "and λ only decides how it is spread over latents; 0.1 measured best, issue 24)",
                                  ge=0.0)
    value_bits: float = param(4.0, "b: bits charged per active value (the paper's L0·b value bound)", ge=0.0)
    gate_temperature: float = param(0.05, "τ: width of the sigmoid surrogate σ(pre/τ) giving the firing "
                                          "indicator its gradient (pre-activation units)", gt=0.0)
    init_threshold: float = param(0.05, "initial JumpReLU threshold θ_j (pre-activation units)", gt=0.0)
    k: int | None = param(None, "optional cap on active latents per row (None: every positive pre-activation)",
                          ge=1)
    apply_b_dec_to_input: bool = param(True, "subtract b_dec from the input before encoding")
    loss_scale: str = param("batch", "how reconstruction error is scaled: 'batch' FVU (Σ‖e‖² / Σ‖x−μ‖²; a few "
                                     "massive rows decide it), 'row' (the mean of per-row FVUs ‖e_i‖² / ‖x_i−μ‖²), "
                                     "or 'clipped' (batch FVU with rows beyond clip_multiple × the median centred "
                                     "norm down-weighted to that norm)", choices=["batch", "row", "clipped"])
    clip_multiple: float = param(4.0, "'clipped' loss: rows whose centred norm exceeds this multiple of the batch "
                                      "median count as if they had that norm", gt=0.0)
    target_l0: float | None = param(None, "hold the training batches' mean L0 at this with the controller (see "
                                          "`controller`); init_l0 defaults to it", gt=0.0)
    target_bits: float | None = param(None, "hold the batches' DL estimate (bits per row) at this with the controller; "
                                            "at most one of target_l0 and target_bits", gt=0.0)
    controller: str = param("threshold", "what target_l0 / target_bits steer: 'threshold' moves every latent's log "
                                         "threshold by the same step after each optimizer step (dl_coef stays the DL "
                                         "weight), 'dl_coef' steps log(dl_coef) instead (can only lower L0; see "
                                         "saekit.sae.mdl_control)", choices=["threshold", "dl_coef"])
    controller_rate: float = param(0.1, "the controller's step on the log of its knob per optimizer step at a relative "
                                        "error of 100 % (smaller errors move it proportionally less)", gt=0.0)
    controller_ema: float = param(0.0, "decay of the moving average of the batch statistic the controller steers on "
                                       "(0: each batch's own value)", ge=0.0, lt=1.0)
    surrogate_to_encoder: bool = param(False, "give the firing indicator's surrogate gradient to the pre-activation "
                                             "(encoder) as well as to the threshold; false: only θ learns from it, "
                                             "as in JumpReLU SAEs (the encoder then learns from the values alone)")
    init_l0: float | None = param(None, "initialise each latent's threshold from the first batch so that it fires "
                                        "on init_l0 / d_sae of its rows (None: init_threshold for every latent); "
                                        "defaults to target_l0 when that is set", gt=0.0)
    init_rates: str = param("per_latent", "with init_l0: 'per_latent' starts every latent at the rate init_l0 / d_sae "
                                          "(its own quantile), 'common' gives every latent the one threshold at which "
                                          "the batch's mean L0 is init_l0 (rates then differ across latents, as top-k's "
                                          "do)", choices=["per_latent", "common"])
    threshold_step: str = param("adam", "how the thresholds learn from their gradient: 'adam' (with the other parameters), "
                                        "or 'shared_rms' (outside Adam: momentum over one RMS shared by every threshold, "
                                        "so latents whose DL gradient is larger move further; see mdl_control)",
                                choices=["adam", "shared_rms"])
    threshold_lr: float = param(2e-3, "'shared_rms': the step on log θ per unit of normalised gradient", gt=0.0)

    def validate(self) -> None:
        if self.k is not None and self.k > self.d_sae:
            raise ConfigError(f"mdl: expected k <= d_sae={self.d_sae}, found k={self.k}")
        if self.target_l0 is not None and self.target_bits is not None:
            raise ConfigError(f"mdl: expected at most one of target_l0 and target_bits, found "
                              f"target_l0={self.target_l0}, target_bits={self.target_bits}")
        for name in ("target_l0", "init_l0"):
            v = getattr(self, name)
            if v is not None and v > self.d_sae:
                raise ConfigError(f"mdl: expected {name} <= d_sae={self.d_sae}, found {name}={v}")

    @property
    def lam(self) -> float:
        """λ as configured, or its default: DL_COEF_STEERED when the threshold controller holds a target
        (the DL term then only shapes the thresholds' spread, and at 1e-3 it barely does: README MDL
        section), else DL_COEF_FIXED (λ is then the sparsity coefficient, and the controller on λ starts there)."""
        if self.dl_coef is not None:
            return self.dl_coef
        return DL_COEF_STEERED if self.controlled is not None and self.controller == "threshold" else DL_COEF_FIXED

    @property
    def controlled(self) -> str | None:
        """Which training statistic the λ controller steers ('l0', 'bits'), or None (fixed dl_coef)."""
        return "l0" if self.target_l0 is not None else "bits" if self.target_bits is not None else None


def entropy_bits(p: Tensor) -> Tensor:
    """Binary entropy in bits, elementwise and differentiable; expects p in (0, 1)."""
    q = 1.0 - p
    return -(p * torch.log2(p) + q * torch.log2(q))


def soft_description_length(p_fire_F: Tensor, value_bits: float, n_rows: int) -> tuple[Tensor, Tensor]:
    """(activity bits Σ_j H(p̂_j), value bits b · Σ_j p̂_j) per row, from firing frequencies p̂.

    p̂ is squeezed affinely into [ε, 1 − ε] with ε = 1/(2 n_rows) (an affine map, not a clamp,
    so latents at exactly 0 or 1 keep their gradient).
    """
    eps = 0.5 / max(n_rows, 1)
    p = eps + (1.0 - 2.0 * eps) * p_fire_F.float()
    return entropy_bits(p).sum(), value_bits * p_fire_F.float().sum()


def reconstruction_loss(x_ND: Tensor, recon_ND: Tensor, scale: str, clip_multiple: float = 4.0) -> Tensor:
    """Scale-free reconstruction error of a batch (see `MDLConfig.loss_scale`).

    Why not only the batch FVU: in an LLM residual stream a few "massive activation" rows hold most
    of the variance (77 % in the quickstart store), so Σ‖e‖² / Σ‖x−μ‖² is decided by them and the
    dl term buys bits on ordinary rows almost for free. 'row' gives every row the same weight;
    'clipped' keeps the batch FVU for ordinary rows and caps a row's weight at clip_multiple × the
    median centred norm (the weights are constants: no gradient flows into the row norms).
    """
    sq_err_N = (recon_ND - x_ND).pow(2).sum(-1)
    centred_N = (x_ND - x_ND.mean(0)).pow(2).sum(-1).detach().clamp_min(1e-12)
    if scale == "row":
        return (sq_err_N / centred_N).mean()
    if scale == "clipped":
        cap = (clip_multiple ** 2) * centred_N.median()
        w_N = (cap / centred_N).clamp(max=1.0)
        return (w_N * sq_err_N).sum() / (w_N * centred_N).sum()
    return sq_err_N.sum() / centred_N.sum()


@register
class MDLSAE(SparseAutoencoder):
    architecture = "mdl"
    config_class = MDLConfig
    decoder_is_affine = True  # z @ W_dec + b_dec
    stat_buffers = {"batch_stat": "mean"}  # the controller steers on the global batch's statistic

    def __init__(self, cfg: MDLConfig):
        super().__init__(cfg)
        self.cfg: MDLConfig = cfg
        self.W_enc, self.W_dec, self.b_enc, self.b_dec = tied_init(cfg)
        kw = {"dtype": cfg.torch_dtype, "device": cfg.device}
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold), **kw))
        if cfg.controlled is not None:
            # the controller's state: training-only (checkpoints carry it for resume; final_sae does not).
            # batch_stat is the last training batch's controlled statistic, global under torch.distributed
            # (stat_buffers 'mean'); stat_ema its moving average (-1: none yet)
            self.register_buffer("batch_stat", torch.tensor(0.0, dtype=torch.float64), persistent=False)
            self.register_buffer("stat_ema", torch.tensor(-1.0, dtype=torch.float64), persistent=False)
            if cfg.controller == "dl_coef":
                self.register_buffer("log_dl_coef", torch.tensor(math.log(max(cfg.lam, 1e-12))), persistent=False)
        self._measured_fresh = False  # a training loss has set batch_stat since the last controller step
        if cfg.threshold_step == "shared_rms":  # training-only optimizer state of the thresholds (not resumed)
            self.register_buffer("thr_m", torch.zeros(cfg.d_sae, dtype=torch.float32, device=cfg.device), persistent=False)
            self.register_buffer("thr_v", torch.tensor(-1.0, dtype=torch.float64), persistent=False)
        self._thr_grad: Tensor | None = None

    # -- encoding and decoding ------------------------------------------------------------------
    def _pre(self, x_ND: Tensor) -> Tensor:
        x_in = x_ND - self.b_dec if self.cfg.apply_b_dec_to_input else x_ND
        return x_in @ self.W_enc + self.b_enc

    @property
    def threshold_F(self) -> Tensor:
        return self.log_threshold.exp()

    def _gate(self, pre_NF: Tensor, surrogate: bool) -> Tensor:
        """1[pre > θ] (and in the top-k when capped); with `surrogate`, its gradient is that of σ((pre − θ)/τ)."""
        theta_F = self.threshold_F
        hard_NF = (pre_NF > theta_F).to(pre_NF.dtype)
        if self.cfg.k is not None:
            keep = torch.zeros_like(hard_NF).scatter_(1, pre_NF.topk(self.cfg.k, dim=1, sorted=False).indices, 1.0)
            hard_NF = hard_NF * keep
        if not surrogate:
            return hard_NF
        pre_in = pre_NF if self.cfg.surrogate_to_encoder else pre_NF.detach()
        soft_NF = torch.sigmoid((pre_in - theta_F) / self.cfg.gate_temperature)
        return hard_NF + soft_NF - soft_NF.detach()

    def _dense_code(self, pre_NF: Tensor, surrogate: bool = False) -> tuple[Tensor, Tensor]:
        """(z = pre · gate, gate): JumpReLU with threshold θ_j, capped to the k largest when set."""
        gate_NF = self._gate(pre_NF, surrogate)
        return pre_NF * gate_NF, gate_NF

    def _sparse(self, z_NF: Tensor) -> SparseCode:
        width = max(int((z_NF != 0).sum(1).max()) if z_NF.shape[0] else 0, 1)
        vals_NK, idx_NK = z_NF.topk(width, dim=1, sorted=False)
        return SparseCode(idx_NK, vals_NK, self.cfg.d_sae)

    def _encode_flat(self, x_ND: Tensor) -> SparseCode:
        return self._sparse(self._dense_code(self._pre(x_ND))[0])

    def _decode_flat(self, code: SparseCode) -> Tensor:
        # dense product, the same arithmetic as forward (so forward == decode(encode(x)) exactly)
        return code.dense() @ self.W_dec + self.b_dec

    def _forward_flat(self, x_ND: Tensor) -> ForwardOutput:
        pre_NF = self._pre(x_ND)
        z_NF, gate_NF = self._dense_code(pre_NF, surrogate=self.training and torch.is_grad_enabled())
        recon = z_NF @ self.W_dec + self.b_dec
        aux = {"p_fire_F": gate_NF.mean(0)} if self.training else {}  # hard value, surrogate gradient
        return ForwardOutput(recon, self._sparse(z_NF), aux)

    # -- loss -----------------------------------------------------------------------------------
    @property
    def dl_coef(self) -> float:
        """λ in use: the controller's current value when a target is set, else `cfg.lam` (dl_coef or its default)."""
        return float(self.log_dl_coef.exp()) if self._steers_coef else self.cfg.lam

    @property
    def _steers_coef(self) -> bool:
        return self.cfg.controlled is not None and self.cfg.controller == "dl_coef"

    def loss(self, x: Tensor, out: ForwardOutput) -> LossOutput:
        """error + λ · (Σ_j H(p̂_j) + value_bits · Σ_j p̂_j); see the module docstring and
        `reconstruction_loss` for the error's scaling. With a target, the batch's L0 (or bits) is
        kept for the controller step that `after_optimizer_step` takes."""
        x_ND = x.reshape(-1, self.cfg.d_in)
        n = x_ND.shape[0]
        recon_ND = out.recon.reshape(x_ND.shape)
        err = reconstruction_loss(x_ND, recon_ND, self.cfg.loss_scale, self.cfg.clip_multiple)
        p_fire_F = out.aux.get("p_fire_F")
        if p_fire_F is None:  # eval mode: hard frequencies (no gradient path needed)
            p_fire_F = (out.code.dense() != 0).to(x_ND.dtype).mean(0)
        activity, value = soft_description_length(p_fire_F, self.cfg.value_bits, n)
        dl = activity + value
        l0 = p_fire_F.detach().sum()
        coef = self.log_dl_coef.exp() if self._steers_coef else self.cfg.lam
        total = err + coef * dl
        if self.cfg.controlled and self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.batch_stat.copy_(l0 if self.cfg.controlled == "l0" else dl.detach())
            self._measured_fresh = True
        with torch.no_grad():
            sse = (recon_ND - x_ND).pow(2).sum()
            fvu = sse / (x_ND - x_ND.mean(0)).pow(2).sum().clamp_min(1e-12)
        parts = {"fvu": fvu.item(), "mse": (sse / n).item(), "activity_bits": activity.item(),
                 "value_bits": value.item(), "dl_bits": dl.item(), "l0": float(l0), "dl_coef": float(coef)}
        if self.cfg.loss_scale != "batch":
            parts["scaled_error"] = err.item()
        return LossOutput(total, parts)

    # -- training callbacks -----------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x_ND: Tensor) -> None:
        """b_dec <- geometric median of `x_ND` (as for top-k); with `init_l0` (or `target_l0`), each
        latent's threshold <- the (1 − init_l0/d_sae) quantile of its pre-activations on `x_ND`.

        Why from data: a constant threshold (init_threshold) means a different firing rate for every
        latent and every input scale; on real activations it starts most latents firing on most
        rows, and the first hundreds of steps are spent shrinking that. The quantile starts every
        latent at the requested rate (the thresholds are floored at 1e-6: θ is exp(log θ))."""
        x_ND = x_ND.reshape(-1, self.cfg.d_in)
        self.b_dec.copy_(geometric_median(x_ND.double()).to(self.b_dec.dtype))
        l0 = self.cfg.init_l0 if self.cfg.init_l0 is not None else self.cfg.target_l0
        if l0 is None:
            return
        pre_NF = self._pre(x_ND.to(self.W_enc.dtype)).float()
        q = min(max(1.0 - l0 / self.cfg.d_sae, 0.0), 1.0)
        if self.cfg.init_rates == "common":  # one threshold: the q quantile of every pre-activation of the batch
            flat = pre_NF.flatten()
            theta_F = flat.kthvalue(min(max(1, int(round(q * flat.numel()))), flat.numel())).values.expand(pre_NF.shape[1])
        else:
            theta_F = pre_NF.kthvalue(min(max(1, int(round(q * pre_NF.shape[0]))), pre_NF.shape[0]), dim=0).values
        self.log_threshold.copy_(theta_F.clamp_min(1e-6).log().to(self.log_threshold.dtype))

    def before_optimizer_step(self) -> None:
        remove_parallel_grad_(self.W_dec)
        if self.cfg.threshold_step == "shared_rms" and self.log_threshold.grad is not None:
            self._thr_grad = self.log_threshold.grad.detach().float().clone()
            self.log_threshold.grad = None  # Adam skips it; after_optimizer_step applies the shared-RMS step

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        renormalise_rows_(self.W_dec)
        if self._thr_grad is not None:
            shared_rms_step_(self.log_threshold, self._thr_grad, self.thr_m, self.thr_v, self.cfg.threshold_lr)
            self._thr_grad = None
        if self.cfg.controlled and self._measured_fresh:
            self._control_step()
            self._measured_fresh = False

    def _control_step(self) -> None:
        """One controller step on `batch_stat` (the trainer has made it the global batch's by now):
        every latent's log threshold, or log λ, moves towards the target (saekit.sae.mdl_control)."""
        cfg = self.cfg
        target = cfg.target_l0 if cfg.controlled == "l0" else cfg.target_bits
        self.stat_ema.copy_(ema_step(self.stat_ema, self.batch_stat, cfg.controller_ema))
        knob = self.log_dl_coef if self._steers_coef else self.log_threshold
        knob.copy_(controller_step(knob, self.stat_ema, target, cfg.controller_rate))

    def _fold_input_scale_(self, s: float) -> None:
        """With x' = s·x, pre' = s·pre(x), so dividing both biases (and the JumpReLU threshold) by s
        gives codes z/s and x̂/s on raw x; the active set (pre > 0, top-k) is unchanged for s > 0."""
        self.b_enc.div_(s)
        self.b_dec.div_(s)
        self.log_threshold.sub_(math.log(s))


