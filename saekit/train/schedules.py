"""Learning-rate schedules: pure functions of the step, with known answers in tests/test_schedules.py.

Steps count from 0 (the first optimizer update is step 0). The learning rate of step `s` is
`base_lr * warmup_factor(s) * decay_factor(s)`.
"""

from __future__ import annotations

import math


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: (step + 1) / warmup_steps for the first warmup_steps steps, then 1."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def decay_start(total_steps: int, decay_fraction: float) -> int:
    """First step of the decay phase: the last round(decay_fraction * total_steps) steps decay."""
    return total_steps - int(round(decay_fraction * total_steps))


def decay_factor(step: int, total_steps: int, decay: str = "linear", decay_fraction: float = 0.2) -> float:
    """1 before the decay phase; then linear or cosine from 1 towards 0, reaching 0 at step == total_steps."""
    if decay == "none":
        return 1.0
    start = decay_start(total_steps, decay_fraction)
    n = total_steps - start
    if n <= 0 or step < start:
        return 1.0
    progress = min(1.0, (step - start) / n)
    if decay == "linear":
        return 1.0 - progress
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay '{decay}' (expected 'none', 'linear' or 'cosine')")


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, decay: str = "linear",
          decay_fraction: float = 0.2) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    return base_lr * warmup_factor(step, warmup_steps) * decay_factor(step, total_steps, decay, decay_fraction)
