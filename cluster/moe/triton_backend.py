"""Triton MoE backend: align the pairs, pick a block config, run the fused gate_up and down kernels."""

from __future__ import annotations

import torch

from cluster.kernels.align import align_pairs
from cluster.kernels.fused_moe import fused_experts
from cluster.kernels.tuning import MoEConfig, get_config
from cluster.moe.weights import ExpertWeights


class TritonMoEBackend:
    """Fused grouped-GEMM MoE (see `cluster.kernels.fused_moe`); same contract as `MoEBackend.__call__`."""

    name = "triton"

    def config(self, tokens: int, weights: ExpertWeights) -> MoEConfig:
        return get_config(tokens, weights.w13.shape[0], weights.w2.shape[2], weights.w13.device)

    def __call__(self, x: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, num_experts: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        t, d = x.shape
        num_local = weights.w13.shape[0]
        if t == 0 or num_local == 0:
            return torch.zeros(t, d, dtype=out_dtype or x.dtype, device=x.device)
        cfg = self.config(t, weights)
        aligned = align_pairs(topk_ids, weights.expert_map(num_experts), num_local, cfg.block_m)
        xw = x.to(weights.w13.dtype)  # tl.dot needs both operands in one dtype
        return fused_experts(xw, weights.w13, weights.w2, topk_weights, aligned, cfg).to(out_dtype or x.dtype)
