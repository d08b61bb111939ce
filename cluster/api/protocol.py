"""OpenAI chat-completions request and response models, with OpenAI's ranges. `SamplingRequest` holds the fields the
chat and text-completions requests share (completions.py has the latter).

No field is ignored silently. A request's own fields are OpenAI's, and vLLM's extensions that clients use; an unknown
one is a 400 naming it ("Unrecognized request argument supplied", as OpenAI answers). Fields OpenAI defines that
mean nothing to this server (`store`, `metadata`, ...) are taken without effect; those that would change the output
and are not implemented (`audio`, `prediction`, ...) are a 400 naming them unless null (`_REFUSED`). Inside the
request's objects (messages, tools) unknown keys are ignored: clients send back the assistant messages they got,
with keys such as `refusal` and `annotations`.

A request that validates is one the chat template can encode: fields have fixed shapes (the only free-form JSON is a
tool's parameters and a response_format's schema: JSON schemas, which grammars.py bounds before it compiles them),
roles carry the fields they need, and lists stop at their first bad item (`fail_fast`), so a body of a million bad
items costs one error, not a million. Integers and booleans are strict, and every optional field takes an explicit
null for its default, as the openai SDK sends them.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, ValidationError, ValidationInfo,
                      field_validator, model_serializer, model_validator)
from typing_extensions import Self

from cluster.api.errors import APIError
from cluster.api.grammars import MAX_TOOLS
from cluster.engine.sampling_params import (LOGIT_BIAS_RANGE, MAX_CACHE_SALT_CHARS, MAX_LOGIT_BIAS,
                                            MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS, SamplingDefaults, SamplingParams)

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 128
MAX_MODEL_NAME_CHARS = 256
MAX_TOOL_ID_CHARS = 256
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names
_MAX_TOKEN_ID_DIGITS = 9
MAX_NAMED = 5  # of several bad keys or values of one field, the first ones a message names
MAX_METADATA = 16  # OpenAI's bounds on `metadata`: 16 pairs, keys of 64 characters, values of 512
MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 64, 512
# top_p == 0 (allowed by OpenAI) keeps only the most likely token; the sampler needs a positive mass.
_MIN_TOP_P = 1e-9


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # 1e400 parses as inf: not a number we take


# "5" and 5.0 are not 5, 1 is not true; floats take integers (JSON's 1 is a number) but not strings.
Int = StrictInt
Bool = StrictBool
Float = Annotated[float, Strict()]


# -- request -------------------------------------------------------------------------------------------------------
class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: str = Field(min_length=1, max_length=MAX_TOOL_ID_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Checked even when left out (validate_default): a missing content is named as messages[i].content.
    content: str | Annotated[list[TextPart], Field(fail_fast=True)] | None = Field(default=None,
                                                                                    validate_default=True)
    name: str | None = None
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=MAX_TOOL_ID_CHARS)
    tool_calls: Annotated[list[ToolCall], Field(fail_fast=True)] | None = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, content: str | list[TextPart] | None, info: ValidationInfo) -> str | list[TextPart] | None:
        role = info.data.get("role")
        if content is None and role not in ("assistant", None):
            raise ValueError(f"a {role} message needs content (a string or a list of text parts), got null")
        return content

    @model_validator(mode="after")
    def _check_role_fields(self) -> "ChatMessage":
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self

    def to_tokenizer(self, tool_id: Callable[[str], str]) -> dict[str, Any]:
        """The OpenAI-style dict `Tokenizer.encode_chat` takes: the developer role is a system message (the
        templates have no other place for it), and client tool-call ids become the model's (`tool_id`)."""
        message = self.model_dump(exclude_none=True)
        if self.role == "developer":
            message["role"] = "system"
        if self.tool_call_id is not None:
            message["tool_call_id"] = tool_id(self.tool_call_id)
        for call in message.get("tool_calls", []):
            call["id"] = tool_id(call["id"])
        return message


class FunctionDefinition(_Request):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: Bool | None = None


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's tool dict, as mistral-common and the tool-call grammar take it."""
        function: dict[str, Any] = {"name": self.function.name,
                                    "parameters": self.function.parameters or {"type": "object", "properties": {}}}
        if self.function.description is not None:
            function["description"] = self.function.description
        return {"type": "function", "function": function}


