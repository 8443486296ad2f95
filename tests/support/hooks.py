"""Hook bookkeeping for tests: every hook a test installs must be gone when its block exits."""

from __future__ import annotations

from torch import nn


def count_hooks(model: nn.Module) -> int:
    """Forward, pre-forward and backward hooks installed anywhere in the model."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    return total
