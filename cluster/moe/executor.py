"""Expert executors: where a layer's experts run. The MoE layer only sees this interface."""

from __future__ import annotations

from typing import Protocol

import torch

from cluster.moe.backend import MoEBackend, get_backend, prepare_layers
from cluster.moe.weights import ExpertWeights


class ExpertExecutor(Protocol):
    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], topk_ids/topk_weights [T, K] -> [T, D]: the routed experts' weighted sum for `layer`."""
        ...


class LocalExpertExecutor:
    """All experts of every layer in this process (single-process mode, or one shard's own experts)."""

    def __init__(self, layers: list[ExpertWeights], num_experts: int, backend: MoEBackend | None = None):
        self.layers = layers
        self.num_experts = num_experts
        self.backend = backend or get_backend("auto", layers[0].w13.device if layers else "cpu")
        prepare_layers(self.backend, layers)

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        return self.backend(x, self.layers[layer], topk_ids, topk_weights, self.num_experts)

    @property
    def graph_safe(self) -> bool:
        """Whether a CUDA graph can capture these experts (a backend that never syncs with the host)."""
        return getattr(self.backend, "graph_safe", False)

    def warm_up(self, max_tokens: int, top_k: int) -> None:
        """Compile what a backend compiles (the Triton kernels) before serving; see `TritonMoEBackend.warm_up`."""
        warm_up_layers(self.backend, self.layers, max_tokens, top_k, self.num_experts)


def warm_up_layers(backend: MoEBackend, layers: list[ExpertWeights], max_tokens: int, top_k: int,
                   num_experts: int) -> None:
    """Warm a backend that compiles (has `warm_up`) on one layer of each distinct shape, dtype and expert set:
    compiled kernels are shared by every layer that launches them alike."""
    warm_up = getattr(backend, "warm_up", None)
    seen = set()
    for weights in layers if warm_up is not None else []:
        key = (tuple(weights.w13.shape), weights.w13.dtype, weights.w13.device, weights.expert_ids)
        if key not in seen:
            seen.add(key)
            warm_up(weights, max_tokens, top_k=top_k, num_experts=num_experts)
