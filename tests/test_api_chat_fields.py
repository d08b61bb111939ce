"""The chat API's fields beyond plain chat (issue 17), over HTTP on a real engine (tiny checkpoint, v3 tokenizer) with
the grammar guide: tools and tool calls, structured output, nullable and strict fields, logit_bias and the vLLM
sampling fields, the model route, error codes and the response's smaller parts."""

import asyncio
import functools
import json
from contextlib import asynccontextmanager
from typing import AsyncIterator

import httpx
import jsonschema
import pytest
import torch

from cluster.api.server import build_api, system_fingerprint
from cluster.api.tool_calls import model_tool_id
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.engine.guided import GrammarGuide
from cluster.engine.outputs import RequestOutput, TokenLogprobs
from cluster.engine.paged_cache import kv_bytes_per_block
from cluster.engine.sampling_params import SamplingDefaults, SamplingParams
from cluster.health import Health
from cluster.model.loader import load_model
from cluster.serve.engine_backend import EngineBackend
from cluster.tokenizer import IncrementalDetokenizer, load_tokenizer, resolve_tokenizer_version
from tests.http import sse_chunks

pytestmark = pytest.mark.e2e  # the whole HTTP stack, from requests through the app to a real engine

MODEL = "mixtral-tiny"
FINGERPRINT = system_fingerprint(MODEL, "float32")
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
             "required": ["zone"], "additionalProperties": False}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CLIENT_ID = "call_DdmO9pD3xa9XTPNJ32zg2hcA"  # an id of the openai SDK's form


class _Recording:
    """The engine's backend, keeping each request's prompt and parameters."""

    def __init__(self, inner: EngineBackend):
        self.inner = inner
        self.requests: list[tuple[list[int], SamplingParams]] = []

    def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                 stream: bool = True) -> AsyncIterator[RequestOutput]:
        self.requests.append((prompt, params))
        return self.inner.generate(request_id, prompt, params, stream)

    def overloaded(self) -> str | None:
        return self.inner.overloaded()

    async def health(self) -> Health:
        return await self.inner.health()


@pytest.fixture(scope="module")
def served(tiny_dir):
    loaded = load_model(tiny_dir, "fp32")
    tok = load_tokenizer(resolve_tokenizer_version(loaded.config))
    assert tok.version == "v3"

    def factory() -> LLMEngine:
        blocks = 512 * kv_bytes_per_block(loaded.config, 16, torch.float32)
        return LLMEngine(loaded.model, tok.decode, tok.eos_id, EngineConfig(kv_cache_bytes=blocks),
                         guide=GrammarGuide.for_tokenizer(tok.version))

    front = AsyncEngine(factory)
    backend = _Recording(EngineBackend(front))
    app = build_api(backend, tok, MODEL, loaded.config.max_position_embeddings,
                    SamplingDefaults.for_model(loaded.config), fingerprint=FINGERPRINT)
    yield app, backend, tok
    front.shutdown()


@asynccontextmanager
async def _client(app) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


def _post_all(app, bodies: list[dict]) -> list[httpx.Response]:
    async def scenario():
        async with _client(app) as client:
            return [await client.post("/v1/chat/completions", json=body) for body in bodies]

    return asyncio.run(scenario())


