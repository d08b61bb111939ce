"""The HTTP API on a real in-process engine (tiny checkpoint): JSON and SSE completions, errors, disconnects."""

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import openai
import pytest
import torch

from cluster.api.server import build_api
from cluster.config import ModelConfig
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.engine.outputs import RequestOutput
from cluster.engine.paged_cache import kv_bytes_per_block
from cluster.engine.sampling_params import SamplingDefaults, SamplingParams
from cluster.health import Health
from cluster.model.loader import load_model
from cluster.parallel.dispatch import UnavailableError
from cluster.serve.engine_backend import EngineBackend
from cluster.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer_version
from tests.http import DONE, sse_chunks

pytestmark = pytest.mark.e2e  # the whole HTTP stack, from requests through the app to a real engine

MODEL = "mixtral-tiny"
HELLO = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say hello in French."}]


@dataclass
class Served:
    app: Any
    front: AsyncEngine
    tok: Tokenizer
    context_len: int


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model(tiny_dir, "fp32")


@pytest.fixture(scope="module")
def tok(loaded):
    return load_tokenizer(resolve_tokenizer_version(loaded.config))


def _serve(loaded, tok, run_wrapper=None) -> Served:
    def factory() -> LLMEngine:
        blocks = 512 * kv_bytes_per_block(loaded.config, 16, torch.float32)
        engine = LLMEngine(loaded.model, tok.decode, tok.eos_id, EngineConfig(kv_cache_bytes=blocks))
        if run_wrapper is not None:
            engine.runner.run = run_wrapper(engine.runner.run)
        return engine

    front = AsyncEngine(factory)
    context_len = loaded.config.max_position_embeddings
    defaults = SamplingDefaults.for_model(loaded.config)
    return Served(build_api(EngineBackend(front), tok, MODEL, context_len, defaults), front, tok, context_len)


@pytest.fixture(scope="module")
def served(loaded, tok):
    s = _serve(loaded, tok)
    yield s
    s.front.shutdown()


@asynccontextmanager
async def _client(app) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


async def _post(app, body: dict) -> httpx.Response:
    async with _client(app) as client:
        return await client.post("/v1/chat/completions", json=body)


def _events(response: httpx.Response) -> list[Any]:
    """The SSE `data:` payloads, JSON-decoded except the final "[DONE]"."""
    assert response.headers["content-type"].startswith("text/event-stream")
    return [*sse_chunks(response.text), DONE]


def _streamed_text(events: list[Any], n: int = 1) -> list[str]:
    texts = [""] * n
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
    return texts


async def _engine_direct(front: AsyncEngine, prompt: list[int], params: SamplingParams) -> dict[int, dict]:
    """The engine's own result per choice, without the API."""
    results: dict[int, dict] = {}
    async for out in await front.add_request(f"direct-{uuid.uuid4().hex}", prompt, params):
        r = results.setdefault(out.index, {"tokens": [], "text": ""})
        r["tokens"] += out.token_ids
        r["text"] += out.text
        r["finish"] = out.finish_reason
    return results


