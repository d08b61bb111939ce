"""The state of one generated sequence (one choice of a request) as the scheduler and engine see it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from cluster.engine.outputs import TokenLogprobs
from cluster.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens = prompt + outputs; `num_computed` of them have KV in the cache. The scheduler's one rule is to let
    `num_computed` catch up with `num_tokens`, a chunk at a time; a sequence samples when it has caught up."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n choices
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    # Tokens sampled on the device whose values the host has not read yet (0 or 1): a step scheduled ahead of the
    # last one's outputs (`EngineConfig.async_scheduling`) feeds this sequence its pending token on the device.
    pending: int = 0
    num_computed: int = 0
    num_cached_prompt: int = 0  # prompt tokens found in the prefix cache at the last admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks (a memo, salted)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None  # time.monotonic() when it was first scheduled (left the waiting queue)
    # The prompt's scores when this choice computes them (choice 0 of a request with `params.prompt_logprobs`): one
    # entry per prompt token scored so far, None for the first token, which nothing predicts. Else None.
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_slice(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list."""
        p = len(self.prompt)
        if end <= p:
            return self.prompt[start:end]
        if start >= p:
            return self.output[start - p:end - p]
        return self.prompt[start:] + self.output[:end - p]

    @property
    def num_tokens(self) -> int:
        """Every token, the pending ones included (what the scheduler brings `num_computed` level with)."""
        return len(self.prompt) + len(self.output) + self.pending

    @property
    def num_known(self) -> int:
        """The tokens the host holds: `tokens` (the prompt and the outputs read back)."""
        return len(self.prompt) + len(self.output)

    def ends_by_length(self, context_len: int) -> bool:
        """Whether the token pending now ends the output by its length (max_tokens or the context), so that no step
        computes past it. False while no token is pending."""
        return bool(self.pending) and (len(self.output) + self.pending >= self.params.max_tokens
                                       or self.num_tokens >= context_len)

    @property
    def scores_prompt(self) -> bool:
        """Logits of its prompt positions are still wanted (to score the prompt tokens after them)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