_TOOL_CHOICE_FORMS = 'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'


class JSONSchemaFormat(_Request):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: Bool | None = None


class TextFormat(_Request):
    type: Literal["text"]


class JSONObjectFormat(_Request):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaResponseFormat, Field(discriminator="type")]


class StreamOptions(_Request):
    model_config = ConfigDict(extra="forbid")  # an option left unread would be ignored silently

    include_usage: Bool | None = None
    continuous_usage_stats: Bool | None = None  # vLLM's: every chunk carries the usage so far
    include_obfuscation: Bool | None = None  # OpenAI's padding of chunks; taken without effect (none is added)


class PromptCacheOptions(_Request):
    """OpenAI's prompt-cache options, taken without effect: the prefix cache here works on its own."""

    mode: Literal["implicit", "explicit"] | None = None
    ttl: str | None = Field(default=None, max_length=64)


# Fields OpenAI or vLLM define that would change the output, and that this server does not implement: a 400 naming
# the field unless it is null (or the one value that asks for nothing, where one exists: `_NOTHING_ASKED`).
_REFUSED = {
    "return_token_ids": "token ids are not returned (send false or leave it out)",
    "prompt_logprobs": "prompt logprobs are not returned (leave it out)",
    "audio": "this model writes text only (leave it out)",
    "prediction": "predicted outputs are not supported (leave it out)",
    "functions": "the legacy functions are not supported: send them as tools",
    "function_call": "the legacy function_call is not supported: send tool_choice",
    "web_search_options": "this server does not search the web (leave it out)",
    "moderation": "this server does not run moderation (leave it out)",
    "reasoning_effort": "this model does not reason (send \"none\" or leave it out)",
    "verbosity": "this model answers at one verbosity, \"medium\" (send that or leave it out)",
}
_NOTHING_ASKED = {"return_token_ids": False, "reasoning_effort": "none", "verbosity": "medium"}


def _refuse_unless_null(value: Any, info: ValidationInfo) -> Any:
    if value is not None and value != _NOTHING_ASKED.get(info.field_name, None):
        raise ValueError(f"not supported: {_REFUSED[info.field_name]}")
    return value


