"""The sparse MoE block: a router gate here, the experts wherever the executor keeps them.

The router weights go to the experts in fp32 whatever the activations' dtype: every backend scales each expert's
output by its weight on an fp32 accumulator, so a weight is never rounded to bf16 (2^-8 relative) first. (transformers
rounds the weights to the activations' dtype, so in bf16 the two differ by that rounding; in fp32 they agree.)

Routing is counted per expert where the forward's context asks for it (`cluster.model.forward_context`): the layer
holds no per-step state of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from cluster.model import glue_selector
from cluster.model.forward_context import current_context
from cluster.model.router import route as top_k_route
from cluster.moe.executor import ExpertExecutor


class MoELayer(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, layer: int):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.top_k = top_k
        self.layer = layer
        self.executor: ExpertExecutor | None = None  # set by the loader; may be local or remote

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]. Legend: T = tokens, D = hidden, K = experts per token."""
        if self.executor is None:
            raise RuntimeError(f"layer {self.layer}: no expert executor attached")
        weights, ids = self.route(x)  # [T, K], [T, K]
        return self.executor(self.layer, x, ids, weights)  # weights [T, K] fp32

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (topk_weights [T, K] fp32, topk_ids [T, K]): what the executor is handed. Apart from
        `forward` so a decode step split at the executor (`cluster.engine.piecewise_graphs`) routes the same way."""
        logits = self.gate(x)  # [T, E]
        context = current_context()  # the engine's step counts its routing (`cluster.moe.load`)
        step = context.expert_step if context is not None else None
        fused = glue_selector.fused_glue(logits)
        if fused is not None:  # top-k, softmax and the count in one kernel
            if step is None:
                return fused.route(logits, self.top_k)
            return fused.route(logits, self.top_k, step.counts[self.layer], step.weights)
        weights, ids = top_k_route(logits, self.top_k)
        if step is not None:
            step.add(self.layer, ids)
        return weights, ids
