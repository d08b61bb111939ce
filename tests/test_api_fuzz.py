"""Bad input gets a 4xx in OpenAI's error shape, never a 5xx, a held connection or a stalled server (issue 16).

Targeted tests drive the API in process over a recording backend (no engine): the body limit (413 before the body
is read), the body timeout (408; through a real uvicorn, the connection is closed), each way a body can fail to
parse, the tokenization budget, `/health` during a 4 MiB prompt, `cache_salt` and `Retry-After` on 429. The fuzz
tests (e2e) post generated and mutated bodies (hypothesis, derandomized) to the API over a real tiny engine with the
grammar guide: 1500 chat bodies, then 1000 over the fields of issue 17 (malformed tools, tool_choice, response_format
schemas, logit_bias values, explicit nulls) and /v1/completions bodies.
"""

import asyncio
import json
import logging
import re
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, AsyncIterator, Callable, Iterator

import httpx
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mistral_common.exceptions import InvalidMessageStructureException

from cluster.api.errors import APIError
from cluster.api.limits import MiB, APILimits
from cluster.api.prompt import encode_prompt
from cluster.api.protocol import ChatMessage
from cluster.api.server import build_api
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.engine.guided import GrammarGuide
from cluster.engine.outputs import RequestOutput, TokenLogprobs
from cluster.engine.paged_cache import kv_bytes_per_block
from cluster.engine.sampling_params import SamplingDefaults, SamplingParams
from cluster.engine.stats import EngineStats
from cluster.health import Health
from cluster.model.loader import load_model
from cluster.serve.engine_backend import EngineBackend
from cluster.tokenizer import Tokenizer, TokenizerError, load_tokenizer, resolve_tokenizer_version
from tests.http import sse_chunks
from tests.waiting import wait_until_async

MODEL = "mixtral-tiny"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HELLO = [{"role": "user", "content": "Say hello."}]
# What a client must never read in an error message: exception class names, binding internals, our model classes.
INTERNALS = re.compile(r"Traceback|Error\b|Exception|pybind|C\+\+|ChatMessage|TextPart|ToolCall|FunctionCall|"
                       r"StreamOptions|ChatCompletionRequest|pydantic|errors\.pydantic\.dev|sys\.set_int")


class _Recorder:
    """A backend that answers every choice with "hi" (or refuses with `status`) and keeps what it was asked."""

    def __init__(self, status: int | None = None):
        self.status = status
        self.calls: list[tuple[list[int], SamplingParams]] = []

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        self.calls.append((prompt, params))
        if self.status is not None:
            outputs = RequestOutput.errors(request_id, params.n, "the waiting queue is full", self.status)
        else:
            outputs = [RequestOutput(request_id, i, "hi", [5], finish_reason="stop", prompt_tokens=len(prompt),
                                     completion_tokens=1) for i in range(params.n)]
        for out in outputs:
            yield out

    def overloaded(self) -> str | None:
        return None

    async def health(self) -> Health:
        return Health()


def _app(tokenizer: Any, backend: Any = None, context_len: int = 4096, **limits: Any):
    return build_api(backend or _Recorder(), tokenizer, MODEL, context_len, SamplingDefaults(temperature=0.5),
                     APILimits(**limits))


@pytest.fixture(scope="module")
def app(tok):
    return _app(tok)


def _assert_error(response: httpx.Response, status: int, *needles: str) -> dict:
    assert response.status_code == status, response.text[:2000]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    for needle in needles:
        assert needle in error["message"], error["message"]
    assert not INTERNALS.search(error["message"]), error["message"]
    return error


async def _post_raw(app, content: bytes | AsyncIterator[bytes], headers: dict | None = None,
                    path: str = CHAT) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.post(path, content=content,
                                 headers={"content-type": "application/json", **(headers or {})})


# -- driving the ASGI app by hand, to see what it reads ------------------------------------------------------------
async def _call(app, receive: Callable, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 5000), "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=20)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def _error_of(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    return error


def test_a_declared_body_over_the_limit_gets_413_before_a_byte_is_read(tok):
    app = _app(tok, max_body_bytes=1000)
    received = []

    async def receive() -> dict:
        received.append(1)
        return {"type": "http.request", "body": b"x" * 1001, "more_body": False}

    status, headers, body = asyncio.run(_call(app, receive, [(b"content-length", b"1001")]))
    assert status == 413 and received == []
    assert headers["connection"] == "close"
    error = _error_of(body)
    assert "1001 bytes" in error["message"] and "1000 bytes" in error["message"]
    assert error["code"] == "request_too_large"


def test_a_streamed_body_is_refused_once_it_passes_the_limit(tok):
    app = _app(tok, max_body_bytes=MiB)
    chunk = 64 * 1024
    received = [0]

    async def receive() -> dict:  # a chunked upload (no Content-Length) that would never end
        received[0] += chunk
        return {"type": "http.request", "body": b" " * chunk, "more_body": True}

    status, headers, body = asyncio.run(_call(app, receive, []))
    assert status == 413 and headers["connection"] == "close"
    assert MiB < received[0] <= MiB + chunk
    assert "1048576 bytes" in _error_of(body)["message"]


def test_a_body_in_many_chunks_under_the_limit_is_read_whole(tok):
    backend = _Recorder()
    app = _app(tok, backend, max_body_bytes=MiB)
    raw = json.dumps({"messages": HELLO, "max_tokens": 3}).encode()
    pieces = [raw[i:i + 7] for i in range(0, len(raw), 7)]

    async def chunks() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    response = asyncio.run(_post_raw(app, chunks()))
    assert response.status_code == 200, response.text
    (prompt, params), = backend.calls
    assert prompt == tok.encode_chat(HELLO) and params.max_tokens == 3


