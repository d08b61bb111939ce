"""The compute dtype: `auto` is bf16 where the hardware multiplies bf16 natively, else fp32.

On a CPU without bf16 instructions (AVX2 only) every bf16 matmul converts its operands first: measured 2-6x slower
than fp32 for the `mini` model's decode and prefill steps on a 2-core AMD EPYC.
"""

from __future__ import annotations

import torch


def native_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str, device: torch.device | str) -> str:
    """`auto` -> "bf16" or "fp32" for `device`; any other name is returned as it is."""
    if name != "auto":
        return name
    return "bf16" if native_bf16(device) else "fp32"
