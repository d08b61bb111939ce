"""POST /v1/completions: OpenAI's legacy text completions, a plain prompt continued, as JSON or SSE.

The prompt is the client's text encoded with BOS and no chat template (or token ids, as sent). Each choice's text
keeps the leading space of its first token, which SentencePiece drops when a decode starts there: a completion is
read after its prompt ("Hello" + " world"), and its logprob tokens concatenate to it exactly, with `text_offset`
counting characters from the completion's start.

The request takes the chat route's way (`serve_generation` in cluster.api.streaming): body limits, parsing and
encoding on worker threads, the ledger's reserve and settle, the first output read before any response starts (a
refusal is an error JSON even when streaming), and generation aborted whenever the response ends early. Its fields
are the chat request's sampling ones (`SamplingRequest`) and its own; `echo`, `suffix` and `best_of` > 1 are
refused with a 400 naming the field.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator
from starlette.requests import Request
from starlette.responses import Response

from cluster.api.accounts import Charge
from cluster.api.errors import APIError
from cluster.api.protocol import Bool, Int, SamplingRequest, Usage
from cluster.api.streaming import (ChoiceState, CompletionResponse, GenerationRoute, Prepared, checked_logit_bias,
                                   parse_request, serve_generation, token_text)
from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingDefaults, SamplingParams
from cluster.tokenizer import Tokenizer

MAX_LOGPROBS = 5  # OpenAI's bound for the legacy `logprobs` (top alternatives per token)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this route
_PROMPT_FORMS = "must be a string, a list of one string, or token ids (a list of integers)"
_WORD_START = "\u2581"  # SentencePiece's word-start marker


# -- request -------------------------------------------------------------------------------------------------------
class CompletionRequest(SamplingRequest):
    FIELD_ORDER = ("model", "prompt", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "n",
                   "best_of", "stop", "stop_token_ids", "seed", "stream", "stream_options", "logprobs", "echo", "suffix",
                   "frequency_penalty", "presence_penalty", "logit_bias", "ignore_eos", "user", "cache_salt",
                   "return_token_ids", "prompt_logprobs")

    # None: an empty document, BOS alone; checked below (one error naming every accepted form), also when left out
    prompt: Any = Field(default=None, validate_default=True)
    best_of: Int | None = Field(default=None, ge=1)
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Bool | None = None
    suffix: str | None = None

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

    def encode(self, tokenizer: Tokenizer) -> list[int]:
        """The prompt's token ids: text with BOS, or the ids sent; APIError(400) for ids outside the vocabulary."""
        if isinstance(self.prompt, str):
            return tokenizer.encode(self.prompt, bos=True)
        bad = next((t for t in self.prompt if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt holds the token id {bad}, outside the vocabulary (ids 0.."
                                f"{tokenizer.vocab_size - 1})", "prompt")
        return list(self.prompt)

    def to_sampling_params(self, defaults: SamplingDefaults, context_left: int, grammar: str | None = None,
                           logit_bias: tuple[tuple[int, float], ...] = ()) -> SamplingParams:
        """The engine's parameters (max_tokens 16 when left out, clipped to the `context_left` after the prompt);
        raises ValueError for values the engine refuses."""
        return self._sampling_params(defaults, context_left, DEFAULT_MAX_TOKENS, self.logprobs is not None,
                                     self.logprobs or 0, grammar, logit_bias)


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
class CompletionsAPI(GenerationRoute[CompletionRequest]):
    """POST /v1/completions, served by `serve_generation`."""

    what = "text completion"
    id_prefix = "cmpl"
    input_param = "prompt"

    async def create(self, request: Request) -> Response:
        """POST /v1/completions; every failure is an OpenAI error response."""
        return await serve_generation(request, self)

    def prepare(self, raw: bytes) -> Prepared[CompletionRequest]:
        """The request, its prompt and logit bias; runs on a worker thread (CPU-bound for large bodies)."""
        req = parse_request(raw, CompletionRequest, self.model_name)
        prompt = req.encode(self.tokenizer)
        return Prepared(req, prompt, checked_logit_bias(req, self.tokenizer.vocab_size))

    def respond(self, p: Prepared[CompletionRequest], request_id: str, charge: Charge) -> _Completion:
        return _Completion(request_id, int(time.time()), self.model_name, self.fingerprint, len(p.prompt),
                           p.req.choices, p.req.include_usage, self.tokenizer, charge)


# -- one request's response ----------------------------------------------------------------------------------------
@dataclass
class _ChoiceState(ChoiceState):
    text: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)
    started: bool = False  # a content token was seen: later text needs no restored space
    chars: int = 0  # characters of the text the logprob tokens so far make up (text_offset of the next one)
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


@dataclass
class _Completion(CompletionResponse[_ChoiceState, tuple[str, CompletionLogprobs]]):
    """One request's response: each choice's text and legacy logprobs."""

    what: ClassVar[str] = "text completion"
    input_param: ClassVar[str] = "prompt"
    chunk_type: ClassVar[type[BaseModel]] = Completion

    def _state(self) -> _ChoiceState:
        return _ChoiceState()

    def _completion(self, states: list[_ChoiceState], usage: Usage) -> Completion:
        choices = [CompletionChoice(text="".join(s.text), index=i, finish_reason=s.finish_reason,
                                    logprobs=s.logprobs if s.logprobs.tokens else None)
                   for i, s in enumerate(states)]
        return Completion(id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint,
                          choices=choices, usage=usage)

    def _streamed(self, state: _ChoiceState, delta: tuple[str, CompletionLogprobs],
                  out: RequestOutput) -> CompletionChoice | None:
        text, lps = delta
        if not (text or lps.tokens or out.finished):
            return None
        return CompletionChoice(text=text, index=out.index, finish_reason=out.finish_reason,
                                logprobs=lps if lps.tokens else None)

    def _read(self, state: _ChoiceState, out: RequestOutput) -> tuple[str, CompletionLogprobs]:
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
