"""The HTTP API over a `GenerationBackend`: POST /v1/chat/completions (JSON or SSE), GET /v1/models, GET /health.

A request's body is read under `APILimits` (body.py), then parsed, validated and tokenized on worker threads within
a time budget (workers.py), so no request stalls the event loop; every way its input can be wrong is a 400.
Refusals come from the backend as error outputs (see `cluster.api.backend`): the first output of a request is read
before any response starts, so a refused request gets its OpenAI error JSON and status even when it asked to stream.
Every way a response can end early (client gone, failed send, cancellation) closes the backend's iterator, which
aborts the generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, TypeVar

import anyio
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cluster.api.backend import GenerationBackend
from cluster.api.body import decode_json, read_body
from cluster.api.errors import RETRY_AFTER_S, APIError, error_response, validation_error
from cluster.api.limits import APILimits
from cluster.api.prompt import encode_prompt
from cluster.api.protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                                  ChoiceLogprobs, ChunkChoice, DeltaMessage, ModelCard, ModelList,
                                  PromptTokensDetails, TokenLogprob, TopLogprob, Usage)
from cluster.api.workers import RequestWorkers
from cluster.engine.outputs import RequestOutput, TokenLogprobs
from cluster.engine.sampling_params import SamplingDefaults
from cluster.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_GONE = 499  # the status answered to a client that disconnected (nginx's): nobody reads it
T = TypeVar("T")


def build_api(backend: GenerationBackend, tokenizer: Tokenizer, model_name: str, context_len: int,
              defaults: SamplingDefaults, limits: APILimits = APILimits()) -> Starlette:
    """The ASGI app serving `model_name` (the only model; requests naming another get 404) from `backend`;
    `defaults` fill the sampling parameters a request leaves out, `limits` bound what one request may send."""
    api = _ChatAPI(backend, tokenizer, model_name, context_len, defaults, limits)
    routes = [Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/health", api.health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, wrong method) as OpenAI JSON."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"unknown route {request.method} {request.url.path}"
    else:
        message = f"{exc.detail} ({request.method} {request.url.path})"
    response = error_response(exc.status_code, message)
    response.headers.update(exc.headers or {})
    return response


class _ChatAPI:
    def __init__(self, backend: GenerationBackend, tokenizer: Tokenizer, model_name: str, context_len: int,
                 defaults: SamplingDefaults, limits: APILimits):
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_len = context_len
        self.defaults = defaults
        self.limits = limits
        self.workers = RequestWorkers(limits.tokenize_threads, limits.tokenize_budget_s)
        self.created = int(time.time())

    # -- routes ----------------------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        try:
            return await self._chat(request)
        except APIError as e:
            return e.response()
        except ClientDisconnect:
            return Response(status_code=_GONE)
        except Exception:
            log.exception("chat completion failed")
            return error_response(500, "internal error while generating the completion")

    async def models(self, request: Request) -> Response:
        card = ModelCard(id=self.model_name, created=self.created, context_length=self.context_len,
                         max_model_len=self.context_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    async def health(self, request: Request) -> Response:
        try:
            h = await self.backend.health()
        except Exception as e:
            log.exception("health check failed")
            return JSONResponse({"status": "failed", "detail": f"health check failed: {e}"}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        if h.ok:
            return JSONResponse({"status": "ok", "model": self.model_name, "stats": h.stats})
        return JSONResponse({"status": h.status, "detail": h.detail, "stats": h.stats}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    # -- chat completions ------------------------------------------------------------------------------------------
    async def _chat(self, request: Request) -> Response:
        refusal = self.backend.overloaded()  # before the body is read and encoded: a refusal costs nothing
        if refusal is not None:
            raise APIError(429, refusal)
        raw = await read_body(request, self.limits)
        req, prompt = await self.workers.run(self._prepare, raw)
        try:
            params = req.to_sampling_params(self.defaults, self.context_len - len(prompt))
        except ValueError as e:
            raise APIError(400, str(e)) from e

        completion = _Completion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name, len(prompt),
                                 req.n, req.include_usage, self.tokenizer)
        outputs = self.backend.generate(completion.id, prompt, params, stream=req.stream)
        try:
            first = await _unless_disconnected(request, _first(outputs))  # a long prefill: the client may leave
        except BaseException:
            await _close(outputs)
            raise
        if first is None:
            await _close(outputs)
            return Response(status_code=_GONE)
        if req.stream:
            return _EventStream(completion.events(first, outputs), media_type="text/event-stream",
                                headers=_SSE_HEADERS)
        response = await _unless_disconnected(request, completion.collect(first, outputs))
        return Response(status_code=_GONE) if response is None else response

    def _prepare(self, raw: bytes) -> tuple[ChatCompletionRequest, list[int]]:
        """The request and its prompt; runs on a worker thread (CPU-bound for large bodies)."""
        req = _parse(raw)
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist: this server serves {self.model_name!r}",
                           "model", "model_not_found")
        return req, encode_prompt(self.tokenizer, req.messages)


def _parse(raw: bytes) -> ChatCompletionRequest:
    body = decode_json(raw)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


async def _first(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The first output, or the APIError it carries."""
    try:
        first = await anext(outputs)
    except StopAsyncIteration:
        raise APIError(500, "the backend ended the request without any output") from None
    if _failed(first):
        raise _output_error(first)
    return first