async def _engine_idle(front: AsyncEngine, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await asyncio.wrap_future(front.call(lambda e: not e.requests and not e.has_work())):
            return True
        await asyncio.sleep(0.01)
    return False


def _assert_error(response: httpx.Response, status: int, *needles: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in error["message"]
    return error


# -- completions -----------------------------------------------------------------------------------------------------
def test_greedy_completion_equals_the_engine_and_streams_the_same(served):
    prompt = served.tok.encode_chat(HELLO)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 24, "temperature": 0}

    async def scenario():
        direct = await _engine_direct(served.front, prompt, SamplingParams(max_tokens=24, temperature=0))
        return direct[0], await _post(served.app, body), await _post(served.app, {**body, "stream": True})

    direct, plain, streamed = asyncio.run(scenario())
    assert plain.status_code == 200
    completion = plain.json()
    assert completion["id"].startswith("chatcmpl-") and len(completion["id"]) > len("chatcmpl-") + 16
    assert completion["object"] == "chat.completion" and completion["model"] == MODEL
    (choice,) = completion["choices"]
    assert choice["message"] == {"role": "assistant", "content": served.tok.decode(direct["tokens"]), "refusal": None}
    assert choice["finish_reason"] == direct["finish"] and choice["logprobs"] is None
    usage = completion["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(prompt), len(direct["tokens"]))
    assert usage["total_tokens"] == len(prompt) + len(direct["tokens"])
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < len(prompt)

    events = _events(streamed)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"] != completion["id"]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert _streamed_text(events) == [choice["message"]["content"]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [direct["finish"]]


def test_default_max_tokens_fit_the_context(served):
    # No max_tokens: min(the default, context - prompt), so a long prompt still fits; the default alone would not.
    messages = [{"role": "user", "content": "word " * (served.context_len - 40)}]
    prompt = served.tok.encode_chat(messages)
    room = served.context_len - len(prompt)
    assert 0 < room < SamplingDefaults(temperature=0).max_tokens

    async def scenario():
        direct = await _engine_direct(served.front, prompt, SamplingParams(max_tokens=room, temperature=0))
        return direct[0], await _post(served.app, {"messages": messages, "temperature": 0})

    direct, response = asyncio.run(scenario())
    assert response.status_code == 200, response.text
    usage, choice = response.json()["usage"], response.json()["choices"][0]
    # The API ran exactly the engine's greedy request with max_tokens = room: same length, same ending.
    assert (usage["completion_tokens"], choice["finish_reason"]) == (len(direct["tokens"]), direct["finish"])
    assert usage["total_tokens"] <= served.context_len
    assert direct["finish"] == "stop" or len(direct["tokens"]) == room


def test_default_temperature_by_model_family():
    configs = Path(__file__).parent / "data" / "configs"

    def temperature(name: str) -> float:
        return SamplingDefaults.for_model(ModelConfig.from_file(configs / name)).temperature

    assert temperature("mistral-7b-instruct-v0.2") == 0.3
    assert temperature("mixtral-8x22b-instruct") == 0.5
    assert temperature("mixtral-8x7b-instruct") == 0.5


def test_n_choices_with_a_seed_are_reproducible_and_match_the_engine(served):
    prompt = served.tok.encode_chat(HELLO)
    body = {"messages": HELLO, "n": 2, "seed": 7, "temperature": 1.0, "max_tokens": 12}
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=2)

    async def scenario():
        direct = await _engine_direct(served.front, prompt, params)
        return direct, await _post(served.app, body), await _post(served.app, body), \
            await _post(served.app, {**body, "stream": True})

    direct, first, again, streamed = asyncio.run(scenario())
    choices = first.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    texts = [c["message"]["content"] for c in choices]
    assert texts == [direct[0]["text"], direct[1]["text"]] and texts[0] != texts[1]
    assert [c["message"]["content"] for c in again.json()["choices"]] == texts
    assert first.json()["usage"]["completion_tokens"] == sum(len(d["tokens"]) for d in direct.values())
    events = _events(streamed)
    assert _streamed_text(events, 2) == texts
    firsts = {}
    for e in events[:-1]:
        for c in e["choices"]:
            firsts.setdefault(c["index"], c["delta"])
    assert all(d.get("role") == "assistant" for d in firsts.values()) and set(firsts) == {0, 1}


def test_stop_strings_are_never_returned(served):
    async def scenario():
        full = await _post(served.app, {"messages": HELLO, "max_tokens": 40, "temperature": 0})
        text = full.json()["choices"][0]["message"]["content"]
        stop = text[len(text) // 2:len(text) // 2 + 3]
        body = {"messages": HELLO, "max_tokens": 40, "temperature": 0, "stop": ["never-there", stop]}
        return text, stop, await _post(served.app, body), await _post(served.app, {**body, "stream": True})

    text, stop, plain, streamed = asyncio.run(scenario())
    expected = text[:text.index(stop)]
    choice = plain.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == expected
    assert stop not in choice["message"]["content"]
    events = _events(streamed)
    assert _streamed_text(events) == [expected] and events[-2]["choices"][0]["finish_reason"] == "stop"


def test_usage_counts_cached_prompt_tokens_and_the_usage_chunk(served):
    # A start of its own, so no earlier test's prompt shares a cached block with this one.
    messages = [{"role": "user", "content": "usage-test 3f9a: " + "tell me about the sea " * 12}]
    prompt = served.tok.encode_chat(messages)
    assert len(prompt) > 48
    body = {"messages": messages, "max_tokens": 6, "temperature": 0}

    async def scenario():
        cold = await _post(served.app, body)
        warm = await _post(served.app, body)
        return cold, warm, await _post(served.app, {**body, "stream": True, "stream_options": {"include_usage": True}})

    cold, warm, streamed = asyncio.run(scenario())
    assert cold.json()["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 6,
                                    "total_tokens": len(prompt) + 6, "prompt_tokens_details": {"cached_tokens": 0}}
    cached = warm.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached <= len(prompt) and cached % 16 == 0
    events = _events(streamed)
    *chunks, usage_chunk, done = events
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    assert usage_chunk["usage"]["prompt_tokens"] == len(prompt)
    assert usage_chunk["usage"]["total_tokens"] == len(prompt) + 6
    assert all(c["usage"] is None for c in chunks)
    assert _streamed_text(events) == [warm.json()["choices"][0]["message"]["content"]]


def test_logprobs_come_with_each_token(served):
    body = {"messages": HELLO, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3}

    async def scenario():
        return await _post(served.app, body), await _post(served.app, {**body, "stream": True})

    plain, streamed = asyncio.run(scenario())
    choice = plain.json()["choices"][0]
    content = choice["logprobs"]["content"]
    # One per generated token (control tokens, which the content leaves out, as "" with no bytes): their texts and
    # bytes make up the content exactly.
    assert len(content) == plain.json()["usage"]["completion_tokens"]
    assert "".join(item["token"] for item in content) == choice["message"]["content"]
    assert bytes(b for item in content for b in item["bytes"]).decode() == choice["message"]["content"]
    for item in content:
        top = item["top_logprobs"]
        assert len(top) == 3 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
        assert top[0]["token"] == item["token"] and item["logprob"] == pytest.approx(top[0]["logprob"])
        assert item["logprob"] <= 0 and isinstance(item["bytes"], list)
    streamed_lps = [lp for e in _events(streamed)[:-1] for c in e["choices"] if c["logprobs"]
                    for lp in c["logprobs"]["content"]]
    assert streamed_lps == content


def test_cache_salt_keeps_cached_prompts_apart(served):
    # A start of its own, so no earlier test's prompt shares a cached block with this one.
    messages = [{"role": "user", "content": "salt-test 7c1e: " + "a story about the mountains " * 12}]
    body = {"messages": messages, "max_tokens": 2, "temperature": 0}
    salts = ["tenant-a", "tenant-a", "tenant-b", None]

    async def scenario():
        return [await _post(served.app, body if salt is None else {**body, "cache_salt": salt}) for salt in salts]

    responses = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    cached = [r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for r in responses]
    # Only the second tenant-a request reuses blocks: tenant-b and the unsalted request share nothing with it.
    assert cached[0] == 0 and cached[1] > 0 and cached[2:] == [0, 0], cached


# -- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, needles, param", [
    ({"messages": HELLO, "temperature": 2.5}, ["temperature"], "temperature"),
    ({"messages": HELLO, "top_p": 1.5}, ["top_p"], "top_p"),
    ({"messages": []}, ["messages"], "messages"),
    ({}, ["messages", "required"], "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, ["messages[0].role"], "messages[0].role"),
    ({"messages": HELLO, "n": 0}, ["n:"], "n"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, ["at most 4"], "stop"),
    ({"messages": HELLO, "frequency_penalty": -3}, ["frequency_penalty"], "frequency_penalty"),
    ({"messages": HELLO, "seed": 2**64}, ["seed"], "seed"),
    ({"messages": HELLO, "top_logprobs": 2}, ["logprobs must be true"], "top_logprobs"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, ["cannot encode the chat"], "messages"),
    ({"messages": HELLO, "max_tokens": 5000}, ["5000", "4096"], "messages"),
    ({"messages": HELLO, "max_tokens": 5, "max_completion_tokens": 5000}, ["5000", "4096"], "messages"),
    ({"messages": HELLO, "max_tokens": 5000, "stream": True}, ["5000", "4096"], "messages"),
])
def test_bad_requests_get_400_with_openai_error_json(served, body, needles, param):
    response = asyncio.run(_post(served.app, body))
    error = _assert_error(response, 400, *needles)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_malformed_bodies_get_400(served):
    async def scenario():
        async with _client(served.app) as client:
            return [await client.post("/v1/chat/completions", content=content,
                                      headers={"content-type": "application/json"})
                    for content in (b"{not json", b"[1, 2]", b"\xff\xfe")]

    for response in asyncio.run(scenario()):
        _assert_error(response, 400, "JSON")


def test_unknown_model_and_route_get_404(served):
    async def scenario():
        async with _client(served.app) as client:
            return (await client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO}),
                    await client.get("/v1/nothing-here"),
                    await client.get("/v1/chat/completions"))

    model, route, method = asyncio.run(scenario())
    assert _assert_error(model, 404, "gpt-4o", MODEL)["code"] == "model_not_found"
    _assert_error(route, 404, "/v1/nothing-here")
    _assert_error(method, 405)
    assert method.headers["allow"] == "POST"


