"""What the engine hands back: per-step deltas of each choice, and the errors a request can be refused with."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprobs:
    logprob: float  # of the chosen token
    top: list[tuple[int, float]]  # top_logprobs (token id, logprob), best first


class Refusal(Exception):
    """A request turned away before it is scheduled; `status` is the HTTP status that tells the client why."""

    status: int
    code: str | None = None  # OpenAI's error code, where it has one


class RequestError(Refusal, ValueError):
    """Refused for what it asks (bad input, too long, can never fit): the same request will always be refused."""

    status = 400


class OverloadedError(Refusal):
    """Refused because the engine's waiting room is full: the same request may be admitted later."""

    status = 429


def error_status(e: Exception) -> int:
    """The HTTP status of an exception a request ended with: a refusal's own, 400 for other bad values, else 500."""
    return e.status if isinstance(e, Refusal) else 400 if isinstance(e, ValueError) else 500


class ContextLengthError(RequestError):
    code = "context_length_exceeded"


def error_code(e: Exception) -> str | None:
    return e.code if isinstance(e, Refusal) else None


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
    error_status: int = 500  # the HTTP status it maps to: 400 refused input, 429 overloaded, 503 unavailable, 500 fault
    error_code: str | None = None  # OpenAI's code for the error, e.g. "context_length_exceeded"
    scheduled_at: float | None = None  # on a finished choice: its first step, time.monotonic() in the engine's process
    # On a choice's last output, the token that ended it (EOS or one of stop_token_ids) and its logprobs: counted in
    # completion_tokens but not in token_ids, whose texts make up the content
    stop_token: int | None = None
    stop_token_logprobs: TokenLogprobs | None = None
    # On a choice's first output when the request scores its prompt (`SamplingParams.prompt_logprobs`): one entry
    # per prompt token, None for the first (nothing predicts it). The same list for every choice of the request.
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def failed(self) -> bool:
        """It ends its choice without an answer: an error, or an abort."""
        return self.error is not None or self.finish_reason in ("error", "abort")

    @classmethod
    def errors(cls, request_id: str, n: int, message: str, status: int,
               code: str | None = None) -> list["RequestOutput"]:
        """What a refused request yields: one finished error per choice."""
        return [cls(request_id, i, "", [], finish_reason="error", error=message, error_status=status,
                    error_code=code) for i in range(n)]

    @classmethod
    def refused(cls, request_id: str, n: int, e: Exception) -> list["RequestOutput"]:
        """The errors of a request refused with exception `e` (its status and code)."""
        return cls.errors(request_id, n, str(e), error_status(e), error_code(e))

    def merged(self, later: "RequestOutput") -> "RequestOutput":
        """This delta followed by a `later` one of the same choice, as one delta."""
        return RequestOutput(self.request_id, self.index, self.text + later.text, self.token_ids + later.token_ids,
                             self.logprobs + later.logprobs, later.finish_reason, later.prompt_tokens,
                             later.completion_tokens, later.cached_prompt_tokens, later.error, later.error_status,
                             later.error_code, later.scheduled_at, later.stop_token, later.stop_token_logprobs,
                             self.prompt_logprobs or later.prompt_logprobs)