class SamplingRequest(_Request):
    """The fields and checks both generation requests share: the model, sampling, stopping, streaming, accounting.
    Every optional field also takes an explicit null, meaning its default (the openai SDK sends null for None).

    Pydantic validates these fields before a subclass's own; `from_body` names bad fields in the subclass's
    `FIELD_ORDER` instead (OpenAI's order: the request's input, e.g. messages, right after model)."""

    FIELD_ORDER: ClassVar[tuple[str, ...]]  # every field of the request, in the order its errors name them

    model: str | None = Field(default=None, max_length=MAX_MODEL_NAME_CHARS)
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0, le=2)
    top_p: Float | None = Field(default=None, ge=0, le=1)
    top_k: Int | None = Field(default=None, ge=-1)  # vLLM's: 0 or -1 disables it
    min_p: Float | None = Field(default=None, ge=0, le=1)
    n: Int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stop: str | Annotated[list[str], Field(fail_fast=True)] | None = None
    seed: Int | None = Field(default=None, ge=-2**63, le=2**63 - 1)  # None: a fresh random seed
    stream: Bool | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: Float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: Float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Float] | None = None
    ignore_eos: Bool | None = None
    user: str | None = None  # taken without effect
    # vLLM's name: a request reuses cached prompt blocks only of requests with the same salt
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    # vLLM's: EOS and stop_token_ids cannot end the output, nor stop strings stop it, before this many tokens
    min_tokens: Int | None = Field(default=None, ge=0)
    # vLLM's: tokens that end the output (left out of the content, counted in completion_tokens)
    stop_token_ids: Annotated[list[Annotated[int, Strict(), Field(ge=0)]],
                              Field(max_length=MAX_STOP_TOKEN_IDS, fail_fast=True)] | None = None
    return_token_ids: Bool | None = None  # vLLM's: refused (_REFUSED)
    prompt_logprobs: Any = None  # vLLM's: refused (_REFUSED)

    _check_refused = field_validator("return_token_ids", "prompt_logprobs")(_refuse_unless_null)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if not all(stops):
            raise ValueError("stop sequences must not be empty strings")
        return stop

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        """Every bad key and value is named (the first few of them), so a client fixes them in one round."""
        if bias is None:
            return None
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        bad_keys = [k for k in bias if not (k.isascii() and k.isdigit() and len(k) <= _MAX_TOKEN_ID_DIGITS)]
        bad_values = [f"{v:g} for token {k}" for k, v in bias.items()
                      if k not in bad_keys and not -LOGIT_BIAS_RANGE <= v <= LOGIT_BIAS_RANGE]
        problems = []
        if bad_keys:
            problems.append(f"logit_bias keys must be token ids as strings (\"1234\"), got "
                            f"{named_few([repr(k[:40]) for k in bad_keys])}")
        if bad_values:
            problems.append(f"logit_bias values must be in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}], got "
                            f"{named_few(bad_values)}")
        if problems:
            raise ValueError("; ".join(problems))
        return bias

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if set(cls.FIELD_ORDER) != set(cls.model_fields) or len(cls.FIELD_ORDER) != len(cls.model_fields):
            raise TypeError(f"{cls.__name__}.FIELD_ORDER must name each of its fields once")

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Self:
        """The request a JSON body sends; ValidationError with its errors in `FIELD_ORDER`, APIError(400) naming
        its unknown fields (before anything else is checked, as OpenAI answers)."""
        unknown = [key for key in body if key not in cls.model_fields]
        if unknown:
            names = [repr(key[:64]) for key in unknown]
            raise APIError(400, f"Unrecognized request argument supplied: {named_few(names)}", unknown[0][:64])
        try:
            return cls.model_validate(body)
        except ValidationError as e:
            rank = {name: i for i, name in enumerate(cls.FIELD_ORDER)}
            errors = e.errors()
            ordered = sorted(errors, key=lambda err: rank.get(err["loc"][0], -1) if err["loc"] else -1)  # stable
            if ordered == errors:
                raise
            raise ValidationError.from_exception_data(e.title, [_line_error(err) for err in ordered]) from None

    # -- what the fields mean, defaults applied --------------------------------------------------------------------
    @property
    def choices(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        """The stream ends with a usage chunk (also asked for by continuous_usage_stats, which needs it)."""
        return self.stream_options is not None and bool(self.stream_options.include_usage
                                                        or self.stream_options.continuous_usage_stats)

    @property
    def continuous_usage(self) -> bool:
        """Every chunk of the stream carries the usage so far (vLLM's continuous_usage_stats)."""
        return self.stream_options is not None and bool(self.stream_options.continuous_usage_stats)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logit_bias_pairs(self, vocab_size: int) -> tuple[tuple[int, float], ...]:
        """(token id, bias) sorted by id; ValueError naming the ids outside the vocabulary."""
        pairs = sorted((int(k), v) for k, v in (self.logit_bias or {}).items())
        bad = [str(i) for i, _ in pairs if i >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias names token{'s' if len(bad) > 1 else ''} {named_few(bad)}, outside the "
                             f"vocabulary (ids 0..{vocab_size - 1})")
        return tuple(pairs)

    @property
    def stop_token_set(self) -> tuple[int, ...]:
        """stop_token_ids once each, in order."""
        return tuple(dict.fromkeys(self.stop_token_ids or ()))

    def check_stop_token_ids(self, vocab_size: int) -> None:
        """ValueError naming the stop_token_ids outside the vocabulary."""
        bad = [str(i) for i in self.stop_token_set if i >= vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids names token{'s' if len(bad) > 1 else ''} {named_few(bad)}, outside "
                             f"the vocabulary (ids 0..{vocab_size - 1})")

    def to_sampling_params(self, defaults: SamplingDefaults, context_left: int, grammar: str | None = None,
                           logit_bias: tuple[tuple[int, float], ...] = ()) -> SamplingParams:
        """The engine's parameters, `defaults` for those left out (max_tokens clipped to the `context_left` after
        the prompt); raises ValueError for values the engine refuses, APIError(400) for a min_tokens above
        max_tokens. Each request says its own defaults."""
        raise NotImplementedError

    def _sampling_params(self, defaults: SamplingDefaults, context_left: int, default_max_tokens: int,
                         logprobs: bool, top_logprobs: int, grammar: str | None,
                         logit_bias: tuple[tuple[int, float], ...]) -> SamplingParams:
        """`to_sampling_params` given the route's max_tokens default and its logprobs fields."""
        max_tokens = self.requested_max_tokens or max(1, min(default_max_tokens, context_left))
        min_tokens = self.min_tokens or 0
        if min_tokens > max_tokens:
            said = "" if self.requested_max_tokens else " (its default here: the context the prompt leaves, at most " \
                                                        f"{default_max_tokens})"
            raise APIError(400, f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens}){said}",
                           "min_tokens")
        temperature = defaults.temperature if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else max(self.top_p, _MIN_TOP_P)
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=max(self.top_k or 0, 0), min_p=self.min_p or 0.0, n=self.choices,
                              seed=self.seed, stop=self.stop_sequences, stop_token_ids=self.stop_token_set,
                              min_tokens=min_tokens, frequency_penalty=self.frequency_penalty or 0.0,
                              presence_penalty=self.presence_penalty or 0.0, ignore_eos=bool(self.ignore_eos),
                              logprobs=logprobs, top_logprobs=top_logprobs,
                              logit_bias=logit_bias, grammar=grammar, cache_salt=self.cache_salt)


