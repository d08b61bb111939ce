"""The HTTP API over a `GenerationBackend`: POST /v1/chat/completions (JSON or SSE), POST /v1/completions
(completions.py), GET /v1/models[/{id}], GET /health, and GET /metrics: Prometheus text where the backend exposes
its metrics itself (the single process), else a 404 saying where they are (on Ray each pod's metrics agent exports
them: `METRICS_ELSEWHERE`).

With a ledger (`Accounts`, accounts.py) every /v1 route needs a key, and each generation is reserved before the
backend sees it and settled to its usage when it ends.

A request's body is read under `APILimits` (body.py), then parsed, validated, tokenized and its grammar checked on
worker threads within a time budget (workers.py), so no request stalls the event loop; every way its input can be
wrong is a 400. Refusals come from the backend as error outputs (see `cluster.api.backend` and streaming.py).

Tools. A request that offers tools (tool_choice not "none") has them in its prompt; "required" or a named function
also constrains the output to a call (`tool_call_grammar`). The model starts its calls with the [TOOL_CALLS] control
token, which decoded text leaves out: each choice watches its token ids for it, and the text after it is read by a
`ToolCallParser` into `tool_calls` (streamed as OpenAI's tool-call deltas) instead of content.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, ClassVar, Iterator

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cluster.api.accounts import Accounts
from cluster.api.auth import AuthMiddleware
from cluster.api.billing import Charge
from cluster.api.backend import GenerationBackend
from cluster.api.completions import CompletionsAPI
from cluster.api.errors import RETRY_AFTER_S, APIError, error_response
from cluster.api.grammars import GrammarError, check_grammar, json_grammar, tool_call_grammar
from cluster.api.limits import APILimits
from cluster.api.prompt import encode_prompt
from cluster.api.protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                                  ChoiceLogprobs, ChunkChoice, DeltaMessage, FunctionCallDelta, FunctionCallOut,
                                  JSONObjectFormat, JSONSchemaResponseFormat, ModelCard, ModelList,
                                  TokenLogprob, ToolCallDeltaOut, ToolCallOut, Usage)
from cluster.api.streaming import (ChoiceState, CompletionResponse, GenerationRoute, Prepared, checked_logit_bias,
                                   parse_request, serve_generation, token_logprob, token_text)
from cluster.api.tool_calls import ParsedToolCall, ToolCallDelta, ToolCallParser
from cluster.api.workers import RequestWorkers
from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingDefaults
from cluster.ledger import Pricing
from cluster.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def system_fingerprint(model_name: str, dtype: str) -> str:
    """OpenAI's `system_fingerprint`: stable while the model, its dtype and this server's version stay the same."""
    try:
        version = importlib.metadata.version("moe-cluster")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from cluster import __version__ as version
    digest = hashlib.sha256(f"{model_name}\0{dtype}\0{version}".encode()).hexdigest()
    return f"fp_{digest[:10]}"


def build_api(backend: GenerationBackend, tokenizer: Tokenizer, model_name: str, context_len: int,
              defaults: SamplingDefaults, limits: APILimits = APILimits(), fingerprint: str | None = None,
              accounts: Accounts | None = None) -> Starlette:
    """The ASGI app serving `model_name` (the only model; requests naming another get 404) from `backend`;
    `defaults` fill the sampling parameters a request leaves out, `limits` bound what one request may send.
    `fingerprint` is the responses' system_fingerprint (`system_fingerprint(model, dtype)`). `accounts`: keys and
    credits (None: an open server); its ledger opens at start-up (or on the first request) and closes at shutdown."""
    fingerprint = fingerprint or system_fingerprint(model_name, "")
    accounts = accounts or Accounts.open(None)
    # One pool of request workers for both routes: its size bounds the threads any mix of requests can hold.
    workers = RequestWorkers(limits.tokenize_threads, limits.tokenize_budget_s)
    parts = (backend, tokenizer, model_name, context_len, defaults, limits, workers, fingerprint, accounts)
    api, text = _ChatAPI(*parts), CompletionsAPI(*parts)
    routes = [Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/v1/completions", text.create, methods=["POST"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
              Route("/health", api.health, methods=["GET"])]
    exposition = getattr(backend, "metrics_text", None)  # EngineBackend's; a Serve handle's backend has none
    routes.append(Route("/metrics", _metrics_endpoint(exposition), methods=["GET"]))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await accounts.start()
        try:
            yield
        finally:
            await accounts.close()

    def reconfigure(new_limits: APILimits, pricing: Pricing) -> None:
        """Settings changed on a running app (Serve's user_config): each request reads them as it starts. The
        worker threads stay as they are (their count is not live)."""
        api.limits = text.limits = new_limits
        workers.budget_s = new_limits.tokenize_budget_s
        accounts.billing.pricing = pricing

    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=lifespan,
                    middleware=[Middleware(AuthMiddleware, auth=accounts.auth)])
    app.state.reconfigure = reconfigure
    return app


# GET /metrics where this process does not export the metrics itself (on Ray).
METRICS_ELSEWHERE = ("this server does not export metrics at /metrics: on Ray, Ray's metrics agent on each pod "
                     "exports them on the pod's `metrics` port (8080) as ray_vllm_* and ray_moe_cluster_*, which "
                     "k8s/monitoring's PodMonitor renames to vllm:* and moe_cluster_* on scrape")


def _metrics_endpoint(exposition: Callable[[], Awaitable[tuple[bytes, str] | None]] | None
                      ) -> Callable[[Request], Awaitable[Response]]:
    async def metrics(request: Request) -> Response:
        exposed = None if exposition is None else await exposition()
        if exposed is None:
            return error_response(404, METRICS_ELSEWHERE)
        text, content_type = exposed
        return Response(text, media_type=content_type)

    return metrics


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


@dataclass(eq=False)
class _ChatAPI(GenerationRoute[ChatCompletionRequest]):
    """The chat route (served by `serve_generation`) and the model and health routes."""

    what = "chat completion"
    id_prefix = "chatcmpl"
    input_param = "messages"

    def __post_init__(self) -> None:
        self.created = int(time.time())

    # -- routes ----------------------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await serve_generation(request, self)

    async def models(self, request: Request) -> Response:
        return JSONResponse(ModelList(data=[self._card()]).model_dump())

    async def model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id != self.model_name:
            return error_response(404, f"the model {model_id!r} does not exist: this server serves "
                                       f"{self.model_name!r}", "model", "model_not_found")
        return JSONResponse(self._card().model_dump())

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

    def _card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, context_length=self.context_len,
                         max_model_len=self.context_len)

    # -- chat completions ------------------------------------------------------------------------------------------
    def prepare(self, raw: bytes) -> Prepared[ChatCompletionRequest]:
        """The request, its prompt, logit bias and grammar; runs on a worker thread (CPU-bound for large bodies and
        schemas)."""
        req = parse_request(raw, ChatCompletionRequest, self.model_name)
        if req.tool_mode != "none" and self.tokenizer.tool_calls_token is None:
            raise APIError(400, f"this model's tokenizer ({self.tokenizer.version}) has no tool calls: leave tools "
                                f"out or set tool_choice to \"none\"", "tools")
        logit_bias = checked_logit_bias(req, self.tokenizer.vocab_size)
        prompt = encode_prompt(self.tokenizer, req.messages, req.tool_dicts)
        return Prepared(req, prompt, logit_bias, self._grammar(req, self._max_tokens(req, prompt)))

    def respond(self, p: Prepared[ChatCompletionRequest], request_id: str, charge: Charge) -> _Completion:
        tool_token = self.tokenizer.tool_calls_token if p.req.tool_mode != "none" else None
        return _Completion(request_id, int(time.time()), self.model_name, self.fingerprint, len(p.prompt),
                           p.req.choices, p.req.include_usage, self.tokenizer, charge, tool_token,
                           p.req.tool_mode == "named")

    def _max_tokens(self, req: ChatCompletionRequest, prompt: list[int]) -> int:
        """The request's max_tokens as the engine will get it (the context's length where its parameters are
        refused: that refusal comes later)."""
        try:
            return req.to_sampling_params(self.defaults, self.context_len - len(prompt)).max_tokens
        except ValueError:
            return self.context_len

    def _grammar(self, req: ChatCompletionRequest, max_tokens: int) -> str | None:
        """The grammar the output must match: a forced tool call, else the response_format's JSON, else None; an
        APIError (400) for one the engine cannot enforce or that has no output within `max_tokens`."""
        forced_call = req.tool_mode in ("required", "named")
        param = "tools" if forced_call else "response_format"
        fmt = req.response_format
        try:
            if forced_call:
                grammar = tool_call_grammar(req.tool_dicts, req.named_tool, req.parallel_tool_calls is not False)
            elif isinstance(fmt, JSONObjectFormat):
                grammar = json_grammar(None)
            elif isinstance(fmt, JSONSchemaResponseFormat):
                grammar = json_grammar(fmt.json_schema.schema_ or {"type": "object"})
            else:
                return None
            check_grammar(grammar, self.tokenizer.version, max_tokens)
        except GrammarError as e:
            raise APIError(400, f"{param}: {e}", param) from None
        return grammar


# -- one choice's outputs: content, logprobs and tool calls ----------------------------------------------------------
@dataclass
class _Delta:
    """What one output adds to its choice."""

    content: str
    logprobs: list[TokenLogprob]
    tool_calls: list[ToolCallDelta]


@dataclass
class _ChoiceState(ChoiceState):
    content: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tools: ToolCallParser | None = None  # set once the model wrote [TOOL_CALLS]
    calls: list[ParsedToolCall] = field(default_factory=list)  # the parsed calls, once the choice finished
    streamed: dict[int, str] = field(default_factory=dict)  # call index -> its arguments sent as deltas so far
    first_token: bool = True  # no content token seen yet: its text lost SentencePiece's leading space

    @property
    def text(self) -> str:
        return "".join(self.content)


class _ChoiceReader:
    """Splits a choice's outputs into content and tool-call text after [TOOL_CALLS], with their logprobs.

    A choice whose calls end it finishes with "tool_calls", as OpenAI's do for tool_choice "auto" and "required";
    a call forced by naming its function finishes with "stop", as OpenAI's (and vLLM's) do."""

    def __init__(self, tokenizer: Tokenizer, tool_token: int | None, named: bool = False):
        self.tokenizer = tokenizer
        self.tool_token = tool_token  # None: the request offered no tools, all text is content
        self.named = named  # tool_choice named the function

    def read(self, state: _ChoiceState, out: RequestOutput) -> _Delta:
        content, tool_text, content_ids = out.text, "", out.token_ids
        if state.tools is not None:
            content, tool_text, content_ids = "", out.text, []
        elif self.tool_token is not None and self.tool_token in out.token_ids:
            k = out.token_ids.index(self.tool_token)
            content, tool_text = self._split(out.text, out.token_ids[k + 1:])
            content_ids = out.token_ids[:k]
            state.tools = ToolCallParser()
        lps = self._logprobs(state, out, len(content_ids))
        deltas = state.tools.feed(tool_text) if state.tools is not None and tool_text else []
        for d in deltas:
            state.streamed[d.index] = state.streamed.get(d.index, "") + d.arguments
        state.content.append(content)
        state.logprobs.extend(lps)
        state.completion_tokens = out.completion_tokens
        state.cached_tokens = out.cached_prompt_tokens
        state.finish_reason = out.finish_reason
        if out.finished and state.tools is not None:
            state.calls, leftover = state.tools.finish()
            deltas += self._unsent(state)
            if leftover:  # text after [TOOL_CALLS] that was no call: the client still gets it
                state.content.append(leftover)
                content += leftover
            if state.calls and out.finish_reason == "stop" and not self.named:
                state.finish_reason = "tool_calls"
        return _Delta(content, lps, deltas)

    def _split(self, text: str, after_ids: list[int]) -> tuple[str, str]:
        """An output's text split at [TOOL_CALLS]: (content, tool-call text). An output usually holds one token;
        merged outputs (non-streamed requests) hold many, and the text of the tokens after the control token is
        found as the text's end (with or without the leading space SentencePiece drops at a decode's start)."""
        after = _pieces_text(self.tokenizer, after_ids)
        for tail in (after, after[1:] if after.startswith(" ") else None):
            if tail is not None and text.endswith(tail):
                return text[:len(text) - len(tail)], tail
        return "", text

    def _logprobs(self, state: _ChoiceState, out: RequestOutput, content_count: int) -> list[TokenLogprob]:
        """One entry per generated token, as completion_tokens counts them: the `content_count` first tokens of the
        output are the content's, whose texts make up the content (the first one loses the leading space the
        content's decode dropped); control tokens ([TOOL_CALLS], an EOS written past with ignore_eos) are "" with
        no bytes; tool-call tokens come with their raw text; the token that ended the choice (EOS, one of
        stop_token_ids) is "" as well. The tokens of a stop string are not in the output, nor their entries."""
        lps = []
        for j, (token_id, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            item = token_logprob(self.tokenizer, token_id, lp)
            if j < content_count and state.first_token and not self.tokenizer.is_control(token_id):
                item = _without_leading_space(self.tokenizer, item, [token_id] + [t for t, _ in lp.top])
                state.first_token = False
            lps.append(item)
        if out.stop_token is not None and out.stop_token_logprobs is not None:
            lps.append(token_logprob(self.tokenizer, out.stop_token, out.stop_token_logprobs, in_content=False))
        return lps

    @staticmethod
    def _unsent(state: _ChoiceState) -> list[ToolCallDelta]:
        """Deltas for what of the final calls was not streamed yet (so streamed calls always add up to them)."""
        deltas = []
        for i, call in enumerate(state.calls):
            sent = state.streamed.get(i)
            if sent is None:
                deltas.append(ToolCallDelta(i, call.id, call.name, call.arguments))
            elif call.arguments.startswith(sent) and len(call.arguments) > len(sent):
                deltas.append(ToolCallDelta(i, None, None, call.arguments[len(sent):]))
        return deltas


def _pieces_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text of tokens decoded piece by piece, every leading space kept; control tokens left out."""
    raw = b"".join(bytes(token_text(tokenizer, i)[1]) for i in ids if not tokenizer.is_control(i))
    return raw.decode("utf-8", errors="replace")


