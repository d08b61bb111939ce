"""POST /v1/completions: OpenAI's legacy text completions, a plain prompt continued, as JSON or SSE.

The prompt is the client's text encoded with BOS and no chat template (or token ids, as sent). Each choice's text
keeps the leading space of its first token, which SentencePiece drops when a decode starts there: a completion is
read after its prompt ("Hello" + " world"), and its logprob tokens concatenate to it exactly, with `text_offset`
counting characters from the completion's start.

The request goes through the chat route's plumbing (cluster.api.streaming): body limits, parsing and encoding on
worker threads, the first output read before any response starts (a refusal is an error JSON even when streaming),
and generation aborted whenever the response ends early. `echo`, `suffix` and `best_of` > 1 are refused with a 400
naming the field.
"""

from __future__ import annotations

import codecs
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from cluster.api.backend import GenerationBackend
from cluster.api.body import decode_json, read_body
from cluster.api.errors import APIError, error_response, validation_error
from cluster.api.limits import APILimits
from cluster.api.protocol import (MAX_CHOICES, MAX_MODEL_NAME_CHARS, MAX_STOP_SEQUENCES, Bool, Float, Int,
                                  PromptTokensDetails, StreamOptions, Usage)
from cluster.api.streaming import (GONE, SSE_DONE, EventStream, close_outputs, failed, first_output, output_error,
                                   sse, token_text, unless_disconnected)
from cluster.api.workers import RequestWorkers
from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import (LOGIT_BIAS_RANGE, MAX_CACHE_SALT_CHARS, MAX_LOGIT_BIAS, SamplingDefaults,
                                            SamplingParams)
from cluster.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_LOGPROBS = 5  # OpenAI's bound for the legacy `logprobs` (top alternatives per token)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this route
_MAX_TOKEN_ID_DIGITS = 9
_MIN_TOP_P = 1e-9  # top_p == 0 keeps only the most likely token; the sampler needs a positive mass
_PROMPT_FORMS = "must be a string, a list of one string, or token ids (a list of integers)"
_WORD_START = "\u2581"  # SentencePiece's word-start marker


