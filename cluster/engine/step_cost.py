"""What a prefill chunk costs a step, so that the scheduler bounds a step's time rather than its token count.

A token's weight matmuls cost the same wherever it sits; its attention grows with the context before it. Both are
counted in one unit, the FLOPs of one token's weight matmuls: each token of a chunk after c cached tokens costs
1 + c / break_even, where `break_even` is the context at which a token's attention (QK and PV, 4 * H * Dh FLOPs per
key) matches its weights (2 FLOPs per active parameter). A chunk 30K tokens into a prompt costs ~9x one at its start
on the embedded mini model (break_even ~3.7K) and ~1.6x on Mixtral 8x7B (~48K): under a plain token budget the
first stalls a step for seconds on a CPU."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.config import ModelConfig


def weight_flops_per_token(config: ModelConfig) -> int:
    """One token's matmul FLOPs in one decoder layer, outside attention's QK and PV (2 per active weight)."""
    h = config.hidden_size
    projections = h * (config.q_size + 2 * config.kv_size) + config.q_size * h
    if config.is_moe:
        ffn = config.experts_per_token * 3 * h * config.intermediate_size + h * config.num_experts  # + the router
    else:
        ffn = 3 * h * config.intermediate_size
    return 2 * (projections + ffn)


def attention_flops_per_key(config: ModelConfig) -> int:
    """One query token's attention FLOPs per cached key in one decoder layer: QK and PV over every head."""
    return 4 * config.num_heads * config.head_dim


@dataclass(frozen=True)
class StepCost:
    break_even: float  # context (tokens) at which a token's attention costs as much as its weight matmuls

    @classmethod
    def for_model(cls, config: ModelConfig) -> StepCost:
        return cls(weight_flops_per_token(config) / attention_flops_per_key(config))

    def per_token(self, context: int) -> float:
        return 1.0 + context / self.break_even

    def of_chunk(self, context: int, n: int) -> float:
        """The cost of n tokens after `context` cached ones (their attention to each other is left out: for a
        fresh prompt the cost is its token count)."""
        return n * self.per_token(context)

    def chunk_within(self, context: int, budget: float) -> int:
        """The most tokens a chunk after `context` cached ones may take at a cost of at most `budget`."""
        return max(0, math.floor(budget / self.per_token(context)))
