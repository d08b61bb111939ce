"""Structured output over HTTP never fails a neighbour (issue 24), on a real engine with the grammar guide (tiny
checkpoint, v3 tokenizer): schemas the engine cannot serve are 400s naming their field before anything is queued;
a grammar failing while it runs ends its own request with OpenAI's error JSON while concurrent requests finish; a
function without parameters gets `{}` as its arguments."""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import pytest
import torch

from cluster.api.server import build_api
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.engine.guided import GrammarFault, GrammarGuide
from cluster.engine.paged_cache import kv_bytes_per_block
from cluster.engine.sampling_params import SamplingDefaults
from cluster.model.loader import load_model
from cluster.serve.engine_backend import EngineBackend
from cluster.tokenizer import load_tokenizer, resolve_tokenizer_version
from tests.http import sse_chunks

pytestmark = pytest.mark.e2e  # the whole HTTP stack, from requests through the app to a real engine

ASK = [{"role": "user", "content": "Reply in JSON."}]
SELF_REQUIRED = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
EXPLODES = {"type": "object", "properties": {"explode": {"type": "string"}}, "required": ["explode"]}
WAIT_S = 120  # for answers that must come: a hang fails the test instead of the run


class _Counting(EngineBackend):
    """The engine's backend, counting the requests it is given."""

    def __init__(self, front: AsyncEngine):
        super().__init__(front)
        self.generated = 0

    def generate(self, *args, **kwargs):
        self.generated += 1
        return super().generate(*args, **kwargs)


@pytest.fixture(scope="module")
def served(tiny_dir):
    loaded = load_model(tiny_dir, "fp32")
    tok = load_tokenizer(resolve_tokenizer_version(loaded.config))
    engines: list[LLMEngine] = []

    def factory() -> LLMEngine:
        blocks = 512 * kv_bytes_per_block(loaded.config, 16, torch.float32)
        engine = LLMEngine(loaded.model, tok.decode, tok.eos_id, EngineConfig(kv_cache_bytes=blocks),
                           guide=GrammarGuide.for_tokenizer(tok.version))
        engines.append(engine)
        return engine

    front = AsyncEngine(factory)
    backend = _Counting(front)
    app = build_api(backend, tok, "mixtral-tiny", loaded.config.max_position_embeddings,
                    SamplingDefaults.for_model(loaded.config))
    yield app, engines[0], backend
    front.shutdown()


def _post_together(app, bodies: list[dict]) -> list[httpx.Response]:
    """The bodies posted at once (each on its own connection), their responses in order."""
    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            posts = [client.post("/v1/chat/completions", json=body, timeout=WAIT_S) for body in bodies]
            return await asyncio.wait_for(asyncio.gather(*posts), WAIT_S)

    return asyncio.run(scenario())


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def _error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"] and "<state>" not in error["message"], error
    return error


def _content(response: httpx.Response) -> str:
    if response.headers["content-type"].startswith("text/event-stream"):
        events = sse_chunks(response.text)
        assert all("error" not in e for e in events), events
        return "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("field,body", [
    ("response_format", {"response_format": _schema_format(SELF_REQUIRED)}),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": SELF_REQUIRED}}],
               "tool_choice": "required"}),
    ("response_format", {"response_format": _schema_format(
        {"type": "object", "properties": {"a": {"type": "string", "minLength": 10**9}}, "required": ["a"]})}),
    ("response_format", {"response_format": _schema_format(
        {"type": "object", "properties": {"a": {"type": "array", "minItems": 10**5}}, "required": ["a"]})}),
    ("response_format", {"response_format": _schema_format({"type": "string", "maxLength": "\U0001F600" * 30})}),
    ("response_format", {"response_format": _schema_format(
        {"type": "object", "properties": {"b": {"type": "array", "minItems": 3}}, "required": ["b"]}),
        "max_tokens": 5}),
])
def test_schemas_the_engine_cannot_serve_are_400s_before_anything_is_queued(served, field, body):
    """They used to fail the engine's step (every request in it ending with 500), run to max_tokens for a 200
    with JSON that does not parse, or (a panic) answer a plain-text 500."""
    app, _, backend = served
    before = backend.generated
    for stream in (False, True):
        [response] = _post_together(app, [{"messages": ASK, "stream": stream} | body])
        error = _error(response)
        assert error["param"] == field and error["type"] == "invalid_request_error", error
    assert backend.generated == before  # refused before the backend saw it