def _post(app, body: dict) -> httpx.Response:
    return _post_all(app, [body])[0]


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def _error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _events(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return sse_chunks(response.text)


def _assembled_calls(events: list[dict]) -> list[dict]:
    """Streamed tool-call deltas put together the way the openai SDK's stream helpers do."""
    calls: dict[int, dict] = {}
    for e in events:
        for c in e["choices"]:
            for d in c["delta"].get("tool_calls") or []:
                call = calls.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
                if d.get("id"):
                    assert call["id"] is None, "a call's id comes once"
                    call["id"] = d["id"]
                    assert d["type"] == "function"
                call["name"] += d["function"].get("name") or ""
                call["arguments"] += d["function"].get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


# -- tools -----------------------------------------------------------------------------------------------------------
def test_tools_go_into_the_prompt_unless_tool_choice_is_none(served):
    app, _, _ = served
    base = {"messages": ASK, "max_tokens": 1, "temperature": 0}
    plain, auto, none = _post_all(app, [base, {**base, "tools": TOOLS}, {**base, "tools": TOOLS, "tool_choice": "none"}])
    tokens = [_ok(r)["usage"]["prompt_tokens"] for r in (plain, auto, none)]
    assert tokens[1] > tokens[0] + 50 and tokens[2] == tokens[0], tokens


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tool_choice_required_returns_a_call_that_matches_its_schema(served, seed):
    app, backend, _ = served
    choice = _ok(_post(app, {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 60,
                             "parallel_tool_calls": False, "seed": seed}))["choices"][0]
    assert choice["finish_reason"] == "tool_calls", (seed, choice)
    assert choice["message"]["content"] is None and choice["message"]["tool_calls"]
    for call in choice["message"]["tool_calls"]:
        assert call["type"] == "function" and len(call["id"]) == 9 and call["id"].isalnum()
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    assert backend.requests[-1][1].grammar is not None


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_calls_that_function_and_stops(served, stream):
    """OpenAI (and vLLM) finish a forced named call with "stop"; "auto" and "required" finish with "tool_calls"."""
    app, _, _ = served
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            "max_tokens": 40, "seed": 3, "stream": stream, "n": 2}
    response = _post(app, body)
    if stream:
        events = _events(response)
        per_choice = [[e for e in events if [c["index"] for c in e["choices"]] == [i]] for i in range(2)]
        choices = [(_assembled_calls(evs), [c["finish_reason"] for e in evs for c in e["choices"]
                                            if c["finish_reason"]]) for evs in per_choice]
    else:
        choices = [([{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in choice["message"]["tool_calls"]], [choice["finish_reason"]])
                   for choice in _ok(response)["choices"]]
    assert len(choices) == 2
    for calls, reasons in choices:
        (call,) = calls
        assert call["name"] == "get_time" and reasons == ["stop"], (calls, reasons)
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS["get_time"])


def test_streamed_tool_call_deltas_reassemble_to_the_same_call(served):
    app, _, _ = served
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 60, "seed": 11}
    plain, streamed = _post_all(app, [body, {**body, "stream": True}])
    calls = _ok(plain)["choices"][0]["message"]["tool_calls"]
    events = _events(streamed)
    streamed_calls = _assembled_calls(events)
    assert [(c["name"], c["arguments"]) for c in streamed_calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls]
    assert all(len(c["id"]) == 9 for c in streamed_calls)
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["tool_calls"]
    assert all("content" not in c["delta"] for e in events[1:] for c in e["choices"])


def test_parallel_tool_calls_false_allows_one_call(served):
    app, backend, _ = served
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 80, "seed": 5}
    _ok(_post(app, {**body, "parallel_tool_calls": False}))
    single = backend.requests[-1][1].grammar
    _ok(_post(app, body))
    assert '"maxItems": 1' in single and '"maxItems": 1' not in backend.requests[-1][1].grammar


def test_a_tool_round_trip_with_client_ids(served):
    app, backend, tok = served
    arguments = json.dumps({"city": "Paris", "days": 2})
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": CLIENT_ID, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": CLIENT_ID, "content": "sunny, 24 C"}]
    answer = _ok(_post(app, {"messages": history, "tools": TOOLS, "max_tokens": 4, "seed": 0}))
    assert answer["choices"][0]["message"]["role"] == "assistant"
    # The client's id reached the prompt as the model's id, the same in the call and in its result.
    model_id = model_tool_id(CLIENT_ID)
    mapped = json.loads(json.dumps(history).replace(CLIENT_ID, model_id))
    assert backend.requests[-1][0] == tok.encode_chat(mapped, TOOLS)
    # And a call the model made comes back as-is in the next turn.
    calls = _ok(_post(app, {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 60,
                            "parallel_tool_calls": False, "seed": 4}))["choices"][0]["message"]["tool_calls"]
    again = ASK + [{"role": "assistant", "tool_calls": calls},
                   {"role": "tool", "tool_call_id": calls[0]["id"], "content": "12:00"}]
    _ok(_post(app, {"messages": again, "tools": TOOLS, "max_tokens": 2}))


