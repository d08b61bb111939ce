"""The contract every attention backend meets."""

from __future__ import annotations

from typing import Protocol

import torch

from cluster.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str
    graph_safe: bool  # `forward` reads only device tensors and shapes of the metadata (CUDA-graph capturable)

    def plan(self, meta: AttentionMetadata) -> None:
        """Host-side preparation, once per step, before any layer attends."""
        ...

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """Causal attention of each sequence's new tokens over its cached tokens (this step's already written).

        Legend: T = new tokens, H = query heads, KV = kv heads, Dh = head dim, N = blocks, bs = block size.
        q [T, H, Dh]; k_cache, v_cache [KV, N, bs, Dh] (one layer) -> [T, H, Dh]. Rows of context 0 give zeros.
        """
        ...