def test_a_body_slower_than_the_timeout_gets_408(tok):
    app = _app(tok, body_timeout_s=0.3)

    async def scenario():
        first = [{"type": "http.request", "body": b'{"messages": [', "more_body": True}]

        async def receive() -> dict:  # one piece, then nothing more: a client trickling its body
            if first:
                return first.pop()
            await asyncio.sleep(3600)

        started = time.monotonic()
        result = await _call(app, receive, [(b"content-length", b"100")])
        return result, time.monotonic() - started

    (status, headers, body), elapsed = asyncio.run(scenario())
    assert status == 408 and headers["connection"] == "close"
    assert 0.3 <= elapsed < 5
    error = _error_of(body)
    assert "0.3 s" in error["message"] and error["code"] == "request_timeout"


@contextmanager
def uvicorn_server(app) -> Iterator[int]:
    """`app` served by uvicorn on a free local port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _until_closed(port: int, data: bytes, within_s: float) -> tuple[bytes, float]:
    """Sends `data`, then reads until the server closes the connection: (what it sent back, seconds it took)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=within_s) as conn:
        conn.sendall(data)
        reply = b""
        while chunk := conn.recv(65536):  # a server that holds the connection fails this by timeout
            reply += chunk
    return reply, time.monotonic() - started


@pytest.mark.e2e  # starts a server
def test_a_real_server_answers_408_and_413_and_closes_the_connection(tok):
    app = _app(tok, max_body_bytes=MiB, body_timeout_s=0.5)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    with uvicorn_server(app) as port:
        slow, slow_s = _until_closed(port, head + b"Content-Length: 100\r\n\r\n" + b'{"messages"', within_s=10)
        big, big_s = _until_closed(port, head + b"Content-Length: %d\r\n\r\n" % (8 * MiB), within_s=10)
    assert slow.startswith(b"HTTP/1.1 408 ") and b'"type":"invalid_request_error"' in slow
    assert 0.5 <= slow_s < 5
    assert big.startswith(b"HTTP/1.1 413 ") and b"request_too_large" in big and big_s < 5


# -- parse failures ------------------------------------------------------------------------------------------------
def _body(**fields: Any) -> bytes:
    return json.dumps({"messages": HELLO, **fields}).encode()


@pytest.mark.parametrize("raw, needles, param", [
    (b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"], None),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ["nested too deeply"], None),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, ["nested too deeply"], None),
    (_body()[:-1] + b', "seed": ' + b"1" * 5000 + b"}", ["integer with too many digits"], None),
    (_body()[:-1] + b', "temperature": NaN}', ["NaN is not a JSON value"], None),
    (_body()[:-1] + b', "temperature": Infinity}', ["Infinity is not a JSON value"], None),
    (_body()[:-1] + b', "top_p": -Infinity}', ["-Infinity is not a JSON value"], None),
    (_body()[:-1] + b', "temperature": 1e400}', ["temperature: Input should be a finite number"], "temperature"),
    (b"\xff\xfe{}", ["not valid JSON: it is not UTF-8", "byte 0"], None),
    (b'{"messages": [{"role": "user", "content": "a\xed\xa0\x80"}]}', ["not UTF-8 (at byte 44)"], None),
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
     ["messages[0].content is not valid Unicode"], "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     ["messages[0].content[0].text is not valid Unicode"], "messages[0].content[0].text"),
    (_body()[:-1] + b', "stop": ["ok", "\\ud83d"]}', ["stop[1] is not valid Unicode"], "stop[1]"),
    (_body()[:-1] + b', "x\\udc00": 1}', ["the key x\\udc00 is not valid Unicode"], None),
    (b"{not json", ["not valid JSON", "line 1, column 2"], None),
    (b"", ["not valid JSON"], None),
    (b"[1, 2]", ["must be a JSON object"], None),
    (b'"messages"', ["must be a JSON object"], None),
])
def test_every_parse_failure_is_a_400_that_says_why(app, raw, needles, param):
    error = _assert_error(asyncio.run(_post_raw(app, raw)), 400, *needles)
    assert error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize("fields, needles, param", [
    ({"messages": "hi"}, ["messages: Input should be a valid list"], "messages"),
    ({"messages": [1]}, ["messages[0]: Input should be a JSON object"], "messages[0]"),
    ({"messages": [{"role": 5, "content": "x"}]}, ["messages[0].role"], "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, ["messages[0].content"], "messages[0].content"),
    ({"messages": [{"role": "user", "content": [5]}]}, ["messages[0].content[0]: Input should be a JSON object"],
     "messages[0].content"),
    ({"messages": [{"role": "user"}]}, ["messages[0].content: a user message needs content"], "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, ["a tool message needs tool_call_id"], "messages[0]"),
    ({"messages": [{"role": "user", "content": "x", "name": []}]}, ["messages[0].name"], "messages[0].name"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "a1B2c3D4e"}]}]},
     ["messages[0].tool_calls[0].function: Field required"], "messages[0].tool_calls[0].function"),
    ({"messages": [{"role": "assistant", "tool_calls": "x"}]}, ["messages[0].tool_calls"],
     "messages[0].tool_calls"),
    ({"messages": [1] * 100_000}, ["messages[0]: Input should be a JSON object"], "messages[0]"),
    ({"n": "x"}, ["n: Input should be a valid integer"], "n"),
    ({"n": 2**80}, ["n: Input should be less than or equal to 128"], "n"),
    ({"stream": "maybe"}, ["stream: Input should be a valid boolean"], "stream"),
    ({"stream_options": 5}, ["stream_options: Input should be a JSON object"], "stream_options"),
    ({"stop": 5}, ["stop: Input should be a valid string"], "stop"),
    ({"seed": "abc"}, ["seed: Input should be a valid integer"], "seed"),
    ({"max_tokens": []}, ["max_tokens: Input should be a valid integer"], "max_tokens"),
    ({"temperature": {}}, ["temperature: Input should be a valid number"], "temperature"),
    ({"logprobs": [], "top_logprobs": "x"}, ["logprobs", "top_logprobs"], "logprobs"),
    ({"model": 5}, ["model: Input should be a valid string"], "model"),
    ({"model": "m" * 1_000_000}, ["model: String should have at most 256 characters"], "model"),
    ({"user": 5}, ["user: Input should be a valid string"], "user"),
    ({"cache_salt": 5}, ["cache_salt: Input should be a valid string"], "cache_salt"),
    ({"cache_salt": ""}, ["cache_salt: String should have at least 1 character"], "cache_salt"),
    ({"cache_salt": "s" * 257}, ["cache_salt: String should have at most 256 characters"], "cache_salt"),
])
def test_wrong_types_and_sizes_get_a_400_naming_the_field(app, fields, needles, param):
    error = _assert_error(asyncio.run(_post_raw(app, _body(**fields))), 400, *needles)
    assert error["param"] == param and len(error["message"]) <= 2100