class ChatCompletionRequest(SamplingRequest):
    FIELD_ORDER = ("model", "messages", "max_tokens", "max_completion_tokens", "min_tokens", "temperature", "top_p",
                   "top_k", "min_p", "n", "stop", "stop_token_ids", "seed", "stream", "stream_options",
                   "frequency_penalty", "presence_penalty", "logit_bias", "ignore_eos", "logprobs", "top_logprobs",
                   "tools", "tool_choice", "parallel_tool_calls", "response_format", "user", "cache_salt",
                   "store", "metadata", "service_tier", "prompt_cache_key", "prompt_cache_retention",
                   "prompt_cache_options", "safety_identifier", "modalities", "verbosity", "reasoning_effort",
                   "audio", "prediction", "functions", "function_call", "web_search_options", "moderation",
                   "return_token_ids", "prompt_logprobs")

    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_completion_tokens: Int | None = Field(default=None, ge=1)  # OpenAI's name, which wins over max_tokens
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS, fail_fast=True)] | None = None
    tool_choice: Any = None  # checked below, so a bad one gets one error that names every form
    parallel_tool_calls: Bool | None = None
    response_format: ResponseFormat | None = None
    # OpenAI's, taken without effect: nothing is stored, tiers and cache keys mean nothing to one model's server
    store: Bool | None = None
    metadata: dict[Annotated[str, Field(max_length=MAX_METADATA_KEY_CHARS)],
                   Annotated[str, Field(max_length=MAX_METADATA_VALUE_CHARS)]] | None = None
    service_tier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = Field(default=None, max_length=64)
    prompt_cache_options: PromptCacheOptions | None = None
    safety_identifier: str | None = None
    modalities: Annotated[list[str], Field(max_length=2, fail_fast=True)] | None = None  # ["text"] only
    # OpenAI's, refused unless null or the value asking for nothing (_REFUSED)
    verbosity: str | None = None
    reasoning_effort: str | None = None
    audio: Any = None
    prediction: Any = None
    functions: Any = None
    function_call: Any = None
    web_search_options: Any = None
    moderation: Any = None

    _check_chat_refused = field_validator("verbosity", "reasoning_effort", "audio", "prediction", "functions",
                                          "function_call", "web_search_options", "moderation")(_refuse_unless_null)

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is not None and len(metadata) > MAX_METADATA:
            raise ValueError(f"metadata may hold at most {MAX_METADATA} pairs, got {len(metadata)}")
        return metadata

    @field_validator("modalities")
    @classmethod
    def _check_modalities(cls, modalities: list[str] | None) -> list[str] | None:
        if modalities is not None and any(m != "text" for m in modalities):
            raise ValueError("not supported: this model writes text only (send [\"text\"] or leave it out)")
        return modalities

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("logprobs must be true when top_logprobs is set")
        return top

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, choice: Any, info: ValidationInfo) -> str | None:
        """None (left out), "none", "auto", "required", or the name of the function the model must call. Any of
        them needs tools, as OpenAI rules."""
        if choice is None or choice in ("none", "auto", "required"):
            named = None
        elif (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
              and isinstance(choice["function"].get("name"), str)):
            named = choice["function"]["name"]
        else:
            raise ValueError(_TOOL_CHOICE_FORMS)
        if "tools" not in info.data:  # the tools were refused: their error says enough
            return named if named is not None else choice
        tools = info.data["tools"] or []
        if choice is not None and not tools:
            raise ValueError("tool_choice is only allowed when tools are given (leave it out)")
        if named is not None and named not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names the function {named[:64]!r}, which is not in tools")
        return named if named is not None else choice

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, tools: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        if tools is not None and not tools:
            raise ValueError("tools must hold at least one tool (leave it out for none)")
        names = [t.function.name for t in tools or []]
        if len(set(names)) < len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"tools must have distinct function names: {dup!r} appears more than once")
        return tools

    # -- what the fields mean, defaults applied --------------------------------------------------------------------
    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens  # max_tokens is deprecated by OpenAI

    @property
    def tool_mode(self) -> str:
        """How the model may call tools: "none" (tools left out of the prompt), "auto", "required" or "named"."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice in (None, "auto", "required"):
            return self.tool_choice or "auto"
        return "named"

    @property
    def named_tool(self) -> str | None:
        return self.tool_choice if self.tool_mode == "named" else None

    @property
    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools the prompt offers (none for tool_choice "none")."""
        return [] if self.tool_mode == "none" else [t.to_dict() for t in self.tools or []]

    def to_sampling_params(self, defaults: SamplingDefaults, context_left: int, grammar: str | None = None,
                           logit_bias: tuple[tuple[int, float], ...] = ()) -> SamplingParams:
        """The engine's parameters, `defaults` for those left out (max_tokens clipped to the `context_left` after
        the prompt); raises ValueError for values the engine refuses."""
        return self._sampling_params(defaults, context_left, defaults.max_tokens, bool(self.logprobs),
                                     self.top_logprobs or 0, grammar, logit_bias)