@pytest.mark.parametrize("tool_choice, needle", [
    ("sometimes", "must be \"none\""),
    ({"type": "function"}, "must be \"none\""),
    ({"type": "function", "function": {"name": "get_stock"}}, "not in tools"),
    (42, "must be \"none\""),
])
def test_a_bad_tool_choice_is_a_400_naming_tool_choice(served, tool_choice, needle):
    app, _, _ = served
    error = _error(_post(app, {"messages": ASK, "tools": TOOLS, "tool_choice": tool_choice}))
    assert error["param"] == "tool_choice" and needle in error["message"], error


def test_required_without_tools_and_bad_tools_are_400s(served):
    app, _, _ = served
    required, duplicate, nameless = _post_all(app, [
        {"messages": ASK, "tool_choice": "required"},
        {"messages": ASK, "tools": TOOLS + TOOLS[:1]},
        {"messages": ASK, "tools": [{"type": "function", "function": {"description": "x"}}]}])
    assert _error(required)["param"] == "tool_choice"
    assert _error(duplicate)["param"] == "tools"
    assert _error(nameless)["param"] == "tools[0].function.name"


class _Scripted:
    """A backend that answers every request with the same outputs: a model that writes content, then a call."""

    def __init__(self, outputs: list[RequestOutput]):
        self.outputs = outputs

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        for out in self.outputs:
            yield out

    def overloaded(self) -> str | None:
        return None

    async def health(self) -> Health:
        return Health()


@pytest.mark.parametrize("merged", [False, True])
def test_content_before_tool_calls_token_stays_content(served, merged):
    """The text before [TOOL_CALLS] is content, the text after it the calls, also when a backend merged a choice's
    outputs into one (the Ray Serve app does for non-streamed requests)."""
    _, _, tok = served
    content_ids = tok.encode("Let me check.")
    ids = content_ids + [tok.tool_calls_token] + tok.encode('[{"name": "get_time", "arguments": {"zone": "UTC"}}]')
    detok = IncrementalDetokenizer(tok.decode)
    outputs = [RequestOutput("r", 0, detok.add([i]), [i], [TokenLogprobs(-0.5, [])], completion_tokens=n + 1)
               for n, i in enumerate(ids)]
    # The engine's last output: EOS ended the choice (not among the content's tokens, counted all the same).
    outputs.append(RequestOutput("r", 0, "", [], finish_reason="stop", completion_tokens=len(ids) + 1,
                                 stop_token=tok.eos_id, stop_token_logprobs=TokenLogprobs(-0.25, [])))
    if merged:
        outputs = [functools.reduce(RequestOutput.merged, outputs)]
    app = build_api(_Scripted(outputs), tok, MODEL, 4096, SamplingDefaults(temperature=0.5))
    body = {"messages": ASK, "tools": TOOLS, "logprobs": True}
    plain, streamed, no_tools = _post_all(app, [body, {**body, "stream": True}, {**body, "tools": None}])
    choice = _ok(plain)["choices"][0]
    assert choice["message"]["content"] == "Let me check." and choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time" and json.loads(call["function"]["arguments"]) == {"zone": "UTC"}
    # One entry per token: the content's spell it, [TOOL_CALLS] and EOS are "", the call's carry its raw text.
    entries = choice["logprobs"]["content"]
    assert len(entries) == len(ids) + 1 == _ok(plain)["usage"]["completion_tokens"]
    assert "".join(t["token"] for t in entries[:len(content_ids)]) == "Let me check."
    assert [entries[len(content_ids)]["token"], entries[-1]["token"], entries[-1]["logprob"]] == ["", "", -0.25]
    assert "get_time" in "".join(t["token"] for t in entries[len(content_ids) + 1:])
    events = _events(streamed)
    assert "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]) == "Let me check."
    assert [(c["name"], c["arguments"]) for c in _assembled_calls(events)] == [
        ("get_time", call["function"]["arguments"])]
    # Without tools on offer the same output is all content: the control token only is left out.
    plain_text = _ok(no_tools)["choices"][0]
    assert plain_text["message"]["content"].startswith("Let me check.") and "get_time" in plain_text["message"]["content"]
    assert plain_text["finish_reason"] == "stop" and "tool_calls" not in plain_text["message"]


