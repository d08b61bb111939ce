"""Tokens routed to each expert of each layer, counted on the device so a step never waits for the host.

Every MoE layer adds its top-k choices to one persistent [L, E] int64 buffer (an `index_add_`: no host sync, so a
CUDA graph captures it with the rest of the step); the host reads the buffer only when metrics are collected, between
steps (`snapshot`). A decode step padded to a CUDA-graph bucket routes its padding rows too: they must not count. So
each step first lays out a [T, K] weight (1 for a real token, 0 for a padding row, i.e. slot -1 in the step's
layout) that every layer's add reads; the cache's `begin_step` makes it, which both the eager forward and the first
piece of a piecewise graph call. A forward that step does not describe (the model run outside the engine, over
another cache) is not counted.

Legend: L = layers, E = experts, T = tokens of the step, K = experts per token.
"""

from __future__ import annotations

from typing import Protocol

import torch


class _RoutedLayer(Protocol):
    load: ExpertLoad | None


class ExpertLoad:
    def __init__(self, layers: list[_RoutedLayer], num_layers: int, num_experts: int, top_k: int,
                 device: torch.device | str, rows: int):
        """`layers`: the model's MoE layers, which add to this load while it is theirs (`begin_step` makes it so);
        `rows`: the most tokens a step brings. The weight buffer is made once, for `rows`: captured graphs read its
        storage, so it never grows."""
        self.layers = layers
        self.top_k = top_k
        # Normal tensors even when made under inference mode: they are written in place in every forward.
        with torch.inference_mode(False):
            self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)  # [L, E]
            self._weights = torch.zeros(rows, top_k, dtype=torch.int64, device=device)  # [rows, K]
        self._step = self._weights[:0].view(-1)  # [T * K] this step's weights

    def begin_step(self, slot_mapping: torch.Tensor) -> None:
        """Lay out the step's weights from its slots [T] (-1: a padding row) and make the layers add here (a model
        shared by several engines counts for the one stepping). Raises ValueError for more tokens than `rows`."""
        t = slot_mapping.shape[0]
        if t > self._weights.shape[0]:
            raise ValueError(f"a step of {t} tokens, but the expert load was sized for {self._weights.shape[0]} rows")
        weights = self._weights[:t]  # [T, K]
        weights.copy_((slot_mapping >= 0).unsqueeze(1).expand(t, self.top_k))
        self._step = weights.view(-1)
        if self.layers and self.layers[0].load is not self:
            for layer in self.layers:
                layer.load = self

    def add(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count one layer's routing: topk_ids [T, K] global expert ids of the step `begin_step` laid out."""
        if topk_ids.numel() == self._step.numel():
            self.counts[layer].index_add_(0, topk_ids.reshape(-1), self._step)

    def snapshot(self) -> list[list[int]]:
        """[L][E] tokens routed so far (a host copy: call between steps, on the thread that steps)."""
        return self.counts.tolist()

    def reset(self) -> None:
        self.counts.zero_()