@pytest.mark.parametrize("fields, needles, param", [
    ({"suffix": "the end"}, ["suffix: not supported"], "suffix"),
    ({"best_of": 2}, ["best_of: values above 1 are not supported"], "best_of"),
    ({"prompt": ["a", [1, 2]]}, ["prompt: must be a string, a list of strings, token ids"], "prompt"),
    ({"prompt": [[1, 2], []]}, ["prompt: must be a string, a list of strings, token ids"], "prompt"),
    ({"prompt": ["a"] * 129}, ["prompt: at most 128 prompts per request, got 129"], "prompt"),
    ({"prompt": ["a"] * 9, "n": 2}, ["9 prompts x n=2 make 18 choices; this server allows at most 16"], "prompt"),
    ({"prompt": [[1], [2, 40000]]}, ["prompt[1] holds the token id 40000, outside the vocabulary"], "prompt"),
    ({"max_tokens": 0}, ["max_tokens: 0 is only allowed with echo"], "max_tokens"),
    ({"max_tokens": -1, "echo": True}, ["max_tokens: Input should be greater than or equal to 0"], "max_tokens"),
    ({"prompt": []}, ["prompt: must be a string, a list of strings, token ids"], "prompt"),
    ({"prompt": [1, True]}, ["prompt: must be a string"], "prompt"),
    ({"prompt": {"text": "hi"}}, ["prompt: must be a string"], "prompt"),
    ({"prompt": [1, 40000]}, ["token id 40000, outside the vocabulary"], "prompt"),
    ({"prompt": [-1]}, ["token id -1, outside the vocabulary"], "prompt"),
    ({"logprobs": 6}, ["logprobs: Input should be less than or equal to 5"], "logprobs"),
    ({"logprobs": True}, ["logprobs: Input should be a valid integer"], "logprobs"),
    ({"max_tokens": "5"}, ["max_tokens: Input should be a valid integer"], "max_tokens"),
    ({"stream_options": {"include_usage": True}}, ["stream_options is only allowed when stream is true"],
     "stream_options"),
    ({"logit_bias": {"40000": 1}}, ["logit_bias names token 40000, outside the vocabulary"], "logit_bias"),
    ({"logit_bias": {"x": 1}}, ["logit_bias keys must be token ids"], "logit_bias"),
    ({"logit_bias": {"5": 101}}, ["logit_bias values must be in [-100, 100]"], "logit_bias"),
    ({"model": "gpt-3.5-turbo-instruct"}, ["does not exist"], "model"),
])
def test_completions_refusals_name_the_field(app, fields, needles, param):
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 2, **fields}).encode()
    error = _assert_error(asyncio.run(_post_raw(app, body, path=COMPLETIONS)), 404 if param == "model" else 400,
                          *needles)
    assert error["param"] == param, error


def test_completions_reach_the_engine_as_plain_text_with_bos(tok):
    backend = _Recorder()
    app = _app(tok, backend)

    async def scenario() -> list[httpx.Response]:
        bodies = [{"prompt": "Hello world"}, {"prompt": ["Hello world"], "max_tokens": 3, "logprobs": 2, "top_k": -1},
                  {"prompt": [[1, 23325]], "logit_bias": {"7": -100, "5": 2.5}, "min_p": 0.1, "ignore_eos": True,
                   "n": 2, "echo": False, "suffix": None, "best_of": 1, "seed": 3},
                  {"prompt": None, "temperature": None, "stream": None, "logprobs": None, "n": None}]
        return [await _post_raw(app, json.dumps(b).encode(), path=COMPLETIONS) for b in bodies]

    responses = asyncio.run(scenario())
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "text_completion" and r.json()["system_fingerprint"]
    (p0, s0), (p1, s1), (p2, s2), (p3, s3) = backend.calls
    assert p0 == p1 == tok.encode("Hello world", bos=True) and p2 == [1, 23325] and p3 == [tok.bos_id]
    assert (s0.max_tokens, s0.logprobs, s0.top_logprobs) == (16, False, 0)  # OpenAI's default max_tokens
    assert (s1.max_tokens, s1.logprobs, s1.top_logprobs, s1.top_k) == (3, True, 2, 0)
    assert (s2.logit_bias, s2.min_p, s2.ignore_eos, s2.n, s2.seed) == (((5, 2.5), (7, -100)), 0.1, True, 2, 3)
    assert len(responses[2].json()["choices"]) == 2
    assert (s3.temperature, s3.n, s3.logprobs) == (0.5, 1, False)