def test_a_tokenizer_without_tool_calls_refuses_tools(served):
    app, backend, _ = served
    v1 = build_api(backend, load_tokenizer("v1"), MODEL, 4096, SamplingDefaults(temperature=0.5))
    sent = len(backend.requests)
    error = _error(_post(v1, {"messages": ASK, "tools": TOOLS}))
    assert error["param"] == "tools" and "v1" in error["message"]
    assert len(backend.requests) == sent


# -- structured output -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_json_object_output_parses(served, stream):
    app, _, _ = served
    for seed in range(4):
        response = _post(app, {"messages": [{"role": "user", "content": "Reply in JSON."}], "max_tokens": 30,
                               "response_format": {"type": "json_object"}, "seed": seed, "stream": stream})
        if stream:
            text = "".join(c["delta"].get("content") or "" for e in _events(response) for c in e["choices"])
        else:
            text = _ok(response)["choices"][0]["message"]["content"]
        assert isinstance(json.loads(text), dict), (seed, text)


def test_json_schema_output_validates(served):
    app, _, _ = served
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    for seed in range(3):
        content = _ok(_post(app, {"messages": ASK, "max_tokens": 40, "response_format": fmt,
                                  "seed": seed}))["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(content), WEATHER)


@pytest.mark.parametrize("fmt, param", [
    ({"type": "xml"}, "response_format"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "has space"}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "(unclosed"}}}}}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}}, "response_format"),
])
def test_a_bad_response_format_is_a_400_naming_it(served, fmt, param):
    app, _, _ = served
    error = _error(_post(app, {"messages": ASK, "response_format": fmt}))
    assert error["param"] == param, error
    assert "llguidance" not in error["message"] and "Traceback" not in error["message"]


# -- fields ----------------------------------------------------------------------------------------------------------
NULLABLE = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop",
            "seed", "stream", "stream_options", "frequency_penalty", "presence_penalty", "logit_bias", "ignore_eos",
            "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "response_format", "user",
            "min_tokens", "stop_token_ids", "store", "metadata", "service_tier", "prompt_cache_key",
            "safety_identifier", "modalities", "verbosity", "reasoning_effort", "audio", "prediction", "functions",
            "function_call", "web_search_options", "return_token_ids", "prompt_logprobs"]


def test_every_optional_field_takes_null(served):
    app, _, _ = served
    body = {"messages": ASK, **{name: None for name in NULLABLE}}
    choice = _ok(_post(app, {**body, "max_tokens": 3}))["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("field, value", [("max_tokens", "5"), ("n", "2"), ("seed", 1.0), ("stream", "true"),
                                          ("logprobs", 1), ("top_logprobs", True), ("max_completion_tokens", 5.5)])
def test_integers_and_booleans_are_strict(served, field, value):
    app, _, _ = served
    body = {"messages": ASK, "max_tokens": 2, "logprobs": True, field: value}
    assert _error(_post(app, body))["param"] == field


def test_floats_take_integers(served):
    app, _, _ = served
    _ok(_post(app, {"messages": ASK, "max_tokens": 2, "temperature": 1, "top_p": 1, "presence_penalty": 0}))


