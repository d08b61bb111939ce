"""Plumbing shared by the API's generation routes (chat and text completions): one request's way from its body to
its response (`serve_generation`), and the parts of a response (`CompletionResponse`).

A route only parses and encodes its request (`GenerationRoute.prepare`, on a worker thread) and builds its response
(`GenerationRoute.respond`); `serve_generation` does the rest the same way for both: the 429 check before the body is
read, the 400 for sampling parameters the engine refuses, the ledger's reserve and settle (`Billing.metered`), and
reading the first output (`first_output`) before any response starts, so a refused request gets its OpenAI error
JSON and status even when it asked to stream. Every way a response can end early (client gone, failed send,
cancellation) closes the backend's iterator (`close_outputs`), which aborts the generation: `sse.EventStream` does
it for SSE, `sse.unless_disconnected` for the work done before a response starts.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, ClassVar, Generic, Iterator, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from cluster.api.accounts import Accounts
from cluster.api.auth import request_key, salted
from cluster.api.billing import Charge
from cluster.api.backend import GenerationBackend
from cluster.api.body import decode_json, read_body
from cluster.api.errors import APIError, error_response, validation_error
from cluster.api.limits import APILimits
from cluster.api.multi_prompt import generate_prompts
from cluster.api.protocol import PromptTokensDetails, SamplingRequest, TokenLogprob, TopLogprob, Usage
from cluster.api.sse import SSE_DONE, sse, unless_disconnected
from cluster.api.workers import RequestWorkers
from cluster.engine.outputs import RequestOutput, TokenLogprobs
from cluster.engine.sampling_params import SamplingDefaults, SamplingParams
from cluster.tokenizer import Tokenizer


log = logging.getLogger(__name__)

GONE = 499  # the status answered to a client that disconnected (nginx's): nobody reads it
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
T = TypeVar("T")
R = TypeVar("R", bound=SamplingRequest)
S = TypeVar("S", bound="ChoiceState")
D = TypeVar("D")


# -- one request, from its body to its response --------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared(Generic[R]):
    """A validated request, ready for the backend."""

    req: R
    prompt: list[int]
    logit_bias: tuple[tuple[int, float], ...]
    grammar: str | None = None
    # A text-completions request's prompts after the first: each is generated as its own request with n choices
    # (`cluster.api.multi_prompt`), the prompt's choices numbered after the previous prompt's.
    more_prompts: tuple[list[int], ...] = ()

    @property
    def prompts(self) -> list[list[int]]:
        return [self.prompt, *self.more_prompts]


@dataclass(eq=False)
class GenerationRoute(Generic[R]):
    """A generation route: the server's parts (one set, shared by both routes), and the route's own steps, which a
    subclass writes. `serve_generation` serves it."""

    what: ClassVar[str]  # "chat completion": what the log says failed
    id_prefix: ClassVar[str]  # of the route's completion ids
    input_param: ClassVar[str]  # the request field holding the prompt

    backend: GenerationBackend
    tokenizer: Tokenizer
    model_name: str
    context_len: int
    defaults: SamplingDefaults
    limits: APILimits
    workers: RequestWorkers
    fingerprint: str
    accounts: Accounts

    def prepare(self, raw: bytes) -> Prepared[R]:
        """The request parsed, checked and encoded; runs on a worker thread (CPU-bound for large bodies)."""
        raise NotImplementedError

    def respond(self, p: Prepared[R], request_id: str, charge: Charge) -> CompletionResponse[Any, Any]:
        """The request's response, to fill from the backend's outputs."""
        raise NotImplementedError


async def serve_generation(request: Request, route: GenerationRoute[R]) -> Response:
    """A generation route's response to `request`; every failure is an OpenAI error response."""
    try:
        return await _serve(request, route)
    except APIError as e:
        return e.response()
    except ClientDisconnect:
        return Response(status_code=GONE)
    except Exception:
        log.exception("%s failed", route.what)
        return error_response(500, "internal error while generating the completion")


async def _serve(request: Request, route: GenerationRoute[R]) -> Response:

    refusal = route.backend.overloaded()  # before the body is read and encoded: a refusal costs nothing
    if refusal is not None:
        raise APIError(429, refusal)
    raw = await read_body(request, route.limits)
    p = await route.workers.run(route.prepare, raw)
    longest = max(len(prompt) for prompt in p.prompts)
    try:
        p.req.check_stop_token_ids(route.tokenizer.vocab_size)
    except ValueError as e:
        raise APIError(400, str(e), "stop_token_ids") from None
    try:
        params = p.req.to_sampling_params(route.defaults, route.context_len - longest, p.grammar, p.logit_bias)
    except ValueError as e:
        raise APIError(400, str(e)) from e
    total = longest + params.max_tokens
    if total > route.context_len:  # the engine refuses it too; here before anything is reserved or rate-counted
        raise APIError(400, f"the prompt ({longest} tokens) plus max_tokens ({params.max_tokens}) is {total} "
                            f"tokens, more than the model's context of {route.context_len} tokens",
                       route.input_param, "context_length_exceeded")
    key = request_key(request)
    params = salted(key, params)
    request_id = f"{route.id_prefix}-{uuid.uuid4().hex}"
    worst = len(p.prompts) * params.n * params.max_tokens  # every choice of every prompt
    return await route.accounts.billing.metered(key, request_id, sum(len(prompt) for prompt in p.prompts), worst,
                                                lambda charge: _generate(request, route, p, params, request_id,
                                                                         charge))