# -- request -------------------------------------------------------------------------------------------------------
class CompletionRequest(BaseModel):
    """Every optional field also takes an explicit null, meaning its default (the openai SDK sends null for None)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = Field(default=None, max_length=MAX_MODEL_NAME_CHARS)
    prompt: Any = None  # checked below (one error naming every accepted form); None: an empty document, BOS alone
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0, le=2)
    top_p: Float | None = Field(default=None, ge=0, le=1)
    top_k: Int | None = Field(default=None, ge=-1)  # vLLM's: 0 or -1 disables it
    min_p: Float | None = Field(default=None, ge=0, le=1)
    n: Int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    best_of: Int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: Int | None = Field(default=None, ge=-2**63, le=2**63 - 1)
    stream: Bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Bool | None = None
    suffix: str | None = None
    frequency_penalty: Float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: Float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Float] | None = None
    ignore_eos: Bool | None = None
    user: str | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: Any) -> str | list[int]:
        """The one prompt: its text, or its token ids (checked against the vocabulary when encoding)."""
        if prompt is None:  # OpenAI's default is its end-of-text token: a new document
            return ""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return prompt
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise ValueError(f"one prompt per request, got {len(prompt)} (send each as its own request)")
        raise ValueError(_PROMPT_FORMS)

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

    @field_validator("echo")
    @classmethod
    def _check_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise ValueError("not supported: the response holds the completion only (send false or leave it out)")
        return echo

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("not supported: the model completes text at its end only (leave it out)")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, best_of: int | None) -> int | None:
        if best_of is not None and best_of > 1:
            raise ValueError(f"values above 1 are not supported, got {best_of} (send 1 or leave it out; n gives "
                             "several choices)")
        return best_of

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is None:
            return None
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        for key, value in bias.items():
            if not (key.isascii() and key.isdigit() and len(key) <= _MAX_TOKEN_ID_DIGITS):
                raise ValueError(f"logit_bias keys must be token ids as strings (\"1234\"), got {key[:40]!r}")
            if not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
                raise ValueError(f"logit_bias values must be in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}], "
                                 f"got {value:g} for token {key}")
        return bias

    # -- what the fields mean, defaults applied --------------------------------------------------------------------
    @property
    def choices(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    def encode(self, tokenizer: Tokenizer) -> list[int]:
        """The prompt's token ids: text with BOS, or the ids sent; APIError(400) for ids outside the vocabulary."""
        if isinstance(self.prompt, str):
            return tokenizer.encode(self.prompt, bos=True)
        bad = next((t for t in self.prompt if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt holds the token id {bad}, outside the vocabulary (ids 0.."
                                f"{tokenizer.vocab_size - 1})", "prompt")
        return list(self.prompt)

    def logit_bias_pairs(self, vocab_size: int) -> tuple[tuple[int, float], ...]:
        """(token id, bias) sorted by id; APIError(400) for an id outside the vocabulary."""
        pairs = sorted((int(k), v) for k, v in (self.logit_bias or {}).items())
        bad = [i for i, _ in pairs if i >= vocab_size]
        if bad:
            raise APIError(400, f"logit_bias names token {bad[0]}, outside the vocabulary (ids 0..{vocab_size - 1})",
                           "logit_bias")
        return tuple(pairs)

    def to_sampling_params(self, defaults: SamplingDefaults, context_left: int,
                           logit_bias: tuple[tuple[int, float], ...]) -> SamplingParams:
        """The engine's parameters (max_tokens 16 when left out, clipped to the `context_left` after the prompt);
        raises ValueError for values the engine refuses."""
        max_tokens = self.max_tokens or max(1, min(DEFAULT_MAX_TOKENS, context_left))
        temperature = defaults.temperature if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else max(self.top_p, _MIN_TOP_P)
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=max(self.top_k or 0, 0), min_p=self.min_p or 0.0, n=self.choices, seed=self.seed,
                              stop=stop, frequency_penalty=self.frequency_penalty or 0.0,
                              presence_penalty=self.presence_penalty or 0.0, ignore_eos=bool(self.ignore_eos),
                              logprobs=self.logprobs is not None, top_logprobs=self.logprobs or 0,
                              logit_bias=logit_bias, cache_salt=self.cache_salt)


# -- response ------------------------------------------------------------------------------------------------------
class CompletionLogprobs(BaseModel):
    """Legacy logprobs: per token its text, logprob, the top alternatives (text -> logprob, the sampled token among
    them) and where it starts in the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A whole completion, and each streamed chunk of one (the same object, as OpenAI sends it)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# -- the route -----------------------------------------------------------------------------------------------------
class CompletionsAPI:
    def __init__(self, backend: GenerationBackend, tokenizer: Tokenizer, model_name: str, context_len: int,
                 defaults: SamplingDefaults, limits: APILimits, workers: RequestWorkers, fingerprint: str):
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_len = context_len
        self.defaults = defaults
        self.limits = limits
        self.workers = workers
        self.fingerprint = fingerprint

    async def create(self, request: Request) -> Response:
        """POST /v1/completions; every failure is an OpenAI error response."""
        try:
            return await self._create(request)
        except APIError as e:
            return e.response()
        except ClientDisconnect:
            return Response(status_code=GONE)
        except Exception:
            log.exception("text completion failed")
            return error_response(500, "internal error while generating the completion")

    async def _create(self, request: Request) -> Response:
        refusal = self.backend.overloaded()  # before the body is read and encoded: a refusal costs nothing
        if refusal is not None:
            raise APIError(429, refusal)
        raw = await read_body(request, self.limits)
        req, prompt, logit_bias = await self.workers.run(self._prepare, raw)
        try:
            params = req.to_sampling_params(self.defaults, self.context_len - len(prompt), logit_bias)
        except ValueError as e:
            raise APIError(400, str(e)) from e

        completion = _Completion(f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name, self.fingerprint,
                                 len(prompt), req.choices, req.include_usage, self.tokenizer)
        outputs = self.backend.generate(completion.id, prompt, params, stream=bool(req.stream))
        try:
            first = await unless_disconnected(request, _first(outputs))  # a long prefill: the client may leave
        except BaseException:
            await close_outputs(outputs)
            raise
        if first is None:
            await close_outputs(outputs)
            return Response(status_code=GONE)
        if req.stream:
            return EventStream(completion.events(first, outputs))
        response = await unless_disconnected(request, completion.collect(first, outputs))
        return Response(status_code=GONE) if response is None else response

    def _prepare(self, raw: bytes) -> tuple[CompletionRequest, list[int], tuple[tuple[int, float], ...]]:
        """The request, its prompt and logit bias; runs on a worker thread (CPU-bound for large bodies)."""
        body = decode_json(raw)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist: this server serves {self.model_name!r}",
                           "model", "model_not_found")
        return req, req.encode(self.tokenizer), req.logit_bias_pairs(self.tokenizer.vocab_size)


async def _first(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await first_output(outputs)
    except APIError as e:
        raise _for_prompt(e) from None


def _for_prompt(e: APIError) -> APIError:
    """This route's input is `prompt`, not the chat's `messages`."""
    if e.param == "messages":
        e.param = "prompt"
    return e


# -- one request's response ----------------------------------------------------------------------------------------
@dataclass
class _ChoiceState:
    text: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    started: bool = False  # a content token was seen: later text needs no restored space
    chars: int = 0  # characters of the text the logprob tokens so far make up (text_offset of the next one)
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


@dataclass
class _Completion:
    """One request's response, as one JSON body (`collect`) or as SSE events (`events`)."""

    id: str
    created: int
    model: str
    fingerprint: str
    prompt_tokens: int
    n: int
    include_usage: bool
    tokenizer: Tokenizer

    async def collect(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput]) -> Response:
        states = [_ChoiceState() for _ in range(self.n)]
        out: RequestOutput | None = first
        try:
            while out is not None:
                if failed(out):
                    return _for_prompt(output_error(out)).response()
                self._update(states[out.index], out)
                out = await anext(outputs, None)
        finally:
            await close_outputs(outputs)
        if any(s.finish_reason is None for s in states):
            return error_response(500, "the backend ended the request before every choice finished")
        choices = [CompletionChoice(text="".join(s.text), index=i, finish_reason=s.finish_reason,
                                    logprobs=s.logprobs if s.logprobs.tokens else None)
                   for i, s in enumerate(states)]
        return JSONResponse(self._body(choices, self._usage(states)).model_dump())

    async def events(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput]) -> AsyncGenerator[str, None]:
        states = [_ChoiceState() for _ in range(self.n)]
        out: RequestOutput | None = first
        try:
            while out is not None:
                if failed(out):
                    yield sse(_for_prompt(output_error(out)).body())
                    break
                text, lps = self._update(states[out.index], out)
                if text or lps.tokens or out.finished:
                    yield self._chunk([CompletionChoice(text=text, index=out.index, finish_reason=out.finish_reason,
                                                        logprobs=lps if lps.tokens else None)])
                out = await anext(outputs, None)
            else:
                if self.include_usage:
                    yield self._chunk([], self._usage(states))
        except Exception:  # the response has started: the error can only be an event
            log.exception("streaming a text completion failed")
            yield sse(APIError(500, "internal error while generating the completion").body())
        finally:
            await close_outputs(outputs)
        yield SSE_DONE

    def _update(self, state: _ChoiceState, out: RequestOutput) -> tuple[str, CompletionLogprobs]:
        """Adds a delta to its choice; returns its text and logprobs as the client gets them."""
        text = out.text
        content_ids = [t for t in out.token_ids if not self.tokenizer.is_control(t)]
        if not state.started and content_ids:
            state.started = True
            if self.tokenizer.piece(content_ids[0]).startswith(_WORD_START):
                text = " " + text  # the space the detokenizer dropped at the start of its decode
        lps = CompletionLogprobs()
        for token_id, lp in zip(out.token_ids, out.logprobs):
            if self.tokenizer.is_control(token_id):
                continue
            token, raw = token_text(self.tokenizer, token_id)
            top = {token_text(self.tokenizer, t)[0]: v for t, v in lp.top}
            top[token] = lp.logprob
            lps.tokens.append(token)
            lps.token_logprobs.append(lp.logprob)
            lps.top_logprobs.append(top)
            lps.text_offset.append(state.chars)
            state.chars += len(state.utf8.decode(bytes(raw)))
        state.text.append(text)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(state.logprobs, name).extend(getattr(lps, name))
        state.completion_tokens = out.completion_tokens
        state.cached_tokens = out.cached_prompt_tokens
        state.finish_reason = out.finish_reason
        return text, lps

    def _usage(self, states: list[_ChoiceState]) -> Usage:
        # The prompt is counted once, as OpenAI does for n > 1; choice 0 is the one that computed (or reused) it.
        completion = sum(s.completion_tokens for s in states)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=states[0].cached_tokens))

    def _body(self, choices: list[CompletionChoice], usage: Usage | None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint,
                          choices=choices, usage=usage)

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        chunk = self._body(choices, usage)
        # With include_usage every chunk carries "usage" (null until the last one), as OpenAI sends it.
        return f"data: {chunk.model_dump_json(exclude=None if self.include_usage else {'usage'})}\n\n"
