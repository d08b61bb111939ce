"""POST /v1/completions: OpenAI's legacy text completions, plain prompts continued (or scored), as JSON or SSE.

A prompt is the client's text encoded with BOS and no chat template, or token ids as sent; `prompt` holds one, or a
list of up to `MAX_PROMPTS`. Each prompt is generated as its own request with its `n` choices, numbered
prompt_index * n + i (`cluster.api.multi_prompt`: admitted all together or refused together); usage adds up the
prompts, each counted once. Each choice's text keeps the leading space of its first token, which SentencePiece drops
when a decode starts there: a completion is read after its prompt ("Hello" + " world").

`echo` puts the prompt's text before each choice's completion (the string as sent, or the token ids decoded), and
with `logprobs` the prompt's tokens' logprobs before the completion's (the engine's prompt logprobs, which the first
token lacks: its logprob and top_logprobs are null); `max_tokens: 0` is then allowed, to score the prompt alone, as
evaluation harnesses do (lm-eval's loglikelihood). The logprob entries have one per token, control tokens (BOS, EOS,
[INST]...) as "" (they are not in the text), so their tokens concatenate to the text and `text_offset` counts
characters from the start of the choice's text (the echoed prompt's, with echo).

The request takes the chat route's way (`serve_generation` in cluster.api.streaming): body limits, parsing and
encoding on worker threads, the ledger's reserve and settle (one reservation for every prompt's worst case), the
first output read before any response starts (a refusal is an error JSON even when streaming), and generation
aborted whenever the response ends early. Its fields are the chat request's sampling ones (`SamplingRequest`) and
its own; `suffix` and `best_of` > 1 are refused with a 400 naming the field.
"""

from __future__ import annotations

import codecs
import dataclasses
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator
from starlette.requests import Request
from starlette.responses import Response

from cluster.api.billing import Charge
from cluster.api.errors import APIError
from cluster.api.protocol import Bool, Int, PromptTokensDetails, SamplingRequest, Usage
from cluster.api.streaming import (ChoiceState, CompletionResponse, GenerationRoute, Prepared, checked_logit_bias,
                                   parse_request, serve_generation, token_text)
from cluster.engine.outputs import RequestOutput, TokenLogprobs
from cluster.engine.sampling_params import SamplingDefaults, SamplingParams
from cluster.tokenizer import Tokenizer

MAX_LOGPROBS = 5  # OpenAI's bound for the legacy `logprobs` (top alternatives per token)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this route
# Prompts in one request: bounds the encoding one body asks for. Their choices (prompts x n) are bounded too, by
# `APILimits.max_n`, as one prompt's n is.
MAX_PROMPTS = 128
_PROMPT_FORMS = "must be a string, a list of strings, token ids (a list of integers) or a list of token-id lists"
_WORD_START = "\u2581"  # SentencePiece's word-start marker
# Each tokenizer's token texts as logprob entries show them, (text, bytes, starts a word), memoized as tokens are
# met (at most the vocabulary): an echoed prompt of thousands of tokens and their alternatives is read on the event
# loop, and a token's text costs a few tokenizer calls.
_ENTRY_TEXTS: weakref.WeakKeyDictionary[Tokenizer, dict[int, tuple[str, list[int], bool]]] = \
    weakref.WeakKeyDictionary()