def test_models_and_health(served):
    async def scenario():
        async with _client(served.app) as client:
            return await client.get("/v1/models"), await client.get("/health")

    models, health = asyncio.run(scenario())
    assert models.json()["object"] == "list"
    (card,) = models.json()["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["context_length"] == served.context_len
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["stats"]["total_blocks"] == 512


class _UnavailableBackend:
    """A unit whose expert shard is restarting: every request is refused with 503 (the real one: test_serve)."""

    def __init__(self):
        self.closed = 0

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        try:
            for out in RequestOutput.errors(request_id, params.n, "expert shard 1 is restarting", 503):
                yield out
        finally:
            self.closed += 1

    def overloaded(self) -> str | None:
        return None

    async def health(self) -> Health:
        return Health(status="recovering", detail="expert shard 1 is restarting")


def test_an_unavailable_backend_gets_503_with_retry_after(tok):
    backend = _UnavailableBackend()
    app = build_api(backend, tok, MODEL, 4096, SamplingDefaults(temperature=0.5))

    async def scenario():
        async with _client(app) as client:
            return [await client.post("/v1/chat/completions", json={"messages": HELLO, "stream": stream, "n": 2})
                    for stream in (False, True)] + [await client.get("/health")]

    plain, streamed, health = asyncio.run(scenario())
    for response in (plain, streamed):
        assert _assert_error(response, 503, "restarting")["type"] == "service_unavailable_error"
        assert int(response.headers["retry-after"]) > 0
    assert backend.closed == 2
    assert health.status_code == 503 and int(health.headers["retry-after"]) > 0
    assert health.json()["status"] == "recovering" and "restarting" in health.json()["detail"]


def test_engine_failures_before_and_after_the_stream_starts(loaded, tok):
    faults = {"countdown": None, "error": None}

    def wrap(run):
        def flaky(batch):  # fault injection on the engine thread: the countdown-th forward from now raises
            if faults["countdown"] is not None:
                faults["countdown"] -= 1
                if faults["countdown"] < 0:
                    faults["countdown"] = None
                    raise faults["error"]
            return run(batch)
        return flaky

    s = _serve(loaded, tok, wrap)

    def arm(forwards_ok: int, error: Exception) -> None:
        s.front.call(lambda e: faults.update(countdown=forwards_ok, error=error)).result()

    body = {"messages": HELLO, "max_tokens": 20, "temperature": 0}

    async def scenario():
        results = {}
        arm(0, UnavailableError("expert shard 2 went away"))
        results["first_stream"] = await _post(s.app, {**body, "stream": True})
        arm(0, UnavailableError("expert shard 2 went away"))
        results["first_plain"] = await _post(s.app, body)
        arm(4, UnavailableError("expert shard 2 went away"))
        results["mid_plain"] = await _post(s.app, body)
        arm(4, RuntimeError("device lost"))
        results["mid_stream"] = await _post(s.app, {**body, "stream": True})
        results["after"] = await _post(s.app, body)
        return results

    try:
        r = asyncio.run(scenario())
    finally:
        s.front.shutdown()
    for key in ("first_stream", "first_plain", "mid_plain"):
        _assert_error(r[key], 503, "expert shard 2 went away")
        assert int(r[key].headers["retry-after"]) > 0
    events = _events(r["mid_stream"])
    assert r["mid_stream"].status_code == 200
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    content = events[1:-2]  # the 4 tokens before the failed forward (a held-back piece of text sends no chunk)
    assert 1 <= len(content) <= 4 and all(c["choices"][0]["finish_reason"] is None for c in content)
    assert "device lost" in events[-2]["error"]["message"] and events[-2]["error"]["type"] == "server_error"
    assert r["after"].status_code == 200 and r["after"].json()["usage"]["completion_tokens"] == 20


# -- disconnects -----------------------------------------------------------------------------------------------------
async def _call_and_leave(app, body: dict, leave: asyncio.Event, spec: str) -> list[dict]:
    """Drive the ASGI app as a server would, for a client that goes away once `leave` is set.

    Servers tell the app in one of two ways: receive() returns http.disconnect, and under ASGI 2.4 send() raises
    OSError.
    """
    raw = json.dumps(body).encode()
    messages: list[dict] = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        if spec == "2.4" and leave.is_set():
            raise OSError("connection closed")
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=20)
    return sent


