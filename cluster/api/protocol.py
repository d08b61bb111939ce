"""OpenAI chat-completions request and response models, with OpenAI's ranges; unknown request fields are ignored.

A request that validates is one the chat template can encode: every field has a fixed shape (no free-form JSON
reaches the tokenizer), roles carry the fields they need, and lists stop at their first bad item (`fail_fast`), so a
body of a million bad items costs one error, not a million.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer, model_validator

from cluster.engine.sampling_params import MAX_CACHE_SALT_CHARS, MAX_TOP_LOGPROBS, SamplingDefaults, SamplingParams

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 128
MAX_MODEL_NAME_CHARS = 256
# top_p == 0 (allowed by OpenAI) keeps only the most likely token; the sampler needs a positive mass.
_MIN_TOP_P = 1e-9


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # 1e400 parses as inf: not a number we take


# -- request -------------------------------------------------------------------------------------------------------
class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(fail_fast=True)] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(fail_fast=True)] | None = None

    @model_validator(mode="after")
    def _check_role_fields(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def to_tokenizer(self) -> dict[str, Any]:
        """The OpenAI-style dict `Tokenizer.encode_chat` takes."""
        return self.model_dump(exclude_none=True)


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model: str | None = Field(default=None, max_length=MAX_MODEL_NAME_CHARS)
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: int | None = Field(default=None, ge=1)  # deprecated by OpenAI: max_completion_tokens wins
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | Annotated[list[str], Field(fail_fast=True)] | None = None
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)  # None: a fresh random seed
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    user: str | None = None
    # vLLM's name: a request reuses cached prompt blocks only of requests with the same salt
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if not all(stops):
            raise ValueError("stop sequences must not be empty strings")
        return stop

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("logprobs must be true when top_logprobs is set")
        return top

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def to_sampling_params(self, defaults: SamplingDefaults, context_left: int) -> SamplingParams:
        """The engine's parameters, `defaults` for those left out (max_tokens clipped to the `context_left` after
        the prompt); raises ValueError for values the engine refuses."""
        default_max_tokens = max(1, min(defaults.max_tokens, context_left))
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        temperature = defaults.temperature if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else max(self.top_p, _MIN_TOP_P)
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=self.n,
                              seed=self.seed, stop=self.stop_sequences, frequency_penalty=self.frequency_penalty,
                              presence_penalty=self.presence_penalty, logprobs=self.logprobs,
                              top_logprobs=self.top_logprobs or 0, cache_salt=self.cache_salt)


# -- responses -----------------------------------------------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:  # a delta carries only what changed
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-cluster"
    context_length: int  # OpenRouter's name
    max_model_len: int  # vLLM's name


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
