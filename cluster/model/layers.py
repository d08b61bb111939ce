"""Small building blocks: RMSNorm, rotary embeddings, the dense SwiGLU MLP.

RMSNorm and rotary run fused Triton kernels on CUDA (`cluster.model.glue_selector` decides); the torch code here is
what they compute, and what runs everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model import glue_selector


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        fused = glue_selector.fused_glue(x)
        if fused is not None:
            return fused.add_rms_norm(x, self.weight, self.eps)[0]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [T, D] -> (this norm of r, r) with r = residual + x: the residual add before a norm, in the
        norm's kernel where the glue is fused."""
        fused = glue_selector.fused_glue(x)
        if fused is not None:
            return fused.add_rms_norm(x, self.weight, self.eps, residual)
        r = residual + x
        return self(r), r


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embeddings (the HF Mistral layout), cos/sin computed from positions in fp32."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # A plain attribute, not a buffer: models are built on the meta device and loaded with assign.
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
                                         / head_dim))

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, H, Dh]; k [T, KV, Dh] -> rotated (q, k). The fused kernel rotates q and k in place:
        callers must not keep the unrotated ones."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        fused = glue_selector.fused_glue(q)
        if fused is not None:
            return fused.rotary(positions, q, k, self.inv_freq)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, Dh/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [T, 1, Dh]
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class SwiGLU(nn.Module):
    """Dense Mistral MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