def test_a_completion_keeps_its_first_space_and_its_logprobs_add_up_to_it(tok):
    """The detokenizer drops the leading space of a decode's first piece ("world" for "\u2581world"); a completion
    is read after its prompt, so it keeps it, and its logprob tokens and offsets match its text."""
    world = tok.encode("world")[-1]
    assert tok.piece(world) == "\u2581world"

    class Words(_Recorder):
        async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                           stream: bool = True) -> AsyncIterator[RequestOutput]:
            lp = TokenLogprobs(-0.5, [(world, -0.5), (tok.eos_id, -2.0)])
            yield RequestOutput(request_id, 0, "world", [world], [lp], prompt_tokens=len(prompt), completion_tokens=1)
            yield RequestOutput(request_id, 0, " world", [world, tok.eos_id], [lp, lp], finish_reason="stop",
                                prompt_tokens=len(prompt), completion_tokens=3)

    app = _app(tok, Words())
    body = json.dumps({"prompt": "Hello", "logprobs": 1}).encode()
    choice = asyncio.run(_post_raw(app, body, path=COMPLETIONS)).json()["choices"][0]
    assert choice["text"] == " world world" and choice["finish_reason"] == "stop"
    lps = choice["logprobs"]  # EOS is a control token: no part of the text, an entry "" among the logprobs
    assert lps["tokens"] == [" world", " world", ""] and lps["text_offset"] == [0, 6, 12]
    assert lps["token_logprobs"] == [-0.5] * 3 and lps["top_logprobs"][0] == {" world": -0.5, "": -2.0}
    streamed = asyncio.run(_post_raw(app, json.dumps({"prompt": "Hello", "stream": True}).encode(), path=COMPLETIONS))
    events = sse_chunks(streamed.text)
    assert "".join(e["choices"][0]["text"] for e in events) == " world world"


def test_valid_unicode_escapes_and_literal_backslashes_are_accepted(tok):
    backend = _Recorder()
    app = _app(tok, backend)
    raw = b'{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00 and \\\\ud800"}]}'
    response = asyncio.run(_post_raw(app, raw))
    assert response.status_code == 200, response.text
    assert backend.calls[0][0] == tok.encode_chat([{"role": "user", "content": "smile \U0001F600 and \\ud800"}])


def test_a_tool_call_chat_reaches_the_template_as_sent(tok):
    backend = _Recorder()
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "tool_calls": [{"id": "a1B2c3D4e", "type": "function",
                                                      "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": "22C and sunny"}]
    response = asyncio.run(_post_raw(_app(tok, backend), _body(messages=messages)))
    assert response.status_code == 200, response.text
    assert backend.calls[0][0] == tok.encode_chat(messages)


def test_the_chat_templates_own_refusals_pass_and_library_internals_do_not(tok, caplog):
    class Refusing:
        def __init__(self, cause: Exception):
            self.cause = cause

        def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
            raise TokenizerError(f"cannot encode the chat: {self.cause}") from self.cause

    messages = [ChatMessage(role="user", content="x")]
    cast = RuntimeError("Unable to cast Python instance of type <class 'str'> to C++ type '?'")
    with pytest.raises(APIError) as internal, caplog.at_level(logging.WARNING, logger="cluster.api.prompt"):
        encode_prompt(Refusing(cast), messages)
    assert internal.value.status == 400 and not INTERNALS.search(internal.value.message)
    assert "chat template" in internal.value.message
    assert any("RuntimeError" in r.getMessage() and not r.exc_info for r in caplog.records)
    own = InvalidMessageStructureException("Conversation must start with a user message or system message")
    with pytest.raises(APIError) as refused:
        encode_prompt(Refusing(own), messages)
    assert refused.value.message == f"cannot encode the chat: {own}"
    response = asyncio.run(_post_raw(_app(tok), _body(messages=[{"role": "assistant", "content": "hi"}])))
    _assert_error(response, 400, "Conversation must start with a user message")


# -- tokenizing off the event loop, within a budget ----------------------------------------------------------------
def test_a_chat_that_takes_longer_than_its_budget_to_tokenize_gets_400(tok):
    backend = _Recorder()
    app = _app(tok, backend, tokenize_budget_s=0.05)
    response = asyncio.run(_post_raw(app, _body(messages=[{"role": "user", "content": "tell me " * 200_000}])))
    error = _assert_error(response, 400, "0.05 s budget")
    assert error["code"] == "tokenize_budget_exceeded" and backend.calls == []


class _Held:
    """A tokenizer whose chat encoding of a large prompt says when it starts, then waits for `release` before it
    encodes: the test decides how long the encoding lasts."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.started, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        if len(messages[0]["content"]) > MiB:
            self.started.set()
            assert self.release.wait(120), "the test never released the encoding"
        return self.tokenizer.encode_chat(messages, tools)


async def _until_encoding(held: _Held, request: asyncio.Task) -> None:
    """Until `request`'s chat encoding has started (held on its worker thread); fails if the request ends first."""
    async def started() -> bool:
        assert not request.done(), f"the request ended before its chat was encoded: {(await request).text[:500]}"
        return held.started.is_set()

    await wait_until_async(started, 60, "the held chat encoding to start")


def test_health_answers_while_a_4_MiB_prompt_is_tokenized(tok):
    held = _Held(tok)
    backend = _Recorder()
    app = _app(held, backend, context_len=2**24, tokenize_budget_s=120)  # the whole prompt reaches the backend
    words = "the sea is calm tonight, said the naïve sailor 🙂 "
    content = words * ((4 * MiB - 1000) // len(words.encode()))
    raw = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 1},
                     ensure_ascii=False).encode()
    assert 4 * MiB - 2000 < len(raw) <= 4 * MiB

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            big = asyncio.create_task(client.post("/v1/chat/completions", content=raw,
                                                  headers={"content-type": "application/json"}))
            await _until_encoding(held, big)
            # The encoding is under way (held on its worker thread): /health must answer all the same.
            statuses = [(await asyncio.wait_for(client.get("/health"), 60)).status_code for _ in range(5)]
            held.release.set()
            return statuses, await big

    statuses, big = asyncio.run(scenario())
    assert statuses == [200] * 5
    assert big.status_code == 200, big.text[:500]
    assert len(backend.calls[0][0]) > 100_000