# -- request -------------------------------------------------------------------------------------------------------
class CompletionRequest(SamplingRequest):
    FIELD_ORDER = ("model", "prompt", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "n",
                   "best_of", "stop", "stop_token_ids", "seed", "stream", "stream_options", "logprobs", "echo", "suffix",
                   "frequency_penalty", "presence_penalty", "logit_bias", "ignore_eos", "user", "cache_salt",
                   "return_token_ids", "prompt_logprobs")

    # None: an empty document, BOS alone; checked below (one error naming every accepted form), also when left out
    prompt: Any = Field(default=None, validate_default=True)
    max_tokens: Int | None = Field(default=None, ge=0)  # 0 only with echo: the prompt scored, nothing generated
    best_of: Int | None = Field(default=None, ge=1)
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Bool | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: Any) -> list[str] | list[list[int]]:
        """The prompts: texts, or token-id lists (checked against the vocabulary when encoding)."""
        if prompt is None:  # OpenAI's default is its end-of-text token: a new document
            return [""]
        if isinstance(prompt, str):
            return [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise ValueError(_PROMPT_FORMS)
        if all(type(t) is int for t in prompt):
            return [prompt]
        if len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}")
        if all(isinstance(p, str) for p in prompt):
            return prompt
        if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt):
            return prompt
        raise ValueError(_PROMPT_FORMS)

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

    def encode(self, tokenizer: Tokenizer) -> list[list[int]]:
        """Each prompt's token ids: text with BOS, or the ids sent; APIError(400) for ids outside the vocabulary."""
        encoded = []
        for i, prompt in enumerate(self.prompt):
            if isinstance(prompt, str):
                encoded.append(tokenizer.encode(prompt, bos=True))
                continue
            bad = next((t for t in prompt if not 0 <= t < tokenizer.vocab_size), None)
            if bad is not None:
                where = f"prompt[{i}]" if len(self.prompt) > 1 else "prompt"
                raise APIError(400, f"{where} holds the token id {bad}, outside the vocabulary (ids 0.."
                                    f"{tokenizer.vocab_size - 1})", "prompt")
            encoded.append(list(prompt))
        return encoded

    def echoed(self, tokenizer: Tokenizer, prompts: list[list[int]]) -> tuple[str, ...]:
        """Each prompt's text as echo returns it: the string sent, or the token ids decoded."""
        return tuple(p if isinstance(p, str) else tokenizer.decode(ids) for p, ids in zip(self.prompt, prompts))

    def to_sampling_params(self, defaults: SamplingDefaults, context_left: int, grammar: str | None = None,
                           logit_bias: tuple[tuple[int, float], ...] = ()) -> SamplingParams:
        """The engine's parameters (max_tokens 16 when left out, clipped to the `context_left` after the prompt;
        with echo and logprobs the prompt is scored too); raises ValueError for values the engine refuses."""
        params = self._sampling_params(defaults, context_left, DEFAULT_MAX_TOKENS, self.logprobs is not None,
                                       self.logprobs or 0, grammar, logit_bias)
        scored = self.logprobs if self.echo else None
        return dataclasses.replace(params, max_tokens=0 if self.max_tokens == 0 else params.max_tokens,
                                   prompt_logprobs=scored)


