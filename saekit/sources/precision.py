"""The precision of a caching forward pass (`source.forward_dtype`): fp32, or bf16 autocast.

Why autocast and not bf16 weights: on the embedded SmolLM2 (layer 15, 192 tweets, 6.2k rows, one thread)
bf16 autocast ran 2.7x the fp32 forward with a median per-row relative error of 0.75 % (p99 2.1 %), while
casting the weights to bf16 ran 3.6x with 1.2 % (p99 4.1 %, worst row 20 %); on MiniLM 2.3x at 0.57 %
against 3.3x at 1.0 %. Under autocast the weights stay fp32 and only the matmuls and the attention run in
bf16 (torch's bf16 SDPA kernel, softmax included); the residual stream and the norms stay fp32 (with bf16
weights the residual stream itself is bf16, and the rounding compounds layer after layer). Rows leave the
source as fp32 and are stored in `store.dtype`. `auto` is bf16 where the hardware multiplies bf16
natively (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX), and fp32 elsewhere, where emulated bf16
would be slower.
"""

from __future__ import annotations

import contextlib

import torch

from saekit.errors import ConfigError
from saekit.hardware import bf16_native

FORWARD_DTYPES = ("float32", "bfloat16", "auto")


def resolve_forward_dtype(forward_dtype: str, device: str | torch.device = "cpu") -> str:
    """'float32' or 'bfloat16' for this device ('auto': bf16 where the hardware does bf16 natively)."""
    if forward_dtype not in FORWARD_DTYPES:
        raise ConfigError(f"source.forward_dtype: expected one of {list(FORWARD_DTYPES)}, found {forward_dtype!r}")
    if forward_dtype != "auto":
        return forward_dtype
    return "bfloat16" if bf16_native(device) else "float32"


def forward_context(forward_dtype: str, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """The context a caching forward runs in: bf16 autocast on the model's device, or nothing for fp32."""
    if resolve_forward_dtype(forward_dtype, device) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