def _without_leading_space(tokenizer: Tokenizer, item: TokenLogprob, ids: list[int]) -> TokenLogprob:
    """The logprob of a choice's first token as its text shows it: SentencePiece drops the word-start space of
    the first piece a decode reads. `ids`: the token's id, then its top alternatives' (each loses its space too)."""
    def strip(token_id: int, token: str, raw: list[int] | None) -> tuple[str, list[int] | None]:
        if tokenizer.piece(token_id).startswith("\u2581") and token.startswith(" "):
            return token[1:], raw[1:] if raw else raw
        return token, raw

    token, raw = strip(ids[0], item.token, item.bytes)
    top = []
    for token_id, t in zip(ids[1:], item.top_logprobs):
        t_token, t_raw = strip(token_id, t.token, t.bytes)
        top.append(t.model_copy(update={"token": t_token, "bytes": t_raw}))
    return item.model_copy(update={"token": token, "bytes": raw, "top_logprobs": top})


def _tool_call_deltas(deltas: list[ToolCallDelta]) -> list[ToolCallDeltaOut] | None:
    if not deltas:
        return None
    return [ToolCallDeltaOut(index=d.index, id=d.id, type="function" if d.id is not None else None,
                             function=FunctionCallDelta(name=d.name, arguments=d.arguments))
            for d in deltas]


