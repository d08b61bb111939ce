"""The official openai SDK against a live single-process server on the tiny random checkpoint (issue 17).

Sync and async clients, streamed and not: forced tool calls whose arguments validate against their schema, a tool
round trip with OpenAI-style `call_...` ids, the SDK's stream helper assembling the same calls, `parse()` with a
pydantic model, `json_object` output that parses over 20 seeds, `models.retrieve`, `completions.create`, and None for
every nullable parameter. The model is random: everything structured here holds because the grammar guide enforces
it, not because the model learned it.
"""

import asyncio
import inspect
import json
from typing import Annotated, Any, Iterator, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from cluster.serve.args import ServeArgs
from cluster.serve.resolved import resolve
from cluster.serve.standalone import build_standalone_app
from tests.test_api_fuzz import uvicorn_server

pytestmark = pytest.mark.e2e  # starts a server

CITY = {"type": "string", "maxLength": 12}
WEATHER_PARAMS = {"type": "object",
                  "properties": {"city": CITY, "unit": {"enum": ["celsius", "fahrenheit"]},
                                 "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["city", "unit"], "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
               "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.",
                                           "parameters": TIME_PARAMS}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 64  # room for a bounded call; the guide closes the JSON before the budget runs out


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: Annotated[str, Field(max_length=12)]
    unit: Literal["celsius", "fahrenheit"]
    days: Annotated[int, Field(ge=1, le=7)]


@pytest.fixture(scope="module")
def server(tiny_dir) -> Iterator[tuple[str, str]]:
    """(base URL, model name) of `moe-cluster serve --no-ray`'s app (its engine with the grammar guide)."""
    args = ServeArgs(model=str(tiny_dir), device="cpu", dtype="fp32", kv_cache_bytes=2**24, moe_backend="torch",
                     attention_backend="torch")
    resolved = resolve(args)
    app, engine = build_standalone_app(resolved)
    try:
        with uvicorn_server(app) as port:
            yield f"http://127.0.0.1:{port}/v1", resolved.model_name
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def client(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server[0], api_key="none", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(server) -> str:
    return server[1]


def _async_client(server: tuple[str, str]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server[0], api_key="none", max_retries=0, timeout=120)


def check_schema(value: Any, schema: dict, where: str = "arguments") -> None:
    """`value` matches the JSON schema `schema` (jsonschema's validator), or the test fails naming `where`."""
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.path))
    assert not errors, f"{where}: {errors[0].message} (at {list(errors[0].path)})"


def _check_calls(calls: list, named: str | None, seed: int) -> list[tuple[str, str]]:
    """Each call is a tool's (of `named`, when given) with arguments valid for its schema; (name, arguments)."""
    assert calls, f"no tool call (seed {seed})"
    out = []
    for call in calls:
        assert call.type == "function" and isinstance(call.id, str) and call.id, call
        name = call.function.name
        assert name == named if named else name in SCHEMAS, f"{name} (seed {seed})"
        check_schema(json.loads(call.function.arguments), SCHEMAS[name], f"{name} arguments (seed {seed})")
        out.append((name, call.function.arguments))
    return out


def _choice(named: str | None) -> Any:
    return {"type": "function", "function": {"name": named}} if named else "required"


# -- tools ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("named", [None, "get_time"], ids=["required", "named"])
def test_forced_tool_calls_validate_and_stream_into_the_same_calls(client, server, model, named):
    """Non-streamed (sync and async) and streamed through the SDK's helper (sync and async): one seed, one call."""
    seed = 11
    kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=_choice(named), max_tokens=MAX_TOKENS, seed=seed,
              temperature=1.0)
    reason = "stop" if named else "tool_calls"  # OpenAI's: a forced named call finishes with "stop"
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == reason, r
    assert r.choices[0].message.role == "assistant"
    calls = _check_calls(r.choices[0].message.tool_calls, named, seed)

    with client.chat.completions.stream(**kw) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [(e.name, e.arguments) for e in done] == calls
    assert _check_calls(final.choices[0].message.tool_calls, named, seed) == calls
    assert final.choices[0].finish_reason == reason

    async def with_async_client() -> tuple[Any, Any]:
        async with _async_client(server) as aclient:
            plain = await aclient.chat.completions.create(**kw)
            async with aclient.chat.completions.stream(**kw) as astream:
                streamed = await astream.get_final_completion()
            return plain, streamed

    plain, streamed = asyncio.run(with_async_client())
    assert _check_calls(plain.choices[0].message.tool_calls, named, seed) == calls
    assert _check_calls(streamed.choices[0].message.tool_calls, named, seed) == calls