def test_a_small_chat_is_answered_while_a_large_prompt_holds_every_large_request_thread(tok):
    held = _Held(tok)
    backend = _Recorder()
    app = _app(held, backend, context_len=2**24, tokenize_budget_s=120, tokenize_threads=1)
    large = json.dumps({"messages": [{"role": "user", "content": "word " * (2 * MiB // 5)}], "max_tokens": 1}).encode()
    headers = {"content-type": "application/json"}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            big = asyncio.create_task(client.post(CHAT, content=large, headers=headers))
            await _until_encoding(held, big)
            small = await asyncio.wait_for(client.post(CHAT, content=_body(), headers=headers), 60)
            big_still_held = not big.done()
            held.release.set()
            return small, big_still_held, await big

    small, big_still_held, big = asyncio.run(scenario())
    assert (small.status_code, big_still_held, big.status_code) == (200, True, 200), small.text[:500]


# -- request fields and statuses -----------------------------------------------------------------------------------
def test_cache_salt_reaches_the_sampling_params(tok):
    backend = _Recorder()
    app = _app(tok, backend)

    async def scenario():
        return [await _post_raw(app, _body(cache_salt="tenant-a")), await _post_raw(app, _body())]

    for response in asyncio.run(scenario()):
        assert response.status_code == 200, response.text
    assert [params.cache_salt for _, params in backend.calls] == ["tenant-a", None]


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_queue_gets_429_with_retry_after(tok, stream):
    response = asyncio.run(_post_raw(_app(tok, _Recorder(status=429)), _body(stream=stream, n=2)))
    error = _assert_error(response, 429, "waiting queue is full")
    assert error["type"] == "rate_limit_error" and int(response.headers["retry-after"]) > 0


# -- fuzz: generated and mutated bodies over a real engine ---------------------------------------------------------
class Raw:
    """JSON text put into a body as it is: what json.dumps cannot write (NaN spelled out, 5000 digits, deep nests)."""

    def __init__(self, text: str):
        self.text = text


def _dumps(value: Any, ensure_ascii: bool) -> bytes:
    raws: list[str] = []

    def placeholder(obj: Any) -> str:
        assert isinstance(obj, Raw)
        raws.append(obj.text)
        return f"@@raw{len(raws) - 1}@@"

    text = json.dumps(value, ensure_ascii=ensure_ascii, default=placeholder)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', raw, 1)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate, written raw: bytes that are not UTF-8


# Values chosen so that no body asks for a long generation: small or refused integers, and no digits in random text
# (pydantic reads "500" as an int).
EDGE_INTS = [-1, 0, 1, 2, 3, 4097, 2**31, 2**63, -2**63 - 1, 10**30]
EDGE_FLOATS = [0.5, -0.5, 2.0, 2.5, 1e308, -0.0]
RAW = ["1" * 5000, "-" + "9" * 4400, "1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1" * 4000 + ".5",
       "[" * 5000 + "]" * 5000, "[" * 100_000 + "]" * 100_000, '{"a":' * 2000 + "1" + "}" * 2000]
NASTY = ["", "\ud800", "a\udfffb", "\ud83d\ude00", "\x00", "[INST]", "</s>", "\u202e", "\\ud800", "x" * 100_000,
         "é" * 30_000, "x" * (5 * MiB)]
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
          "stream", "stream_options", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "user",
          "cache_salt", "tools", "unknown"]
MESSAGE_FIELDS = ["role", "content", "name", "tool_call_id", "tool_calls", "unknown"]
SNIPPETS = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\\ud800", b"NaN", b"\x00", b'"', b"{", b"]", b",", b"1" * 5000]

text = st.text(st.characters(exclude_categories=["Nd", "Cs"]), max_size=12)
leaves = st.one_of(st.none(), st.booleans(), st.sampled_from(EDGE_INTS), st.sampled_from(EDGE_FLOATS), text,
                   st.sampled_from(NASTY), st.sampled_from(RAW).map(Raw))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                      max_leaves=10)
content = st.one_of(text.filter(bool), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                                                min_size=1, max_size=2))
chats = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": content}), min_size=1, max_size=2),
    st.tuples(text.filter(bool), content, text, content).map(lambda t: [
        {"role": "system", "content": t[0]}, {"role": "user", "content": t[1]},
        {"role": "assistant", "content": t[2] or "ok"}, {"role": "user", "content": t[3]}]))
valid = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": chats, "max_tokens": st.integers(1, 2),
     "max_completion_tokens": st.integers(1, 2)},
    optional={"temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "n": st.integers(1, 2),
              "stop": st.lists(text.filter(bool), max_size=2), "seed": st.integers(0, 2**32),
              "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
              "frequency_penalty": st.floats(-2, 2), "presence_penalty": st.floats(-2, 2),
              "logprobs": st.just(True), "top_logprobs": st.integers(0, 3), "user": text,
              "cache_salt": text.filter(bool)})


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """(how the body was made, the body): a valid request, one with a field or a message changed, or bytes."""
    kind = draw(st.sampled_from(["valid", "field", "field", "field", "drop", "message", "message", "bytes", "bytes",
                                 "random", "raw"]))
    body = draw(valid)
    if kind == "field":
        body[draw(st.sampled_from(FIELDS))] = draw(values)
    elif kind == "drop":
        body.pop(draw(st.sampled_from(sorted(body))))
    elif kind == "message":
        messages = body["messages"]
        i = draw(st.integers(0, len(messages) - 1))
        if draw(st.booleans()):
            messages[i] = draw(values)
        else:
            messages[i] = {**messages[i], draw(st.sampled_from(MESSAGE_FIELDS)): draw(values)}
    elif kind == "random":
        return kind, draw(st.binary(max_size=64))
    elif kind == "raw":
        return kind, draw(st.sampled_from(RAW + ["", "null", "[]", '"x"', "{}"])).encode()
    raw = _dumps(body, ensure_ascii=draw(st.booleans()))
    if kind == "bytes":  # a few edits of the encoded body
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(raw)))
            cut = draw(st.integers(0, 4))
            raw = raw[:at] + draw(st.sampled_from(SNIPPETS) | st.binary(max_size=4)) + raw[at + cut:]
    return kind, raw


async def _chunked(raw: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(raw), 64 * 1024):
        yield raw[i:i + 64 * 1024]