def test_the_developer_role_is_a_system_message_and_names_are_accepted(served):
    app, backend, tok = served
    dev = [{"role": "developer", "content": "Answer briefly.", "name": "ops"}, {**ASK[0], "name": "ana"}]
    _ok(_post(app, {"messages": dev, "max_tokens": 2}))
    system = [{"role": "system", "content": "Answer briefly."}, ASK[0]]
    assert backend.requests[-1][0] == tok.encode_chat(system)


def test_logit_bias_steers_the_output(served):
    app, backend, tok = served
    token = tok.encode("Paris")[-1]
    content = _ok(_post(app, {"messages": ASK, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                              "logit_bias": {str(token): 100}}))["choices"][0]["message"]["content"]
    assert backend.requests[-1][1].logit_bias == ((token, 100.0),)
    assert content.replace(" ", "") == tok.piece(token).replace("\u2581", "") * 4, content


@pytest.mark.parametrize("bias, needle", [({"abc": 1}, "token ids"), ({"5": 101}, "[-100, 100]"),
                                          ({"99999999": 1}, "outside the vocabulary"), ({"-1": 1}, "token ids"),
                                          ({"5": "1"}, "number")])
def test_bad_logit_bias_is_a_400(served, bias, needle):
    app, _, _ = served
    error = _error(_post(app, {"messages": ASK, "logit_bias": bias}))
    assert error["param"].startswith("logit_bias") and needle in error["message"], error


def test_vllm_sampling_fields_reach_the_engine(served):
    app, backend, _ = served
    _ok(_post(app, {"messages": ASK, "max_tokens": 3, "top_k": 5, "min_p": 0.1, "ignore_eos": True}))
    params = backend.requests[-1][1]
    assert (params.top_k, params.min_p, params.ignore_eos) == (5, 0.1, True)
    _ok(_post(app, {"messages": ASK, "max_tokens": 3, "top_k": -1}))
    assert backend.requests[-1][1].top_k == 0


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_holds_back_eos_and_stop_token_ids(served, stream):
    """vLLM's min_tokens: a model that wants to end at once (its end token biased +100) writes min_tokens tokens
    first; the token that ends it is counted and has its logprob ("" with no bytes), its text is not content."""
    app, backend, tok = served
    word = tok.encode("Paris")[-1]
    base = {"messages": ASK, "max_tokens": 10, "temperature": 0, "logprobs": True, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    cases = [({"logit_bias": {str(tok.eos_id): 100}}, 0, 1), ({"logit_bias": {str(tok.eos_id): 100}}, 4, 5),
             ({"logit_bias": {str(word): 100}, "stop_token_ids": [word]}, 0, 1),
             ({"logit_bias": {str(word): 100}, "stop_token_ids": [word]}, 3, 4)]
    for fields, min_tokens, tokens in cases:
        response = _post(app, {**base, **fields, "min_tokens": min_tokens})
        if stream:
            events = _events(response)
            usage, chunks = events[-1]["usage"], [c for e in events for c in e["choices"]]
            content = "".join(c["delta"].get("content") or "" for c in chunks)
            entries = [t for c in chunks for t in (c["logprobs"] or {}).get("content") or []]
            reason = [c["finish_reason"] for c in chunks if c["finish_reason"]]
        else:
            completion = _ok(response)
            usage, choice = completion["usage"], completion["choices"][0]
            content, entries, reason = (choice["message"]["content"], choice["logprobs"]["content"],
                                        [choice["finish_reason"]])
        assert (usage["completion_tokens"], reason, len(entries)) == (tokens, ["stop"], tokens), (fields, min_tokens)
        assert entries[-1]["token"] == "" and entries[-1]["bytes"] == [], entries[-1]
        assert "".join(t["token"] for t in entries) == content and tok.piece(word)[1:] not in content
        assert backend.requests[-1][1].min_tokens == min_tokens


def test_stop_token_ids_outside_the_vocabulary_are_a_400(served):
    app, backend, tok = served
    sent = len(backend.requests)
    error = _error(_post(app, {"messages": ASK, "stop_token_ids": [5, tok.vocab_size, tok.vocab_size + 7]}))
    assert error["param"] == "stop_token_ids" and f"{tok.vocab_size}, {tok.vocab_size + 7}" in error["message"]
    assert len(backend.requests) == sent


def test_continuous_usage_stats_gives_every_chunk_the_usage_so_far(served):
    app, _, _ = served
    body = {"messages": ASK, "max_tokens": 5, "n": 2, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = _events(_post(app, body))
    *chunks, final = events
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 10
    so_far = [c["usage"]["completion_tokens"] for c in chunks]
    assert so_far[:2] == [0, 0] and so_far == sorted(so_far) and so_far[-1] == 10, so_far  # the role chunks first
    assert {c["usage"]["prompt_tokens"] for c in chunks} == {final["usage"]["prompt_tokens"]}
    assert all(c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
               for c in chunks)


def test_stream_options_need_stream(served):
    app, _, _ = served
    error = _error(_post(app, {"messages": ASK, "stream_options": {"include_usage": True}}))
    assert error["param"] == "stream_options"
    _error(_post(app, {"messages": ASK, "stream": False, "stream_options": {"include_usage": True}}))
    _events(_post(app, {"messages": ASK, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}))


# -- routes and errors -----------------------------------------------------------------------------------------------
def test_a_model_is_retrieved_by_id(served):
    app, _, _ = served

    async def scenario():
        async with _client(app) as client:
            return await client.get(f"/v1/models/{MODEL}"), await client.get("/v1/models/gpt-4o")

    found, missing = asyncio.run(scenario())
    card = _ok(found)
    assert card["id"] == MODEL and card["object"] == "model"
    error = _error(missing, 404)
    assert error["code"] == "model_not_found" and error["param"] == "model" and "gpt-4o" in error["message"]


def test_text_completions_are_routed(served):
    app, _, _ = served

    async def scenario():
        async with _client(app) as client:
            return await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})

    completion = _ok(asyncio.run(scenario()))
    assert completion["object"] == "text_completion" and completion["system_fingerprint"] == FINGERPRINT