# -- response ------------------------------------------------------------------------------------------------------
class CompletionLogprobs(BaseModel):
    """Legacy logprobs: per token its text, logprob, the top alternatives (text -> logprob, the sampled token among
    them) and where it starts in the choice's text. An echoed prompt's first token has null for both."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    def extend(self, more: CompletionLogprobs) -> None:
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(self, name).extend(getattr(more, name))


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
        """The request, its prompts and logit bias; runs on a worker thread (CPU-bound for large bodies)."""
        req = parse_request(raw, CompletionRequest, self.model_name)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: 0 is only allowed with echo (which returns the prompt, scored with "
                                "logprobs); send at least 1", "max_tokens")
        choices = len(req.prompt) * req.choices
        if len(req.prompt) > 1 and choices > self.limits.max_n:  # (one prompt's n is the engine's to refuse)
            raise APIError(400, f"{len(req.prompt)} prompts x n={req.choices} make {choices} choices; this server "
                                f"allows at most {self.limits.max_n} per request: send fewer prompts per request",
                           "prompt")
        prompts = req.encode(self.tokenizer)
        return Prepared(req, prompts[0], checked_logit_bias(req, self.tokenizer.vocab_size),
                        more_prompts=tuple(prompts[1:]))

    def respond(self, p: Prepared[CompletionRequest], request_id: str, charge: Charge) -> _Completion:
        prompts = p.prompts
        return _Completion(request_id, int(time.time()), self.model_name, self.fingerprint,
                           sum(len(prompt) for prompt in prompts), len(prompts) * p.req.choices, p.req.include_usage,
                           self.tokenizer, charge, p.req.choices, tuple(prompts),
                           p.req.echoed(self.tokenizer, prompts) if p.req.echo else None)


# -- one request's response ----------------------------------------------------------------------------------------
@dataclass
class _ChoiceState(ChoiceState):
    text: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)
    echoed: bool = False  # the prompt was put before the completion (with echo)
    started: bool = False  # a content token was seen: later text needs no restored space
    chars: int = 0  # characters of the choice's text so far (text_offset of the next token)
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


@dataclass
class _Completion(CompletionResponse[_ChoiceState, tuple[str, CompletionLogprobs]]):
    """One request's response: each choice's text and legacy logprobs; choice i is choice i % per_prompt of prompt
    i // per_prompt."""

    what: ClassVar[str] = "text completion"
    input_param: ClassVar[str] = "prompt"
    chunk_type: ClassVar[type[BaseModel]] = Completion

    per_prompt: int = 1  # the request's n
    prompts: tuple[list[int], ...] = ()  # each prompt's token ids
    echo: tuple[str, ...] | None = None  # with echo, each prompt's text
    _scored: dict[int, CompletionLogprobs] = field(default_factory=dict, init=False)  # each prompt's, made once

    def _state(self) -> _ChoiceState:
        return _ChoiceState()

    def _completion(self, states: list[_ChoiceState], usage: Usage) -> Completion:
        choices = [CompletionChoice(text="".join(s.text), index=i, finish_reason=s.finish_reason,
                                    logprobs=s.logprobs if s.logprobs.tokens else None)
                   for i, s in enumerate(states)]
        return Completion(id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint,
                          choices=choices, usage=usage)

    def _usage(self, states: list[_ChoiceState]) -> Usage:
        # Each prompt counted once: its first choice is the one that computed (or reused) it.
        cached = sum(s.cached_tokens for s in states[::self.per_prompt])
        return super()._usage(states).model_copy(
            update={"prompt_tokens_details": PromptTokensDetails(cached_tokens=cached)})

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
        if self.echo is not None and not state.echoed:  # the choice's first output: its prompt comes first
            state.echoed = True
            prompt = out.index // self.per_prompt
            text = self.echo[prompt] + text
            state.chars = len(self.echo[prompt])
            if out.prompt_logprobs is not None:
                lps.extend(self._prompt_logprobs(prompt, out.prompt_logprobs))
        generated = list(zip(out.token_ids, out.logprobs))
        if out.stop_token is not None and out.stop_token_logprobs is not None:  # the token that ended it (EOS...)
            generated.append((out.stop_token, out.stop_token_logprobs))
        for token_id, lp in generated:  # one entry per generated token, control tokens and the ending one too
            token, raw = self._token_text(token_id)
            lps.tokens.append(token)
            lps.token_logprobs.append(lp.logprob)
            lps.top_logprobs.append(self._top(token, lp))
            lps.text_offset.append(state.chars)
            state.chars += len(state.utf8.decode(bytes(raw)))
        state.text.append(text)
        state.logprobs.extend(lps)
        state.completion_tokens = out.completion_tokens
        state.cached_tokens = out.cached_prompt_tokens
        state.finish_reason = out.finish_reason
        return text, lps

    def _prompt_logprobs(self, prompt: int, scores: list[TokenLogprobs | None]) -> CompletionLogprobs:
        """A prompt's tokens with their scores, as echo returns them (the same for each of its choices). Their
        texts spell the prompt's decoded text: control tokens are "", and the first content token (and its
        alternatives) lose the word-start space its decode drops."""
        if prompt in self._scored:
            return self._scored[prompt]
        lps = CompletionLogprobs()
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        chars, started = 0, False
        for token_id, score in zip(self.prompts[prompt], scores):
            first = not started and self._token_text(token_id)[0] != ""  # (control tokens are "")
            started = started or first
            token, raw = self._token_text(token_id, first)
            lps.tokens.append(token)
            lps.token_logprobs.append(None if score is None else score.logprob)
            lps.top_logprobs.append(None if score is None else self._top(token, score, first))
            lps.text_offset.append(chars)
            chars += len(utf8.decode(bytes(raw)))
        self._scored[prompt] = lps
        return lps

    def _top(self, token: str, lp: TokenLogprobs, first: bool = False) -> dict[str, float]:
        """The alternatives' texts -> logprobs, with the token's own text among them."""
        top = {self._token_text(token_id, first)[0]: value for token_id, value in lp.top}
        top[token] = lp.logprob
        return top

    def _token_text(self, token_id: int, first: bool = False) -> tuple[str, list[int]]:
        """A token's text and bytes; a control token's are "" and [] (it is no part of the text). A text's `first`
        token loses the word-start space a decode drops there."""
        known = _ENTRY_TEXTS.setdefault(self.tokenizer, {})
        entry = known.get(token_id)
        if entry is None:
            if self.tokenizer.is_control(token_id):
                entry = "", [], False
            else:
                token, raw = token_text(self.tokenizer, token_id)
                entry = token, raw, token.startswith(" ") and self.tokenizer.piece(token_id).startswith(_WORD_START)
            known[token_id] = entry
        token, raw, word = entry
        return (token[1:], raw[1:]) if first and word else (token, raw)