def _check(response: httpx.Response, kind: str, raw: bytes, path: str = CHAT) -> None:
    where = f"{kind} body for {path}: {raw[:300]!r}"
    assert response.status_code < 500, f"{response.status_code} {response.text[:500]} for {where}"
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, f"{error} for {where}"
        assert isinstance(error["message"], str) and isinstance(error["type"], str), where
        assert not INTERNALS.search(error["message"]), f"{error['message']} for {where}"
        return
    obj = "chat.completion" if path == CHAT else "text_completion"
    if response.headers["content-type"].startswith("text/event-stream"):
        chunks = sse_chunks(response.text)
        assert all("error" not in c for c in chunks), f"{response.text[:500]} for {where}"
        assert all(c["object"] == (obj + ".chunk" if path == CHAT else obj) for c in chunks), where
    else:
        assert response.json()["object"] == obj, where


@pytest.fixture(scope="module")
def fuzz_app(tiny_dir) -> Iterator[tuple[Any, AsyncEngine]]:
    """The API over a real tiny engine with the grammar guide (so tool and schema requests reach it)."""
    loaded = load_model(tiny_dir, "fp32")
    version = resolve_tokenizer_version(loaded.config)
    tokenizer = load_tokenizer(version)

    def factory() -> LLMEngine:
        cache = 512 * kv_bytes_per_block(loaded.config, 16, torch.float32)
        return LLMEngine(loaded.model, tokenizer.decode, tokenizer.eos_id, EngineConfig(kv_cache_bytes=cache),
                         GrammarGuide.for_tokenizer(version))

    front = AsyncEngine(factory)
    app = build_api(EngineBackend(front), tokenizer, MODEL, loaded.config.max_position_embeddings,
                    SamplingDefaults.for_model(loaded.config))
    yield app, front
    front.shutdown()


def _fuzz(app, front: AsyncEngine, strategy: st.SearchStrategy, examples: int, caplog) -> dict[int, int]:
    """Posts `examples` bodies drawn from `strategy` ((kind, path, raw) triples), each checked by `_check`; then
    the server must answer /health with 200 and hold no request or block. Returns how many of each (kind, status)."""
    statuses: dict[tuple[str, int], int] = {}

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(strategy, st.booleans())
    def post(made: tuple[str, str, bytes], chunked: bool) -> None:
        kind, path, raw = made
        response = asyncio.run(_post_raw(app, _chunked(raw) if chunked else raw, path=path))
        _check(response, kind, raw, path)
        if response.status_code == 400 and kind in ("tools", "json_schema") and \
                "max_tokens" in response.json()["error"]["message"]:
            kind += " over max_tokens"  # a forced output longer than the budget: refused as documented (issue 24)
        statuses[kind, response.status_code] = statuses.get((kind, response.status_code), 0) + 1

    async def health_and_stats() -> tuple[httpx.Response, EngineStats]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            health = await client.get("/health")
        deadline = time.monotonic() + 10
        while True:
            stats = await asyncio.wrap_future(front.call(lambda e: e.stats()))
            if stats.running == 0 and stats.waiting == 0 or time.monotonic() > deadline:
                return health, stats
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.WARNING, logger="cluster"):
        post()
    health, stats = asyncio.run(health_and_stats())
    assert sum(statuses.values()) >= examples, statuses
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert stats.running == 0 and stats.free_blocks == stats.total_blocks, stats
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in caplog.records]
    return statuses


@pytest.mark.e2e  # the HTTP stack over a real engine
def test_fuzzed_bodies_never_get_a_5xx_and_leave_the_engine_clean(fuzz_app, caplog):
    counts = _fuzz(*fuzz_app, bodies().map(lambda made: (made[0], CHAT, made[1])), 1500, caplog)
    statuses = {status: sum(n for (_, s), n in counts.items() if s == status) for _, status in counts}
    assert statuses.get(200, 0) >= 100 and len(statuses) >= 3, statuses  # the mix reached the engine and refusals


# -- fuzz: tools, tool_choice, response_format, logit_bias, nulls, and /v1/completions (issue 17) ------------------
VOCAB = 32768  # the v3 tokenizer's
TOOL_NAMES = ["get_weather", "f", "a-b_c", "x" * 64]
BAD_NAMES = ["", "x" * 65, "has space", "naïve", "a.b", 5, None]
_DEEP: dict = {}
for _ in range(100):
    _DEEP = {"type": "object", "properties": {"a": _DEEP}}
BAD_SCHEMAS = [{"type": "no-such-type"}, {"type": 5}, {"properties": []}, {"type": "object", "required": ["missing"]},
               {"$ref": "#/$defs/nowhere"}, {"type": "string", "pattern": "("}, {"type": "string", "pattern": "[a-"},
               {"type": "string", "minLength": 5, "maxLength": 2}, {"type": "integer", "minimum": 5, "maximum": 1},
               {"enum": []}, {"allOf": [{"type": "string"}, {"type": "integer"}]}, {"not": {}},
               {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
               {"type": "string", "format": "date-time"}, {"type": ["string", "null"]},
               {"type": "number", "minimum": 1e308},
               {"type": "object", "additionalProperties": {"type": "integer"}}, {"oneOf": [{"type": "string"}] * 2},
               {"type": "array", "prefixItems": [{"type": "integer"}], "items": False}, {"if": {}, "then": {}},
               {"type": "object", "properties": {"a" * 10_000: {}}}, {"type": "object", "minProperties": 3},
               {"type": "string", "minLength": 10_000}, _DEEP, [], "string", 5, None, True]
good_schemas = st.recursive(
    st.sampled_from([{"type": "string", "maxLength": 8}, {"type": "integer", "minimum": 0, "maximum": 9},
                     {"type": "boolean"}, {"enum": ["a", "b", 3]}, {"type": "null"}, {"type": "number"},
                     {"const": "x"}, {}]),
    lambda inner: st.one_of(
        st.dictionaries(st.sampled_from(["a", "b", "c d", "é", ""]), inner, max_size=3).map(
            lambda props: {"type": "object", "properties": props, "required": sorted(props)[:1],
                           "additionalProperties": False}),
        inner.map(lambda item: {"type": "array", "items": item, "maxItems": 2}),
        st.lists(inner, min_size=1, max_size=2).map(lambda items: {"anyOf": items})),
    max_leaves=6)
schemas = st.one_of(good_schemas, good_schemas, st.sampled_from(BAD_SCHEMAS), values)
tool = st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.sampled_from(TOOL_NAMES)},
        optional={"description": text, "parameters": schemas, "strict": st.one_of(st.booleans(), st.none())})})
