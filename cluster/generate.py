"""Greedy generation of one sequence straight on the model (no engine): the whole path in a few lines."""

from __future__ import annotations

from typing import Iterator

import torch

from cluster.model.decoder import CausalLM
from cluster.model.kv_cache import ContiguousKVCache


def greedy_generate(model: CausalLM, prompt: list[int], max_tokens: int, stop_ids: set[int] = frozenset()
                    ) -> Iterator[int]:
    """Yields up to `max_tokens` argmax tokens, stopping after the first one in `stop_ids`."""
    c = model.config
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    total = len(prompt) + max_tokens
    if total > c.max_position_embeddings:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) = {total} exceeds the model's "
                         f"context of {c.max_position_embeddings} tokens")
    device = model.lm_head.weight.device
    cache = ContiguousKVCache(c.num_layers, 1, total, c.num_kv_heads, c.head_dim, model.lm_head.weight.dtype, device)
    tokens = torch.tensor(prompt, device=device)
    for _ in range(max_tokens):
        positions = cache.begin_step([0], [len(tokens)])
        hidden = model(tokens, positions, cache)
        token = int(model.compute_logits(hidden[-1:]).argmax(-1))
        yield token
        if token in stop_ids:
            return
        tokens = torch.tensor([token], device=device)
