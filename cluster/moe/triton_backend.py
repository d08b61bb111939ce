"""Triton MoE backend: align the pairs, pick a block config, run the fused gate_up and down kernels."""

from __future__ import annotations

import torch

from cluster.kernels.align import align_pairs
from cluster.kernels.fused_moe import fused_experts
from cluster.kernels.tuning import MoEConfig, config_buckets, get_config, interpreting
from cluster.moe.weights import ExpertWeights


class TritonMoEBackend:
    """Fused grouped-GEMM MoE (see `cluster.kernels.fused_moe`) under the `MoEBackend` contract; its layout is the
    `ExpertWeights` themselves. Router weights are used in fp32 whatever the activations' dtype."""

    name = "triton"
    graph_safe = True  # no host sync, sizes from shapes only: a decode step through it can be captured

    def supports(self, weights: ExpertWeights) -> bool:
        """Float weights on a GPU (or anywhere under the Triton interpreter); the kernels mask any D and F."""
        return ((weights.w13.device.type == "cuda" or interpreting())
                and weights.w13.dtype in (torch.float32, torch.bfloat16, torch.float16))

    def prepare(self, weights: ExpertWeights) -> ExpertWeights:
        return weights

    def config(self, tokens: int, weights: ExpertWeights) -> MoEConfig:
        return get_config(tokens, weights.w13.shape[0], weights.w2.shape[2], weights.w13.device, weights.w13.dtype)

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

    def warm_up(self, weights: ExpertWeights, max_tokens: int, top_k: int = 2,
                num_experts: int | None = None) -> list[tuple[int, MoEConfig]]:
        """Compile every kernel variant serving up to `max_tokens` tokens can launch, so no JIT compile happens
        while serving (or inside a CUDA-graph capture).

        Runs the layer once at the first M of each M bucket with a distinct config (see `tuning.config_buckets`:
        the kernels compile once per config), with activations in the weights' dtype and fp32 router weights (what
        the layer passes), and aligns with both int64 (router) and int32 (token channel) expert ids. Also builds the
        cached device expert map, whose first build copies from the host. -> the (M, config) pairs run.
        Legend: M = tokens, K = `top_k`, D = hidden, E = local experts.
        """
        num_local, _, d = weights.w13.shape
        if num_local == 0 or max_tokens < 1:
            return []
        num_experts = num_experts or max(weights.expert_ids) + 1
        dev = weights.w13.device
        expert_map = weights.expert_map(num_experts)
        held = torch.tensor(weights.expert_ids, device=dev)  # [E] global ids of the local experts
        g = torch.Generator(device=dev).manual_seed(0)  # the process's own random state is left alone
        ran: list[tuple[int, MoEConfig]] = []
        for m, _, cfg in config_buckets(max_tokens, num_local, weights.w2.shape[2], dev, weights.w13.dtype):
            if any(cfg == seen for _, seen in ran):
                continue
            # Every local expert busy (when M * K allows), distinct experts per token where E >= K.
            ids = held[(torch.arange(m * top_k, device=dev) % num_local).view(m, top_k)]  # [M, K]
            x = torch.randn(m, d, generator=g, device=dev).to(weights.w13.dtype)  # [M, D]
            weights_k = torch.full((m, top_k), 1.0 / top_k, device=dev)  # [M, K] fp32
            self(x, weights, ids, weights_k, num_experts)
            align_pairs(ids.to(torch.int32), expert_map, num_local, cfg.block_m)
            ran.append((m, cfg))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return ran