def test_text_completions_take_the_vllm_extensions_too(served):
    """The legacy route shares them: min_tokens holds back the EOS the model wants, continuous_usage_stats puts the
    usage so far in every chunk, an unknown field is a 400 naming it."""
    app, _, tok = served
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "logit_bias": {str(tok.eos_id): 100},
            "min_tokens": 2, "stream": True, "stream_options": {"continuous_usage_stats": True}}

    async def scenario():
        async with _client(app) as client:
            return (await client.post("/v1/completions", json=body),
                    await client.post("/v1/completions", json={"prompt": "Hello", "guided_json": {}}))

    streamed, unknown = asyncio.run(scenario())
    *chunks, final = _events(streamed)
    assert final["usage"]["completion_tokens"] == 3 and all(c["usage"] is not None for c in chunks)
    assert [c["usage"]["completion_tokens"] for c in chunks][-1] == 3
    assert _error(unknown)["param"] == "guided_json"


def test_context_overflow_has_openai_code_and_param(served):
    app, _, _ = served
    for stream in (False, True):
        error = _error(_post(app, {"messages": ASK, "max_tokens": 5000, "stream": stream}))
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages", error


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "system", "content": "x"}, {"role": "user"}], "messages[1].content"),
])
def test_a_message_without_content_is_named(served, messages, param):
    app, _, _ = served
    error = _error(_post(app, {"messages": messages}))
    assert error["param"] == param and "needs content" in error["message"], error
    assert "cannot encode" not in error["message"]


