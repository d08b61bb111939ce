"""MoE backends: given one layer's expert weights and the routing, compute the weighted expert sum.

Every backend has the same contract (see `MoEBackend.__call__`); the torch backend is the CPU path and the
reference the Triton kernels are checked against.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from cluster.moe.weights import ExpertWeights


class MoEBackend(Protocol):
    name: str

    def __call__(self, x: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
        """Weighted sum over each token's routed experts that `weights` holds; others contribute zero.

        Legend: T = tokens, D = hidden, K = experts per token.
        x [T, D]; topk_ids [T, K] global expert ids; topk_weights [T, K] -> [T, D] in x's dtype.
        """
        ...


class TorchMoEBackend:
    """Sort the (token, expert) pairs by expert and run one pair of matmuls per local expert with tokens."""

    name = "torch"

    def __call__(self, x: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
        t, k = topk_ids.shape
        out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)  # [T, D] fp32 accumulator
        local = weights.expert_map(num_experts)[topk_ids.flatten().long()]  # [T*K] local index or -1
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local[order] + 1, minlength=len(weights.expert_ids) + 1).tolist()
        start = counts[0]  # pairs routed to experts held elsewhere sort first
        ffn = weights.w2.shape[2]
        for e, n in enumerate(counts[1:]):
            if n == 0:
                continue
            pairs = order[start:start + n]
            start += n
            tokens = pairs // k
            h = x[tokens] @ weights.w13[e].t()  # [n, 2F]
            h = F.silu(h[:, :ffn]) * h[:, ffn:]
            y = (h @ weights.w2[e].t()).float() * topk_weights.flatten()[pairs].unsqueeze(1).float()
            out.index_add_(0, tokens, y)
        return out.to(x.dtype)


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> MoEBackend:
    """`auto` picks Triton on CUDA and torch elsewhere."""
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchMoEBackend()
    if name == "triton":
        from cluster.moe.triton_backend import TritonMoEBackend

        return TritonMoEBackend()
    raise ValueError(f"unknown MoE backend {name!r} (choose auto, torch or triton)")