bad_tool = st.one_of(
    values,
    tool.flatmap(lambda t: st.sampled_from(["type", "function"]).flatmap(
        lambda key: values.map(lambda v: {**t, key: v}))),
    tool.flatmap(lambda t: st.sampled_from(BAD_NAMES).map(
        lambda name: {**t, "function": {**t["function"], "name": name}})))
tools = st.one_of(st.lists(tool, min_size=1, max_size=3), st.lists(st.one_of(tool, bad_tool), min_size=1, max_size=3),
                  st.just([{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]), values)
tool_choices = st.one_of(
    st.sampled_from(["none", "auto", "required", "any", "", "REQUIRED", None]),
    st.sampled_from(TOOL_NAMES + ["missing"]).map(lambda n: {"type": "function", "function": {"name": n}}),
    st.sampled_from([{}, {"type": "function"}, {"type": "function", "function": {}},
                     {"type": "function", "function": {"name": 5}}, {"type": "tool", "function": {"name": "f"}},
                     {"function": {"name": "f"}}]),
    values)
response_formats = st.one_of(
    st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "xml"}, {"type": "json_schema"}, {},
                     {"type": None}, "json", {"type": "json_schema", "json_schema": {"name": "s"}}]),
    st.builds(lambda name, schema, strict: {"type": "json_schema",
                                            "json_schema": {"name": name, "schema": schema, "strict": strict}},
              st.sampled_from(TOOL_NAMES + BAD_NAMES), schemas, st.one_of(st.booleans(), st.none(), values)),
    values)
BIAS_KEYS = ["0", "1", "2", "13", "32767", "32768", "999999999", "9999999999", "-1", "1.5", "abc", "", " 12",
             "\uff11\uff12", "0x1f"]
bias_values = st.one_of(st.floats(-100, 100), st.integers(-100, 100),
                        st.sampled_from([-100.5, 101, 1e308, -1e308, "5", None, True, [], {}]))
logit_biases = st.one_of(st.dictionaries(st.sampled_from(BIAS_KEYS), bias_values, max_size=4),
                         st.just({str(i): 1 for i in range(301)}), values)
CALL_ID = "call_DdmO9pD3xa9XTPNJ32zg2hcA"
TOOL_CHAT = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": CALL_ID, "type": "function",
                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
             {"role": "tool", "tool_call_id": CALL_ID, "name": "get_weather", "content": "22C"}]


@st.composite
def tool_chats(draw: st.DrawFn) -> list:
    """A chat holding an OpenAI-style tool call and its result, possibly with one field of one message changed."""
    messages = [dict(m) for m in TOOL_CHAT]
    if draw(st.booleans()):
        i = draw(st.integers(0, len(messages) - 1))
        field = draw(st.sampled_from(MESSAGE_FIELDS + ["tool_call_id", "tool_calls"]))
        messages[i][field] = draw(st.one_of(values, st.sampled_from(["call_other", "a1B2c3D4e", "", CALL_ID]),
                                            st.sampled_from(["developer", "function", "tool", "system"])))
    return messages


# Nullable fields: each may come as an explicit null (the openai SDK sends null for None).
CHAT_NULLABLE = ["n", "stream", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "temperature",
                 "top_p", "seed", "stop", "stream_options", "user", "max_completion_tokens", "logit_bias",
                 "parallel_tool_calls", "top_k", "min_p", "ignore_eos", "model"]
COMPLETION_NULLABLE = ["prompt", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "stream",
                       "stream_options", "logprobs", "echo", "suffix", "best_of", "frequency_penalty",
                       "presence_penalty", "logit_bias", "ignore_eos", "user", "model"]


def nullable_or(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), strategy)


good_biases = st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100) | st.integers(-100, 100),
                              max_size=5)
sampling = {"temperature": nullable_or(st.floats(0, 2)), "top_p": nullable_or(st.floats(0, 1)),
            "top_k": nullable_or(st.integers(-1, 50)), "min_p": nullable_or(st.floats(0, 1)),
            "n": nullable_or(st.integers(1, 2)), "seed": nullable_or(st.integers(0, 2**32)),
            "stop": nullable_or(st.lists(text.filter(bool), max_size=2)), "frequency_penalty": nullable_or(
                st.floats(-2, 2)), "presence_penalty": nullable_or(st.floats(-2, 2)), "logit_bias": good_biases,
            "ignore_eos": nullable_or(st.booleans()), "user": nullable_or(text)}
# max_tokens: mostly tiny, sometimes enough for a short call or JSON value to complete (and be parsed)
budgets = st.sampled_from([1, 2, 6])
good_tools = st.lists(st.builds(lambda name, params: {"type": "function", "function": {"name": name,
                                                                                      "parameters": params}},
                                st.sampled_from(TOOL_NAMES), good_schemas.filter(lambda sc: "properties" in sc)),
                      min_size=1, max_size=3, unique_by=lambda t: t["function"]["name"])


