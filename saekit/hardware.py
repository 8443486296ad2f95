"""What the CPU can do, asked once: the one place every layer asks it (sources, SAE kernels, trainer).

Why it matters: bf16 matrix products are fast only where the hardware multiplies bf16 natively
(AVX512-BF16 or AMX); elsewhere torch emulates them and bf16 is slower than float32, so `auto`
precisions and the float32 encoder's bf16 pre-filter both ask this before using bf16.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 dot products (avx512_bf16 or amx_bf16 in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_native(device: str | torch.device) -> bool:
    """True where bf16 products run natively: CUDA with bf16 support, or a CPU with bf16 instructions
    (what every `auto` precision asks)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return kind == "cpu" and cpu_has_bf16()