# -- response shape --------------------------------------------------------------------------------------------------
def test_fingerprint_and_refusal_in_responses_and_chunks(served):
    app, _, _ = served
    body = {"messages": ASK, "max_tokens": 3, "logprobs": True}
    plain, streamed = _post_all(app, [body, {**body, "stream": True}])
    completion = _ok(plain)
    assert completion["system_fingerprint"] == FINGERPRINT and FINGERPRINT.startswith("fp_")
    choice = completion["choices"][0]
    assert choice["message"]["refusal"] is None and "tool_calls" not in choice["message"]
    assert choice["logprobs"]["refusal"] is None
    assert {e["system_fingerprint"] for e in _events(streamed)} == {FINGERPRINT}
    assert system_fingerprint(MODEL, "float32") == FINGERPRINT != system_fingerprint(MODEL, "bfloat16")


def test_logprob_tokens_make_up_the_content_exactly(served):
    app, _, _ = served
    firsts = []
    for seed in range(6):
        body = {"messages": ASK, "max_tokens": 6, "logprobs": True, "top_logprobs": 2, "seed": seed}
        plain, streamed = _post_all(app, [body, {**body, "stream": True}])
        choice = _ok(plain)["choices"][0]
        tokens = [t["token"] for t in choice["logprobs"]["content"]]
        assert "".join(tokens) == choice["message"]["content"], (seed, tokens)
        streamed_tokens = [t["token"] for e in _events(streamed) for c in e["choices"] if c["logprobs"]
                           for t in c["logprobs"]["content"]]
        assert streamed_tokens == tokens, seed
        firsts.append(tokens[0])
    # The tiny model's first tokens mostly start a word: without the fix they all began with a space.
    assert firsts and not any(t.startswith(" ") for t in firsts), firsts


@pytest.mark.parametrize("stream", [False, True])
def test_every_generated_token_has_its_logprob(served, stream):
    """One entry per token completion_tokens counts, control tokens included (as "" with no bytes, so the entries
    still spell the content); the issue's case: n=3, max_tokens=50 gave 48, 49 and 50 entries."""
    app, _, tok = served
    body = {"messages": ASK, "max_tokens": 50, "n": 3, "temperature": 1.0, "seed": 0, "logprobs": True,
            "top_logprobs": 1, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    response = _post(app, body)
    entries: list[list[dict]] = [[], [], []]
    texts = ["", "", ""]
    if stream:
        events = _events(response)
        usage = events[-1]["usage"]
        for e in events:
            for c in e["choices"]:
                entries[c["index"]] += (c["logprobs"] or {}).get("content") or []
                texts[c["index"]] += c["delta"].get("content") or ""
    else:
        completion = _ok(response)
        usage = completion["usage"]
        for c in completion["choices"]:
            entries[c["index"]], texts[c["index"]] = c["logprobs"]["content"], c["message"]["content"]
    assert sum(len(e) for e in entries) == usage["completion_tokens"], [len(e) for e in entries]
    control = [t for e in entries for t in e if t["token"] == "" and t["bytes"] == []]
    assert control, "the case needs a sampled control token"
    for e, text in zip(entries, texts):  # (a lone byte-fallback byte's text is "\\xbf": its bytes spell the text)
        assert bytes(b for t in e for b in t["bytes"]).decode("utf-8", errors="replace") == text


def test_logprobs_leave_out_the_tokens_of_a_stop_string(served):
    app, _, _ = served
    body = {"messages": ASK, "max_tokens": 8, "temperature": 0, "logprobs": True, "ignore_eos": True}
    free = _ok(_post(app, body))["choices"][0]
    tokens = [t["token"] for t in free["logprobs"]["content"]]
    stop = "".join(tokens[4:6])  # two tokens in the middle of the greedy output
    assert stop.strip(), tokens
    stopped = _ok(_post(app, {**body, "stop": [stop]}))["choices"][0]
    content = stopped["message"]["content"]
    assert stopped["finish_reason"] == "stop" and stop not in content
    assert "".join(t["token"] for t in stopped["logprobs"]["content"]) == content, (tokens, stop)
