"""What the engine hands back: per-step deltas of each choice, and the errors a request can be refused with."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.engine.sampler import TokenLogprobs


class RequestError(ValueError):
    """A request the engine refuses before scheduling it (bad input, too long, can never fit)."""


class ContextLengthError(RequestError):
    pass


@dataclass
class RequestOutput:
    """New text and tokens of one choice since its last output; `finish_reason` is set on its last one."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
