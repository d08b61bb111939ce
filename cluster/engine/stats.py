"""`EngineStats`: what an engine reports about itself between two steps, as `/health` shows it and the metrics
sampler records it. A record taken on the thread that steps (`LLMEngine.stats`), immutable once taken."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences holding KV blocks and stepping
    waiting: int  # sequences queued, including choices 1..n-1 held back until choice 0 has its prompt's KV
    free_blocks: int
    total_blocks: int
    preemptions: int  # since the engine started
    prefix_hit_tokens: int  # prompt tokens found in the prefix cache, since the engine started
    prefix_query_tokens: int  # prompt tokens looked up in it
    prefix_collisions: int  # lookups whose hash matched a block holding other tokens
    attention_kernel: str  # the attention backend's name

    def as_dict(self) -> dict[str, int | str]:
        """The record as `/health`'s `stats` object shows it (one key per field)."""
        return dataclasses.asdict(self)
