"""FP8 numbers for the experts: float8_e4m3fn values, each row with a float32 scale (w ~= q * scale). Torch ops
only (no Triton): the loaders quantize weights with them, and they are the reference of the fused MoE's own.

Weights are scaled per output channel: output j of a matmul is x . w[j], so its scale multiplies the fp32
accumulator once after the dot (not every weight before it), and each row keeps its own range instead of the whole
matrix's. A checkpoint's per-tensor scale is the special case of one value repeated. Activations (W8A8, on GPUs that
multiply FP8) are scaled per token, dynamically, by the same rule over their rows.

Legend: N = rows (output channels, or tokens), K = the reduced dimension.
"""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: larger magnitudes would cast to NaN (e4m3fn has no infinity)
SCALE_BYTES = torch.float32.itemsize


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (FP8 [..., N, K], float32 scales [..., N]): each row scaled so that its largest magnitude
    maps to FP8_MAX, then rounded to nearest. No host sync: a CUDA graph captures it."""
    amax = t.abs().amax(dim=-1).float()
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero row stays zero
    q = (t.float() / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 [..., N, K] and scales [..., N] -> [..., N, K] in `dtype`."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def fp8_matrix_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of a weight matrix [N, K] held in FP8: one per weight and a float32 scale per output channel."""
    return math.prod(shape) + math.prod(shape[:-1]) * SCALE_BYTES