@st.composite
def good_chat(draw: st.DrawFn, mode: str) -> dict:
    """A chat body the API should accept: tools with a valid tool_choice, a JSON response_format, or neither."""
    body = draw(st.fixed_dictionaries(
        {"model": st.just(MODEL), "messages": st.one_of(chats, st.just(TOOL_CHAT)), "max_tokens": budgets},
        optional={**sampling, "stream": nullable_or(st.booleans()), "logprobs": st.just(True),
                  "top_logprobs": nullable_or(st.integers(0, 2))}))
    if body.get("stream"):
        body["stream_options"] = draw(nullable_or(st.fixed_dictionaries({"include_usage": st.booleans()})))
    if mode == "tools":
        body["tools"] = draw(good_tools)
        names = [t["function"]["name"] for t in body["tools"]]
        body["tool_choice"] = draw(st.sampled_from(["auto", "none", "required", None] + [
            {"type": "function", "function": {"name": n}} for n in names]))
        body["parallel_tool_calls"] = draw(nullable_or(st.booleans()))
    elif mode == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "out", "schema": draw(good_schemas), "strict": draw(nullable_or(st.booleans()))}}
    elif mode == "json_object":
        body["response_format"] = {"type": "json_object"}
    for name in draw(st.lists(st.sampled_from(CHAT_NULLABLE), max_size=4, unique=True)):
        body[name] = None
    return _consistent(body)


def _consistent(body: dict) -> dict:
    """Without what OpenAI refuses once nulls replaced values: top_logprobs without logprobs, stream_options
    without stream."""
    if not body.get("logprobs") and body.get("top_logprobs"):
        del body["top_logprobs"]
    if not body.get("stream") and body.get("stream_options") is not None:
        del body["stream_options"]
    return body


@st.composite
def good_completion(draw: st.DrawFn) -> dict:
    ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5)
    prompt = st.one_of(text, st.lists(text, min_size=1, max_size=3), ids, st.lists(ids, min_size=1, max_size=3))
    body = draw(st.fixed_dictionaries(
        {"model": st.just(MODEL), "prompt": prompt, "max_tokens": budgets},
        optional={**sampling, "logprobs": nullable_or(st.integers(0, 5)), "echo": nullable_or(st.booleans()),
                  "suffix": st.sampled_from(["", None]), "best_of": st.sampled_from([1, None]),
                  "stream": nullable_or(st.booleans()), "cache_salt": text.filter(bool)}))
    if body.get("stream"):
        body["stream_options"] = draw(nullable_or(st.fixed_dictionaries({"include_usage": nullable_or(
            st.booleans())})))
    for name in draw(st.lists(st.sampled_from(COMPLETION_NULLABLE), max_size=4, unique=True)):
        body[name] = None
    return _consistent(body)


bad_chat = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": st.one_of(chats, tool_chats()), "max_tokens": st.integers(1, 3)},
    optional={"tools": tools, "tool_choice": tool_choices, "parallel_tool_calls": nullable_or(st.booleans() | values),
              "response_format": response_formats, "logit_bias": logit_biases,
              "top_k": nullable_or(st.integers(-2, 50) | values), "min_p": nullable_or(st.floats(0, 1) | values),
              "ignore_eos": nullable_or(st.booleans() | values), "stream": nullable_or(st.booleans()),
              "n": nullable_or(st.integers(1, 2)), "seed": nullable_or(st.integers(0, 2**32))})
prompts = st.one_of(text, st.lists(text, min_size=1, max_size=2), st.lists(st.integers(-1, VOCAB), max_size=5),
                    st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=4), max_size=2), st.sampled_from(NASTY),
                    st.none(), values)
bad_completion = st.fixed_dictionaries(
    {"model": st.just(MODEL), "prompt": prompts, "max_tokens": st.integers(1, 3)},
    optional={"logprobs": st.one_of(st.none(), st.integers(-1, 6), st.booleans(), values),
              "echo": st.one_of(st.none(), st.booleans(), values), "suffix": st.one_of(st.none(), text, values),
              "best_of": st.one_of(st.none(), st.integers(0, 3), values), "logit_bias": logit_biases,
              "stream": nullable_or(st.booleans()), "stream_options": nullable_or(values),
              "top_k": nullable_or(st.integers(-2, 50) | values), "n": nullable_or(st.integers(1, 2))})
NEW_KINDS = ["tools", "tools", "json_schema", "json_object", "plain", "completion", "completion", "bad chat",
             "bad completion", "field", "bytes"]


@st.composite
def new_field_bodies(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(kind, route, body): a chat body using the fields of issue 17 (valid, or with malformed tools, tool_choice,
    response_format schemas and logit_bias), a /v1/completions body (valid or not), or a valid one of either with
    one field replaced by any JSON value ("field") or a few bytes edited ("bytes")."""
    kind = draw(st.sampled_from(NEW_KINDS))
    if kind in ("field", "bytes"):
        path = draw(st.sampled_from([CHAT, COMPLETIONS]))
        body = draw(good_chat(draw(st.sampled_from(["tools", "json_schema"]))) if path == CHAT else good_completion())
    else:
        path = COMPLETIONS if kind.endswith("completion") else CHAT
        if kind == "completion":
            body = draw(good_completion())
        elif kind.startswith("bad"):
            body = draw(bad_chat if path == CHAT else bad_completion)
        else:
            body = draw(good_chat(kind))
    if kind == "field":
        body[draw(st.sampled_from(sorted(body) + ["unknown"]))] = draw(values)
    raw = _dumps(body, ensure_ascii=draw(st.booleans()))
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(raw)))
            cut = draw(st.integers(0, 4))
            raw = raw[:at] + draw(st.sampled_from(SNIPPETS) | st.binary(max_size=4)) + raw[at + cut:]
    return kind, path, raw


@pytest.mark.e2e  # the HTTP stack over a real engine
def test_fuzzed_tool_schema_bias_null_and_completion_bodies_never_get_a_5xx(fuzz_app, caplog):
    counts = _fuzz(*fuzz_app, new_field_bodies(), 1000, caplog)
    # Each kind of valid body reached the engine, and each kind of bad one was refused, many times over.
    for kind in ("tools", "json_schema", "json_object", "plain", "completion"):
        assert counts.get((kind, 200), 0) >= 25, counts
        assert counts.get((kind, 400), 0) == 0, counts  # a valid body is never refused
    for kind in ("bad chat", "bad completion", "field", "bytes"):
        assert counts.get((kind, 400), 0) >= 25, counts