async def _generate(request: Request, route: GenerationRoute[R], p: Prepared[R], params: SamplingParams,
                    request_id: str, charge: Charge) -> Response:
    response = route.respond(p, request_id, charge)
    response.continuous_usage = p.req.continuous_usage  # the shared stream options: one place for both routes
    outputs = generate_prompts(route.backend, request_id, p.prompts, params, stream=p.req.streaming)
    try:  # a long prefill: the client may leave
        first = await unless_disconnected(request, first_output(outputs, response.input_param))
    except BaseException:
        await close_outputs(outputs)
        raise
    if first is None:
        await close_outputs(outputs)
        return Response(status_code=GONE)
    charge.accepted = True
    if p.req.streaming:
        return charge.stream(response.events(first, outputs))
    body = await unless_disconnected(request, response.collect(first, outputs))
    return Response(status_code=GONE) if body is None else body


def parse_request(raw: bytes, model: type[R], served: str) -> R:
    """The body as a `model` request; APIError(400) naming what is wrong, 404 when it names a model not `served`."""
    body = decode_json(raw)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = model.from_body(body)
    except ValidationError as e:
        raise validation_error(e) from None
    if req.model is not None and req.model != served:
        raise APIError(404, f"the model {req.model!r} does not exist: this server serves {served!r}",
                       "model", "model_not_found")
    return req