def test_raw_streamed_tool_call_deltas_add_up_to_the_call(client, model):
    """OpenAI's delta shape, read without the helper: the first delta of a call has index, id, type and name;
    the argument fragments concatenate to the non-streamed arguments."""
    kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=MAX_TOKENS, seed=5)
    (name, arguments), = _check_calls(client.chat.completions.create(**kw, parallel_tool_calls=False)
                                      .choices[0].message.tool_calls, None, 5)
    firsts, fragments, reasons = [], [], []
    for chunk in client.chat.completions.create(**kw, parallel_tool_calls=False, stream=True):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for d in choice.delta.tool_calls or []:
                assert d.index == 0, d
                if d.id is not None:
                    firsts.append((d.id, d.type, d.function.name))
                fragments.append(d.function.arguments or "")
    assert len(firsts) == 1 and firsts[0][1] == "function" and firsts[0][2] == name, firsts
    assert "".join(fragments) == arguments
    assert reasons[-1] == "tool_calls" and set(reasons[:-1]) == {None}, reasons


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_tool_round_trip_with_openai_call_ids(client, server, model, use_async):
    """A call, then its result under an OpenAI-style id (`call_` + 24 characters, what OpenAI and the SDK's own
    examples carry, not the model's 9-character form), then the answer."""
    seed = 3
    first = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=MAX_TOKENS, seed=seed)
    (name, arguments), *_ = _check_calls(first.choices[0].message.tool_calls, None, seed)
    returned_id = first.choices[0].message.tool_calls[0].id
    for call_id in (returned_id, "call_DdmO9pD3xa9XTPNJ32zg2hcA"):
        messages = [*ASK,
                    {"role": "assistant", "content": None,
                     "tool_calls": [{"id": call_id, "type": "function",
                                     "function": {"name": name, "arguments": arguments}}]},
                    {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"temperature_c": 22})}]
        kw = dict(model=model, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8, seed=seed)
        if use_async:
            async def ask() -> Any:
                async with _async_client(server) as aclient:
                    return await aclient.chat.completions.create(**kw)

            answer = asyncio.run(ask())
        else:
            answer = client.chat.completions.create(**kw)
        message = answer.choices[0].message
        assert isinstance(message.content, str) and not message.tool_calls, (call_id, message)
        assert answer.choices[0].finish_reason in ("stop", "length"), answer
        assert answer.usage.prompt_tokens > 0


def test_tools_reach_the_prompt_and_none_leaves_them_out(client, model):
    base = client.chat.completions.create(model=model, messages=ASK, max_tokens=1, seed=0).usage.prompt_tokens
    offered = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=1,
                                             seed=0).usage.prompt_tokens
    declined = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="none",
                                              max_tokens=1, seed=0).usage.prompt_tokens
    assert offered > base == declined, (base, offered, declined)


# -- structured output ---------------------------------------------------------------------------------------------
def test_parse_with_a_pydantic_model(client, server, model):
    kw = dict(model=model, messages=ASK, response_format=Weather, max_tokens=MAX_TOKENS, temperature=1.0)
    for seed in (1, 2):
        parsed = client.chat.completions.parse(**kw, seed=seed).choices[0].message.parsed
        assert isinstance(parsed, Weather), f"seed {seed}: {parsed!r}"
    with client.chat.completions.stream(**kw, seed=1) as stream:
        streamed = stream.get_final_completion().choices[0].message.parsed
    assert isinstance(streamed, Weather)

    async def with_async_client() -> Any:
        async with _async_client(server) as aclient:
            return (await aclient.chat.completions.parse(**kw, seed=1)).choices[0].message.parsed

    assert asyncio.run(with_async_client()) == client.chat.completions.parse(**kw, seed=1).choices[0].message.parsed


def test_json_object_output_parses_over_20_seeds(server, model):
    """20 concurrent requests (async client), half of them streamed."""
    async def one(aclient: openai.AsyncOpenAI, seed: int) -> str:
        kw = dict(model=model, messages=[{"role": "user", "content": "Describe a cat as JSON."}], seed=seed,
                  response_format={"type": "json_object"}, max_tokens=MAX_TOKENS, temperature=1.0)
        if seed % 2 == 0:
            return (await aclient.chat.completions.create(**kw)).choices[0].message.content
        parts = [c.choices[0].delta.content or "" async for c in await aclient.chat.completions.create(**kw,
                                                                                                       stream=True)
                 if c.choices]
        return "".join(parts)

    async def run_all() -> list[str]:
        async with _async_client(server) as aclient:
            return await asyncio.gather(*(one(aclient, seed) for seed in range(20)))

    for seed, content in enumerate(asyncio.run(run_all())):
        try:
            value = json.loads(content)
        except json.JSONDecodeError as e:
            pytest.fail(f"seed {seed}: not JSON ({e}): {content!r}")
        assert isinstance(value, dict), f"seed {seed}: {content!r}"


def test_json_schema_output_validates(client, model):
    schema = {"type": "object", "properties": {"city": CITY, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model=model, messages=ASK, response_format=fmt, max_tokens=MAX_TOKENS,
                                           seed=seed, temperature=1.0)
        check_schema(json.loads(r.choices[0].message.content), schema, f"seed {seed}")


def test_a_schema_the_engine_cannot_compile_is_a_400_naming_response_format(client, model):
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=ASK, response_format=fmt, max_tokens=4)
    assert e.value.body["param"] == "response_format", e.value.body
    assert "response_format" in e.value.body["message"]


