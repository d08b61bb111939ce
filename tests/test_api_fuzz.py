"""Bad input gets a 4xx in OpenAI's error shape, never a 5xx, a held connection or a stalled server (issue 16).

Targeted tests drive the API in process over a recording backend (no engine): the body limit (413 before the body
is read), the body timeout (408; through a real uvicorn, the connection is closed), each way a body can fail to
parse, the tokenization budget, `/health` during a 4 MiB prompt, `cache_salt` and `Retry-After` on 429. The fuzz
test (e2e) posts 2000 generated and mutated bodies (hypothesis, derandomized) to the API over a real tiny engine.
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

from cluster.api.backend import EngineBackend
from cluster.api.errors import APIError
from cluster.api.limits import MiB, APILimits
from cluster.api.prompt import encode_prompt
from cluster.api.protocol import ChatMessage
from cluster.api.server import build_api
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.engine.outputs import RequestOutput
from cluster.engine.paged_cache import kv_bytes_per_block
from cluster.engine.sampling_params import SamplingDefaults, SamplingParams
from cluster.model.loader import load_model
from cluster.serve.health import Health
from cluster.tokenizer import Tokenizer, TokenizerError, load_tokenizer, resolve_tokenizer_version

MODEL = "mixtral-tiny"
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


def _app(tokenizer: Any, backend: Any = None, **limits: Any):
    return build_api(backend or _Recorder(), tokenizer, MODEL, 4096, SamplingDefaults(temperature=0.5),
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


async def _post_raw(app, content: bytes | AsyncIterator[bytes], headers: dict | None = None) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.post("/v1/chat/completions", content=content,
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
def _uvicorn(app) -> Iterator[int]:
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
    with _uvicorn(app) as port:
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
    ({"messages": [{"role": "user"}]}, ["messages[0]: a user message needs content"], "messages[0]"),
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

        def encode_chat(self, messages: list[dict]) -> list[int]:
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


class _Watched:
    """A tokenizer that says when a chat encoding starts and ends."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.started, self.done = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if len(messages[0]["content"]) > MiB:
            self.started.set()
        try:
            return self.tokenizer.encode_chat(messages)
        finally:
            if len(messages[0]["content"]) > MiB:
                self.done.set()


def test_health_answers_while_a_4_MiB_prompt_is_tokenized(tok):
    watched = _Watched(tok)
    backend = _Recorder()
    app = _app(watched, backend, tokenize_budget_s=120)
    words = "the sea is calm tonight, said the naïve sailor 🙂 "
    content = words * ((4 * MiB - 1000) // len(words.encode()))
    raw = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 1},
                     ensure_ascii=False).encode()
    assert 4 * MiB - 2000 < len(raw) <= 4 * MiB

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            big = asyncio.create_task(client.post("/v1/chat/completions", content=raw))
            while not watched.started.is_set():
                await asyncio.sleep(0.005)
            latencies = []
            for _ in range(5):
                started = time.monotonic()
                health = await client.get("/health")
                latencies.append(time.monotonic() - started)
                assert health.status_code == 200
                await asyncio.sleep(0.02)
            in_flight = not watched.done.is_set()
            return latencies, in_flight, await big

    latencies, in_flight, big = asyncio.run(scenario())
    assert in_flight, "the prompt was tokenized before /health was measured: the test measured nothing"
    assert max(latencies) < 0.5, latencies
    assert big.status_code == 200, big.text[:500]
    assert len(backend.calls[0][0]) > 100_000


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


def _check(response: httpx.Response, kind: str, raw: bytes) -> None:
    where = f"{kind} body {raw[:300]!r}"
    assert response.status_code < 500, f"{response.status_code} {response.text[:500]} for {where}"
    if response.status_code != 200:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and isinstance(error["type"], str), where
        assert not INTERNALS.search(error["message"]), f"{error['message']} for {where}"
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [block.removeprefix("data: ") for block in response.text.split("\n\n") if block]
        assert events[-1] == "[DONE]", where
        assert all("error" not in json.loads(e) for e in events[:-1]), f"{response.text[:500]} for {where}"
    else:
        assert response.json()["object"] == "chat.completion", where


@pytest.mark.e2e  # the HTTP stack over a real engine
def test_fuzzed_bodies_never_get_a_5xx_and_leave_the_engine_clean(tiny_dir, caplog):
    loaded = load_model(tiny_dir, "fp32")
    tokenizer = load_tokenizer(resolve_tokenizer_version(loaded.config))

    def factory() -> LLMEngine:
        cache = 512 * kv_bytes_per_block(loaded.config, 16, torch.float32)
        return LLMEngine(loaded.model, tokenizer.decode, tokenizer.eos_id, EngineConfig(kv_cache_bytes=cache))

    front = AsyncEngine(factory)
    app = build_api(EngineBackend(front), tokenizer, MODEL, loaded.config.max_position_embeddings,
                    SamplingDefaults.for_model(loaded.config))
    statuses: dict[int, int] = {}

    @settings(max_examples=2000, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(bodies(), st.booleans())
    def post(made: tuple[str, bytes], chunked: bool) -> None:
        kind, raw = made
        response = asyncio.run(_post_raw(app, _chunked(raw) if chunked else raw))
        _check(response, kind, raw)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    async def health_and_stats() -> tuple[httpx.Response, dict]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            health = await client.get("/health")
        deadline = time.monotonic() + 10
        while True:
            stats = await asyncio.wrap_future(front.call(lambda e: e.stats()))
            if stats["running"] == 0 and stats["waiting"] == 0 or time.monotonic() > deadline:
                return health, stats
            await asyncio.sleep(0.01)

    try:
        with caplog.at_level(logging.WARNING, logger="cluster"):
            post()
        health, stats = asyncio.run(health_and_stats())
    finally:
        front.shutdown()
    assert sum(statuses.values()) >= 2000, statuses
    assert statuses.get(200, 0) >= 100 and len(statuses) >= 3, statuses  # the mix reached the engine and refusals
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert stats["running"] == 0 and stats["free_blocks"] == stats["total_blocks"], stats
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in caplog.records]