async def _leave_when_running(front: AsyncEngine, leave: asyncio.Event) -> None:
    while not await asyncio.wrap_future(front.call(lambda e: e.stats().running > 0)):
        await asyncio.sleep(0.005)
    leave.set()


@pytest.mark.parametrize("stream, spec", [(False, "2.3"), (True, "2.3"), (True, "2.4")])
def test_a_client_that_disconnects_stops_its_generation(served, stream, spec):
    # The request asks for the whole context (many seconds here); the client leaves as soon as the engine runs it.
    max_tokens = served.context_len - len(served.tok.encode_chat(HELLO))
    body = {"messages": HELLO, "max_tokens": max_tokens, "temperature": 0, "stream": stream}

    async def scenario():
        leave = asyncio.Event()
        watcher = asyncio.create_task(_leave_when_running(served.front, leave))
        sent = await _call_and_leave(served.app, body, leave, spec)
        await watcher
        return sent, await _engine_idle(served.front)

    sent, idle = asyncio.run(scenario())
    assert idle, "the engine still runs the abandoned request"
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b"[DONE]" not in text and b'"finish_reason":"length"' not in text


# -- the official client -------------------------------------------------------------------------------------------
def test_the_openai_client_parses_completions_streams_and_errors(served):
    async def scenario():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=served.app))
        async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0) as c:
            completion = await c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0)
            stream = await c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            models = await c.models.list()
            with pytest.raises(openai.BadRequestError, match="temperature"):
                await c.chat.completions.create(model=MODEL, messages=HELLO, temperature=3)
            with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
                await c.chat.completions.create(model="gpt-4o", messages=HELLO)
        return completion, chunks, models

    completion, chunks, models = asyncio.run(scenario())
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 10
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == completion.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10
    assert [m.id for m in models.data] == [MODEL]
