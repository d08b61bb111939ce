"""The Mixtral top-k router, in torch: what the fused kernel that `MoELayer.route` runs on CUDA
(`cluster.kernels.glue.route`) computes, and the path everywhere else."""

from __future__ import annotations

import torch


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k on the logits, softmax over the chosen k (as Mixtral does it).

    router_logits [T, E] -> (topk_weights [T, K] fp32, topk_ids [T, K] int64).
    """
    top_logits, top_ids = torch.topk(router_logits.float(), k, dim=-1)
    return torch.softmax(top_logits, dim=-1), top_ids