# -- models, completions and nulls ---------------------------------------------------------------------------------
def test_models_retrieve(client, model):
    card = client.models.retrieve(model)
    assert card.id == model and card.object == "model"
    assert [m.id for m in client.models.list()] == [model]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_completions_create_streamed_and_not(client, server, model, use_async):
    kw = dict(model=model, prompt="The capital of France is", max_tokens=12, seed=7, temperature=1.0, logprobs=2)

    async def with_async_client() -> tuple[Any, list[Any]]:
        async with _async_client(server) as aclient:
            plain = await aclient.completions.create(**kw)
            chunks = [c async for c in await aclient.completions.create(
                **kw, stream=True, stream_options={"include_usage": True})]
            return plain, chunks

    if use_async:
        plain, chunks = asyncio.run(with_async_client())
    else:
        plain = client.completions.create(**kw)
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert plain.object == "text_completion" and plain.system_fingerprint
    choice, = plain.choices
    assert choice.finish_reason in ("stop", "length") and choice.text
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text, (lp.tokens, choice.text)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 3 and top[tok] == value for tok, value, top in zip(lp.tokens, lp.token_logprobs,
                                                                             lp.top_logprobs))
    assert plain.usage.completion_tokens == len(lp.tokens) <= 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    *deltas, last = chunks
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in deltas) == choice.text
    assert deltas[-1].choices[0].finish_reason == choice.finish_reason
    assert last.choices == [] and last.usage.completion_tokens == plain.usage.completion_tokens


def test_completions_refuse_suffix_and_best_of_by_name(client, model):
    for field, value in (("suffix", "end"), ("best_of", 2)):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt="hi", max_tokens=2, **{field: value})
        assert e.value.body["param"] == field and field in e.value.body["message"], e.value.body


def test_vllm_extensions_through_extra_body_and_unknown_fields_refused(client, model):
    """What clients of vLLM send through the SDK's extra_body: min_tokens holds back an end the model wants at once
    (EOS biased +100), every token has its logprob, continuous_usage_stats puts usage in every chunk; a field this
    server does not know is a 400 naming it (the SDK's BadRequestError), never ignored."""
    from cluster.tokenizer import load_tokenizer

    eos = load_tokenizer("v3").eos_id
    kw = dict(model=model, messages=ASK, max_tokens=8, temperature=0, logit_bias={str(eos): 100})
    r = client.chat.completions.create(**kw, logprobs=True, extra_body={"min_tokens": 3})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason, len(r.choices[0].logprobs.content)) == (4, "stop", 4)
    chunks = list(client.chat.completions.create(**kw, stream=True, extra_body={"min_tokens": 3}, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks) and chunks[-1].usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw, extra_body={"best_of": 2})
    assert e.value.body["param"] == "best_of" and "Unrecognized request argument" in e.value.body["message"]


def test_completions_score_a_list_of_prompts_with_echo(client, model):
    """What lm-eval's OpenAI-SDK client sent to score prompts: token-id lists, echo, max_tokens 0, logprobs 5."""
    prompts = [[1, 1782, 6333, 1117], [1, 1782, 6333]]
    r = client.completions.create(model=model, prompt=prompts, echo=True, max_tokens=0, temperature=0.0, logprobs=5,
                                  seed=1234)
    assert [c.index for c in r.choices] == [0, 1]
    for choice, ids in zip(r.choices, prompts):
        lp = choice.logprobs
        assert choice.finish_reason == "length" and len(lp.tokens) == len(ids) and "".join(lp.tokens) == choice.text
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(top[tok] == value and len(top) <= 6 for tok, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:],
                                                                                 lp.top_logprobs[1:]))
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 0


def _nullable(method: Any) -> list[str]:
    """The SDK method's parameters that take None (Optional[...] or Union[..., None] in its signature)."""
    return [name for name, p in inspect.signature(method).parameters.items()
            if ("Optional[" in str(p.annotation) or ", None]" in str(p.annotation))
            and name not in ("extra_headers", "extra_query", "extra_body")]


def test_none_for_every_nullable_parameter(client, model):
    chat_nulls = _nullable(client.chat.completions.create)
    assert {"n", "stream", "logprobs", "frequency_penalty", "presence_penalty", "seed", "stop", "temperature",
            "top_p", "logit_bias", "max_tokens", "max_completion_tokens", "stream_options"} <= set(chat_nulls)
    # Each limit is None once, with the other one bounding the reply.
    for limit, other in (("max_tokens", "max_completion_tokens"), ("max_completion_tokens", "max_tokens")):
        nulls = {name: None for name in chat_nulls if name != other}
        r = client.chat.completions.create(model=model, messages=ASK, **nulls, **{other: 4})
        assert r.choices[0].message.content is not None and r.usage.completion_tokens <= 4, (limit, r)
    completion_nulls = {name: None for name in _nullable(client.completions.create)}
    assert {"prompt", "best_of", "echo", "suffix", "logprobs", "max_tokens", "stream"} <= set(completion_nulls)
    r = client.completions.create(model=model, **completion_nulls)  # prompt None: a new document
    assert r.choices[0].text is not None and r.usage.completion_tokens <= 16  # OpenAI's default max_tokens