def test_a_grammar_failing_while_it_runs_fails_its_own_request_alone(served, monkeypatch):
    """The grammar of one request fails mid-output (fault injection: llguidance refusing its fourth token) while
    other requests stream beside it: that request gets a 400 in OpenAI's error JSON, the others their JSON."""
    app, engine, _ = served
    advance = engine.guide.advance
    taken: dict[int, int] = {}

    def failing_advance(seq, token):
        if seq.params.grammar == explodes:
            taken[seq.seq_id] = taken.get(seq.seq_id, 0) + 1
            if taken[seq.seq_id] == 4:
                raise GrammarFault("the output format could not be followed: Too many items", 400)
        return advance(seq, token)

    from cluster.api.grammars import json_grammar

    explodes = json_grammar(EXPLODES)
    monkeypatch.setattr(engine.guide, "advance", failing_advance)
    bystanders = [{"messages": ASK, "max_tokens": 40, "seed": i, "stream": i % 2 == 1,
                   "response_format": {"type": "json_object"} if i < 3 else _schema_format(EXPLODES | {
                       "properties": {"fine": {"type": "integer"}}, "required": ["fine"]})} for i in range(4)]
    failing = [{"messages": ASK, "max_tokens": 40, "seed": 9, "stream": stream,
                "response_format": _schema_format(EXPLODES)} for stream in (False, True)]
    responses = _post_together(app, failing + bystanders)
    error = _error(responses[0])
    assert "Too many items" in error["message"], error
    # Streamed, the error comes as the stream's last event once its content has begun (OpenAI's way).
    assert responses[1].status_code == 200, responses[1].text
    last = sse_chunks(responses[1].text)[-1]
    assert set(last) == {"error"} and "Too many items" in last["error"]["message"], last
    for body, response in zip(bystanders, responses[2:]):
        assert isinstance(json.loads(_content(response)), dict), (body, response.text)
    assert len(taken) == 2 and set(taken.values()) == {4}
    assert not engine.requests


def test_a_function_without_parameters_gets_empty_arguments(served):
    """Forced by "required", a function the client gave no parameters used to get invented argument keys."""
    app, _, _ = served
    tool = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
    bodies = [{"messages": ASK, "tools": [tool], "tool_choice": "required", "seed": seed, "max_tokens": 60}
              for seed in range(6)]
    for response in _post_together(app, bodies):
        assert response.status_code == 200, response.text
        calls = response.json()["choices"][0]["message"]["tool_calls"]
        assert calls and all(c["function"] == {"name": "get_time", "arguments": "{}"} for c in calls), calls


def test_without_llguidance_the_server_serves_text_and_refuses_output_formats_with_400s(tiny_dir, monkeypatch):
    """A machine that carries only what plain text needs (the GPU check's): `--no-ray` starts without a grammar
    guide, answers chat, and refuses each structured-output request with a 400 naming its field."""
    from cluster.serve.args import ServeArgs
    from tests.asgi_client import on_standalone

    monkeypatch.setitem(sys.modules, "llguidance", None)  # `import llguidance` now raises ImportError
    assert GrammarGuide.if_installed("v3") is None
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    bodies = [{"messages": ASK, "max_tokens": 3},
              {"messages": ASK, "max_tokens": 3, "response_format": {"type": "json_object"}},
              {"messages": ASK, "max_tokens": 3, "response_format": _schema_format({"type": "object"})},
              {"messages": ASK, "max_tokens": 3, "tools": [tool], "tool_choice": "required"}]

    async def ask(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.post("/v1/chat/completions", json={"model": "tiny", **body}) for body in bodies]

    args = ServeArgs(model=str(tiny_dir), served_model_name="tiny", shards=2, dtype="fp32", kv_cache_bytes=2**24,
                     device="cpu")
    text, json_object, schema, forced = on_standalone(args, ask)
    assert text.status_code == 200 and text.json()["usage"]["completion_tokens"] == 3, text.text
    for response, param in ((json_object, "response_format"), (schema, "response_format"), (forced, "tools")):
        error = _error(response)
        assert error["param"] == param and "does not enforce output formats" in error["message"], error