def _failed(out: RequestOutput) -> bool:
    return out.error is not None or out.finish_reason in ("error", "abort")


def _output_error(out: RequestOutput) -> APIError:
    if out.finish_reason == "abort" and out.error is None:
        return APIError(503, "the request was aborted before it finished")
    return APIError(out.error_status, out.error or "generation failed")


async def _close(outputs: AsyncIterator[RequestOutput]) -> None:
    """Closing the backend's iterator aborts the request if it is still running."""
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        await aclose()


@dataclass
class _ChoiceState:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class _Completion:
    """One request's response, as one JSON body (`collect`) or as SSE events (`events`)."""

    id: str
    created: int
    model: str
    prompt_tokens: int
    n: int
    include_usage: bool
    tokenizer: Tokenizer

    async def collect(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput]) -> Response:
        states = [_ChoiceState() for _ in range(self.n)]
        out: RequestOutput | None = first
        try:
            while out is not None:
                if _failed(out):
                    return _output_error(out).response()
                self._update(states[out.index], out)
                out = await anext(outputs, None)
        finally:
            await _close(outputs)
        if any(s.finish_reason is None for s in states):
            return error_response(500, "the backend ended the request before every choice finished")
        choices = [Choice(index=i, message=AssistantMessage(content="".join(s.text)), finish_reason=s.finish_reason,
                          logprobs=ChoiceLogprobs(content=s.logprobs) if s.logprobs else None)
                   for i, s in enumerate(states)]
        body = ChatCompletion(id=self.id, created=self.created, model=self.model, choices=choices,
                              usage=self._usage(states))
        return JSONResponse(body.model_dump())

    async def events(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput]) -> AsyncGenerator[str, None]:
        states = [_ChoiceState() for _ in range(self.n)]
        out: RequestOutput | None = first
        try:
            for i in range(self.n):
                yield self._chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            while out is not None:
                if _failed(out):
                    yield _sse(_output_error(out).body())
                    break
                lps = self._update(states[out.index], out)
                if out.text or lps or out.finished:
                    delta = DeltaMessage(content=out.text or None)
                    yield self._chunk([ChunkChoice(index=out.index, delta=delta, finish_reason=out.finish_reason,
                                                   logprobs=ChoiceLogprobs(content=lps) if lps else None)])
                out = await anext(outputs, None)
            else:
                if self.include_usage:
                    yield self._chunk([], self._usage(states))
        except Exception:  # the response has started: the error can only be an event
            log.exception("streaming a chat completion failed")
            yield _sse(APIError(500, "internal error while generating the completion").body())
        finally:
            await _close(outputs)
        yield "data: [DONE]\n\n"

    def _update(self, state: _ChoiceState, out: RequestOutput) -> list[TokenLogprob]:
        """Adds a delta to its choice; returns the delta's logprobs in OpenAI's form."""
        state.text.append(out.text)
        lps = [_token_logprob(self.tokenizer, t, lp) for t, lp in zip(out.token_ids, out.logprobs)]
        state.logprobs.extend(lps)
        state.completion_tokens = out.completion_tokens
        state.cached_tokens = out.cached_prompt_tokens
        state.finish_reason = out.finish_reason
        return lps

    def _usage(self, states: list[_ChoiceState]) -> Usage:
        # The prompt is counted once, as OpenAI does for n > 1; choice 0 is the one that computed (or reused) it.
        completion = sum(s.completion_tokens for s in states)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=states[0].cached_tokens))

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        # With include_usage every chunk carries "usage" (null until the last one), as OpenAI sends it.
        return f"data: {chunk.model_dump_json(exclude=None if self.include_usage else {'usage'})}\n\n"


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _token_text(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text and UTF-8 bytes; a byte-fallback piece such as <0xE5> is that byte ("\\xe5" as text)."""
    piece = tokenizer.piece(token_id)
    if m := _BYTE_PIECE.fullmatch(piece):
        raw = bytes([int(m.group(1), 16)])
        return raw.decode("utf-8", errors="backslashreplace"), list(raw)
    text = piece.replace("\u2581", " ")  # SentencePiece's word-start marker
    return text, list(text.encode())


def _token_logprob(tokenizer: Tokenizer, token_id: int, lp: TokenLogprobs) -> TokenLogprob:
    text, raw = _token_text(tokenizer, token_id)
    top = []
    for tid, value in lp.top:
        t, b = _token_text(tokenizer, tid)
        top.append(TopLogprob(token=t, logprob=value, bytes=b))
    return TokenLogprob(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=top)


# -- ending generation with the response ---------------------------------------------------------------------------
class _EventStream(StreamingResponse):
    """SSE that stops generating whenever the response ends: done, client gone, failed send or cancelled."""

    body_iterator: AsyncGenerator[str, None]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # ASGI 2.4 servers raise this from send once the client is gone
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)  # any server: receive() says http.disconnect
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when the client disconnects first: then `work` is cancelled (which aborts it)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and gone.exception() is not None:  # receive() failed: no news of the client
            await task
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # its cleanup (the abort) has run once this returns
    return None if task.cancelled() else task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