def _line_error(err: Any) -> Any:
    """One error of `ValidationError.errors()` as `ValidationError.from_exception_data` takes it."""
    return {"type": err["type"], "loc": err["loc"], "input": err["input"]} | ({"ctx": err["ctx"]} if "ctx" in err
                                                                               else {})


def named_few(names: list[str]) -> str:
    """'a, b, c' for a message, the first MAX_NAMED of `names` and "and N more" for the rest."""
    shown = ", ".join(names[:MAX_NAMED])
    return shown if len(names) <= MAX_NAMED else f"{shown} and {len(names) - MAX_NAMED} more"


# -- responses -----------------------------------------------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None  # this server never refuses


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text of the arguments object


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler: Any) -> dict[str, Any]:  # OpenAI leaves tool_calls out when there are none
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


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
    remaining_credits: str | None = None  # a keyed stream's final usage: dollars left after its settle

    @model_serializer(mode="wrap")
    def _drop_no_credits(self, handler: Any) -> dict[str, Any]:  # left out unless a ledger set it
        out = handler(self)
        if out.get("remaining_credits") is None:
            out.pop("remaining_credits", None)
        return out


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class _Sparse(BaseModel):
    """A delta part: carries only what changed (fields left None are left out)."""

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionCallDelta(_Sparse):
    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaOut(_Sparse):
    """OpenAI's streamed tool call: the first delta of a call has its id, type and name; later ones add arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class DeltaMessage(_Sparse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None


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
    system_fingerprint: str
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