# -- the response ----------------------------------------------------------------------------------------------------
@dataclass
class _Completion(CompletionResponse[_ChoiceState, _Delta]):
    """One request's response: each choice's message (content and tool calls) and logprobs."""

    what: ClassVar[str] = "chat completion"
    input_param: ClassVar[str] = "messages"
    chunk_type: ClassVar[type[BaseModel]] = ChatCompletionChunk

    tool_token: int | None = None  # [TOOL_CALLS], when the request offered tools
    named_tool: bool = False  # tool_choice named the function: its call finishes with "stop"

    def __post_init__(self) -> None:
        self.reader = _ChoiceReader(self.tokenizer, self.tool_token, self.named_tool)

    def _state(self) -> _ChoiceState:
        return _ChoiceState()

    def _read(self, state: _ChoiceState, out: RequestOutput) -> _Delta:
        return self.reader.read(state, out)

    def _completion(self, states: list[_ChoiceState], usage: Usage) -> ChatCompletion:
        choices = [Choice(index=i, message=_message(s), finish_reason=s.finish_reason,
                          logprobs=ChoiceLogprobs(content=s.logprobs) if s.logprobs else None)
                   for i, s in enumerate(states)]
        return ChatCompletion(id=self.id, created=self.created, model=self.model,
                              system_fingerprint=self.fingerprint, choices=choices, usage=usage)

    def _opening(self) -> Iterator[str]:
        for i in range(self.n):  # each choice's role first, as OpenAI streams it
            yield self._chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])

    def _streamed(self, state: _ChoiceState, d: _Delta, out: RequestOutput) -> ChunkChoice | None:
        if not (d.content or d.logprobs or d.tool_calls or out.finished):
            return None
        delta = DeltaMessage(content=d.content or None, tool_calls=_tool_call_deltas(d.tool_calls))
        return ChunkChoice(index=out.index, delta=delta, finish_reason=state.finish_reason if out.finished else None,
                           logprobs=ChoiceLogprobs(content=d.logprobs) if d.logprobs else None)


def _message(state: _ChoiceState) -> AssistantMessage:
    calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
             for c in state.calls]
    text = state.text
    return AssistantMessage(content=None if calls and not text else text, tool_calls=calls or None)
