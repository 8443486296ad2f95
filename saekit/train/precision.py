"""Mixed precision for SAE training: bf16 autocast around the forward and the loss, nothing else.

Why only autocast: the parameters, their gradients and Adam's moments stay fp32, so small updates
to biases and thresholds are not rounded away (bf16 has 8 mantissa bits: an Adam step of 1e-4 on a
bias of size 1 would vanish in a bf16 parameter; docs/RELIABILITY.md 24). Only the matmuls inside the
forward run in bf16, which is where the time goes on GPUs and on CPUs with bf16 instructions
(AVX512-BF16 / AMX). Without such hardware, bf16 is emulated and slower, so `auto` picks fp32 there.
"""

from __future__ import annotations

import contextlib

import torch

from saekit.errors import ConfigError
from saekit.hardware import bf16_native

PRECISIONS = ("fp32", "bf16", "auto")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'fp32' or 'bf16' for this device ('auto': bf16 where the hardware does bf16 natively)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {PRECISIONS}, found {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if bf16_native(device) else "fp32"


def autocast_for(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context the SAE forward and loss run in: bf16 autocast, or nothing for fp32."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def bf16_resolution(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (elementwise): 2^(floor(log2|x|) - 7)."""
    mag = x.detach().abs().float().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)
