"""Tokens routed to each expert of each layer, counted on the device so a step never waits for the host.

Every MoE layer adds its top-k choices to one persistent [L, E] int64 buffer (an `index_add_`: no host sync, so a
CUDA graph captures it with the rest of the step); the host reads the buffer only when metrics are collected, between
steps (`snapshot`). A decode step padded to a CUDA-graph bucket routes its padding rows too: they must not count. So
each step first lays out a [T, K] weight (1 for a real token, 0 for a padding row, i.e. slot -1 in the step's
layout) that every layer's add reads.

Who does what: the engine's model runner owns its `ExpertLoad`; for each forward it takes an `ExpertStep` (`step`:
views of the persistent buffers, no device work), lays its weights out (`ExpertStep.lay_out`: a device op, in the
eager forward and inside a captured graph alike) and puts it in the forward's context
(`cluster.model.forward_context`), where the MoE layers find it. A forward without that context (the model run
outside the engine, over another cache) counts nothing; two engines sharing a model count each its own steps.
On CUDA the router's fused kernel (`cluster.kernels.glue.route`) adds the same counts to the same row itself
instead of `ExpertStep.add`.

Legend: L = layers, E = experts, T = tokens of the step, K = experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.config import ModelConfig


@dataclass(frozen=True)
class ExpertStep:
    """One forward's share of an `ExpertLoad`: the counts it adds to and its [T, K] weights."""

    counts: torch.Tensor  # [L, E] int64, the load's own buffer
    weights: torch.Tensor  # [T, K] int64, a view of the load's persistent weight buffer

    def lay_out(self, slot_mapping: torch.Tensor) -> None:
        """Weights from the step's slots [T] (-1: a padding row): a device op, so a captured graph replays it."""
        self.weights.copy_((slot_mapping >= 0).unsqueeze(1).expand_as(self.weights))

    def add(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count one layer's routing: topk_ids [T, K] global expert ids of this step's tokens."""
        self.counts[layer].index_add_(0, topk_ids.reshape(-1), self.weights.view(-1))


class ExpertLoad:
    def __init__(self, num_layers: int, num_experts: int, top_k: int, device: torch.device | str, rows: int):
        """`rows`: the most tokens a step brings. The weight buffer is made once, for `rows`: captured graphs read its
        storage, so it never grows."""
        # Normal tensors even when made under inference mode: they are written in place in every forward.
        with torch.inference_mode(False):
            self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)  # [L, E]
            self._weights = torch.zeros(rows, top_k, dtype=torch.int64, device=device)  # [rows, K]

    @classmethod
    def for_model(cls, config: ModelConfig, device: torch.device | str, rows: int) -> ExpertLoad | None:
        """The load of a model of `config` (None for a dense model, which routes nothing)."""
        if not config.is_moe:
            return None
        return cls(config.num_layers, config.num_experts, config.experts_per_token, device, rows)

    def step(self, tokens: int) -> ExpertStep:
        """The share of a forward over `tokens` tokens: the same tensors for every step of that size. Raises
        ValueError for more tokens than `rows`."""
        if tokens > self._weights.shape[0]:
            raise ValueError(f"a step of {tokens} tokens, but the expert load was sized for "
                             f"{self._weights.shape[0]} rows")
        return ExpertStep(self.counts, self._weights[:tokens])

    def snapshot(self) -> list[list[int]]:
        """[L][E] tokens routed so far (a host copy: call between steps, on the thread that steps)."""
        return self.counts.tolist()

    def reset(self) -> None:
        self.counts.zero_()
