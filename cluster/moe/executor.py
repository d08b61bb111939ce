"""Expert executors: where a layer's experts run. The MoE layer only sees this interface."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from cluster.moe.backend import MoEBackend, get_backend
from cluster.moe.weights import ExpertWeights


class ExpertExecutor(Protocol):
    graph_safe: bool  # a CUDA graph can capture a call (see `cluster.engine.cuda_graphs`)

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
        self.prepared = [self.backend.prepare(w) for w in layers]  # the backend's layout, made once at load

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        return self.backend(x, self.prepared[layer], topk_ids, topk_weights, self.num_experts)

    @property
    def graph_safe(self) -> bool:
        """Whether a CUDA graph can capture these experts (a backend that never syncs with the host)."""
        return self.backend.graph_safe

    def warm_up(self, max_tokens: int, top_k: int) -> None:
        """Compile what the backend compiles (the Triton kernels) before serving; see `MoEBackend.warm_up`."""
        warm_up_layers(self.backend, self.layers, self.prepared, max_tokens, top_k, self.num_experts)


def warm_up_layers(backend: MoEBackend, layers: list[ExpertWeights], prepared: Sequence[object], max_tokens: int,
                   top_k: int, num_experts: int) -> None:
    """`backend.warm_up` on one layer of each distinct shape, dtype, device and expert set (`prepared[i]` is
    `layers[i]` in the backend's layout): compiled kernels are shared by every layer that launches them alike."""
    seen = set()
    for weights, layer in zip(layers, prepared):
        key = (tuple(weights.w13.shape), weights.w13.dtype, weights.dtype, weights.w13.device, weights.expert_ids)
        if key not in seen:
            seen.add(key)
            backend.warm_up(layer, max_tokens, top_k=top_k, num_experts=num_experts)
