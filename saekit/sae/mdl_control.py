"""The MDL-SAE's target controller: pure functions that steer training towards a requested mean L0
(or bits per row), and the measurements that chose them (issue 24).

What a target steers (`MDLConfig.controller`):

* 'threshold' (the default): after every optimizer step each latent's log threshold moves by the same
  step, `rate · clip((measured − target) / target, ±1)`. L0 answers within the step (a common shift
  of every threshold is a monotone knob on L0), whatever the optimizer and the learning rate do to
  the gates meanwhile, and λ (`dl_coef`) stays what the MDL objective says it is: the price of a bit,
  which here decides *how* the requested activity is spread over latents (activity entropy) rather
  than how much of it there is. This is "minimise error + λ·DL subject to mean L0 = target", the
  constraint kept by a projection-like step after each gradient step, as BatchTopK keeps its L0.
* 'dl_coef': the same step on log λ (the first design). It can only lower L0: with λ → 0 the gates'
  own dynamics set L0, and on the quickstart store those drift *below* a target with the surrogate
  on the thresholds only (L0 24 → 12 at λ 1e-3 → 4e-6 over 300 steps, d_sae 1,152; 15.5 at the end)
  and far *above* it with the surrogate on the encoder too (L0 at the cap 64 while λ wound up from
  3e-7 to 8e-4, then 20). An integral controller on a knob with a one-sided, lagged effect winds up.

`ema_step` smooths the measured statistic (`controller_ema`; 0 = every batch's own value). Under
torch.distributed the measured statistic is the global batch's (the SAE declares its `batch_stat`
buffer with the 'mean' stat reduction), so every rank takes the same step.
"""

from __future__ import annotations

from torch import Tensor


def controller_step(log_value: Tensor, measured: Tensor, target: float, rate: float) -> Tensor:
    """One step of a log-space controller: `log_value + rate · clip((measured − target) / target, ±1)`.

    Used for both knobs (log θ of every latent, or log λ): too many latents (or bits) → larger
    thresholds / larger λ → fewer. Why multiplicative (a step on the log): the L0 a threshold or a λ
    buys spans orders of magnitude of it, so an additive step would be too slow at one end and
    unstable at the other. Why a relative error, clipped: the same gain at any target, and one
    outlying batch cannot throw the knob. The step is proportional to the error and accumulates in
    the knob (an integral controller on the knob), so it rests only where measured == target."""
    err = ((measured.detach().float() - target) / target).clamp(-1.0, 1.0)
    return log_value + rate * err.to(log_value.dtype)


def ema_step(ema: Tensor, measured: Tensor, decay: float) -> Tensor:
    """Exponential moving average of the controlled statistic; `ema` < 0 means 'no value yet' (the
    statistic is a count or bits, never negative), and the first measurement is taken as it is."""
    measured = measured.detach().to(ema.dtype)
    if decay == 0.0 or float(ema) < 0:
        return measured.clone()
    return decay * ema + (1.0 - decay) * measured


def shared_rms_step_(log_threshold: Tensor, grad_F: Tensor, m_F: Tensor, v: Tensor, lr: float,
                     beta1: float = 0.9, beta2: float = 0.999) -> None:
    """One in-place step on the log thresholds with momentum and ONE second moment shared by all of them.

    Why (issue 24): Adam divides each threshold's step by that threshold's own gradient RMS, so every
    latent moves at about the same speed whatever its gradient; the DL term's *differential* price
    (log2((1 − p)/p): rare latents cost more bits per firing) then survives only as a sign. With one
    shared RMS the step keeps the gradients' ratios across latents (SGD up to a common scale), while
    the scale stays free of the loss's units. `v` < 0 means 'no value yet'."""
    g2 = grad_F.double().pow(2).mean()
    v.copy_(g2 if float(v) < 0 else beta2 * v + (1 - beta2) * g2)
    m_F.mul_(beta1).add_(grad_F.to(m_F.dtype), alpha=1 - beta1)
    log_threshold.sub_((lr * m_F / (v.sqrt().float() + 1e-12)).to(log_threshold.dtype))