def checked_logit_bias(req: SamplingRequest, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """`req.logit_bias_pairs`, with APIError(400) naming logit_bias for a token outside the vocabulary."""
    try:
        return req.logit_bias_pairs(vocab_size)
    except ValueError as e:
        raise APIError(400, str(e), "logit_bias") from None


# -- reading the backend's outputs ---------------------------------------------------------------------------------
async def first_output(outputs: AsyncIterator[RequestOutput], input_param: str = "messages") -> RequestOutput:
    """The first output, or the APIError it carries (`output_error`)."""
    try:
        first = await anext(outputs)
    except StopAsyncIteration:
        raise APIError(500, "the backend ended the request without any output") from None
    if failed(first):
        raise output_error(first, input_param)
    return first


def failed(out: RequestOutput) -> bool:
    return out.error is not None or out.finish_reason in ("error", "abort")


def output_error(out: RequestOutput, input_param: str = "messages") -> APIError:
    """The APIError a failed output carries (`failed(out)` holds); a prompt too long for the context names
    `input_param`, the request field holding it."""
    if out.finish_reason == "abort" and out.error is None:
        return APIError(503, "the request was aborted before it finished")
    code = getattr(out, "error_code", None)
    param = input_param if code == "context_length_exceeded" else None
    return APIError(out.error_status, out.error or "generation failed", param, code)


async def close_outputs(outputs: AsyncIterator[RequestOutput]) -> None:
    """Closing the backend's iterator aborts the request if it is still running."""
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        await aclose()


# -- one request's response -----------------------------------------------------------------------------------------
@dataclass
class ChoiceState:
    """What a choice's outputs so far add up to; a route's subclass keeps its text, logprobs and the like."""

    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class CompletionResponse(Generic[S, D]):
    """One request's response, as one JSON body (`collect`) or as SSE events (`events`). A route's subclass reads
    an output into its choice's state (`_read`, giving a delta `D`) and writes the route's JSON (`_completion`,
    `_streamed`, `chunk_type`)."""

    what: ClassVar[str]  # "chat completion": what the log says failed
    input_param: ClassVar[str]  # the request field holding the prompt, which a context-length error names
    chunk_type: ClassVar[type[BaseModel]]  # a streamed chunk: id, created, model, system_fingerprint, choices, usage

    id: str
    created: int
    model: str
    fingerprint: str
    prompt_tokens: int
    n: int
    include_usage: bool
    tokenizer: Tokenizer
    charge: Charge  # counts the tokens read, settles before a stream's usage chunk
    # Every chunk carries the usage so far (vLLM's continuous_usage_stats); set by `serve_generation` for both routes
    continuous_usage: bool = field(default=False, init=False)
    _states: list[Any] = field(default_factory=list, init=False, repr=False)  # a stream's choices, for that usage

    # -- what a route's response says --------------------------------------------------------------------------------
    def _state(self) -> S:
        raise NotImplementedError

    def _read(self, state: S, out: RequestOutput) -> D:
        """Adds an output to its choice's state; returns what it adds as the client gets it."""
        raise NotImplementedError

    def _completion(self, states: list[S], usage: Usage) -> BaseModel:
        """The whole response, every choice finished."""
        raise NotImplementedError

    def _streamed(self, state: S, delta: D, out: RequestOutput) -> BaseModel | None:
        """The chunk choice carrying `delta` (None: nothing to send)."""
        raise NotImplementedError

    def _opening(self) -> Iterator[str]:
        """The events a stream starts with, before any output."""
        return iter(())

    # -- the response ------------------------------------------------------------------------------------------------
    async def collect(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput]) -> Response:
        states = [self._state() for _ in range(self.n)]
        out: RequestOutput | None = first
        try:
            while out is not None:
                if failed(out):
                    return output_error(out, self.input_param).response()
                self._read(states[out.index], out)
                self.charge.completion_tokens = sum(s.completion_tokens for s in states)
                out = await anext(outputs, None)
        finally:
            await close_outputs(outputs)
        if any(s.finish_reason is None for s in states):
            return error_response(500, "the backend ended the request before every choice finished")
        return JSONResponse(self._completion(states, self._usage(states)).model_dump())

    async def events(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput]) -> AsyncGenerator[str, None]:
        states = self._states = [self._state() for _ in range(self.n)]
        out: RequestOutput | None = first
        try:
            for event in self._opening():
                yield event
            while out is not None:
                if failed(out):
                    yield sse(output_error(out, self.input_param).body())
                    break
                state = states[out.index]
                delta = self._read(state, out)
                self.charge.completion_tokens = sum(s.completion_tokens for s in states)
                choice = self._streamed(state, delta, out)
                if choice is not None:
                    yield self._chunk([choice])
                out = await anext(outputs, None)
            else:
                if self.include_usage:
                    remaining = await self.charge.remaining_after_settle()
                    yield self._chunk([], self._usage(states).model_copy(update={"remaining_credits": remaining}))
        except Exception:  # the response has started: the error can only be an event
            log.exception("streaming a %s failed", self.what)
            yield sse(APIError(500, "internal error while generating the completion").body())
        finally:
            await close_outputs(outputs)
        yield SSE_DONE

    def _usage(self, states: list[S]) -> Usage:
        # The prompt is counted once, as OpenAI does for n > 1; choice 0 is the one that computed (or reused) it.
        completion = sum(s.completion_tokens for s in states)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=states[0].cached_tokens))

    def _chunk(self, choices: list[Any], usage: Usage | None = None) -> str:
        if usage is None and self.continuous_usage:
            usage = self._usage(self._states)
        chunk = self.chunk_type(id=self.id, created=self.created, model=self.model,
                                system_fingerprint=self.fingerprint, choices=choices, usage=usage)
        # With include_usage every chunk carries "usage" (null until the last one, as OpenAI sends it; the usage so
        # far with continuous_usage_stats, as vLLM does).
        return f"data: {chunk.model_dump_json(exclude=None if self.include_usage else {'usage'})}\n\n"


# -- logprobs ------------------------------------------------------------------------------------------------------
def token_text(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text and UTF-8 bytes; a byte-fallback piece such as <0xE5> is that byte ("\\xe5" as text)."""
    piece = tokenizer.piece(token_id)
    if m := _BYTE_PIECE.fullmatch(piece):
        raw = bytes([int(m.group(1), 16)])
        return raw.decode("utf-8", errors="backslashreplace"), list(raw)
    text = piece.replace("\u2581", " ")  # SentencePiece's word-start marker
    return text, list(text.encode())


def content_text(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """`token_text`, but "" and no bytes for a control token (EOS, [TOOL_CALLS], ...): what it adds to the content."""
    return ("", []) if tokenizer.is_control(token_id) else token_text(tokenizer, token_id)


def token_logprob(tokenizer: Tokenizer, token_id: int, lp: TokenLogprobs, in_content: bool = True) -> TokenLogprob:
    """A sampled token's logprob in OpenAI's form, control tokens as "" (`content_text`) wherever they appear;
    `in_content` false: the token's text is not in the content (the token that ended it), so it is "" too."""
    text, raw = content_text(tokenizer, token_id) if in_content else ("", [])
    top = []
    for tid, value in lp.top:
        t, b = content_text(tokenizer, tid)
        top.append(TopLogprob(token=t, logprob=value, bytes=b))
    return TokenLogprob(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=top)
