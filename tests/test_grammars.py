"""Grammars for structured output and forced tool calls: each matches what it should and refuses the rest, read
token by token by llguidance with the v3 tokenizer; random walks along the grammar's token masks end in JSON that
validates; a client's schema is bounded and an invalid one gets a one-line message."""

from __future__ import annotations

import json

import numpy as np
import pytest

llguidance = pytest.importorskip("llguidance")
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask  # noqa: E402

from cluster.api import grammars  # noqa: E402
from cluster.api.grammars import (GrammarError, MAX_ERROR_CHARS, check_grammar, json_grammar,  # noqa: E402
                                  tool_call_grammar)
from cluster.tokenizer.grammar import grammar_tokenizer, token_bytes  # noqa: E402
from cluster.tokenizer.mistral import load_tokenizer  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["c", "f"]},
                                                    "days": {"type": "integer"}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters: any object
TOOLS = [WEATHER, TIME]
PARIS = ' [{"name": "get_weather", "arguments": {"city": "Paris"}}]'
TWO = ' [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'


@pytest.fixture(scope="module")
def tok():
    return grammar_tokenizer("v3")


@pytest.fixture(scope="module")
def tool_calls_id():
    return load_tokenizer("v3").control_token("[TOOL_CALLS]")


def matches(tok, grammar: str, text: str, prefix: tuple[int, ...] = ()) -> bool:
    """Whether the grammar takes exactly `text` (after the `prefix` tokens) and is then complete."""
    matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens([*prefix, *tok.tokenize_str(text)]) and matcher.is_accepting()


def tool_matches(tok, tool_calls_id, grammar: str, text: str) -> bool:
    return matches(tok, grammar, text, prefix=(tool_calls_id,))


# -- JSON

@pytest.mark.parametrize("text", ['{}', '{"a": 1}', '{"a": [1, {"b": null}], "c": "x\\"y", "d": true}'])
def test_json_object_takes_compact_json_objects(tok, text):
    assert matches(tok, json_grammar(None), text)


@pytest.mark.parametrize("text", ['[1]', '"s"', '{"a":1}', '{"a": 1,"b": 2}', '{"a": 1 }', ' {}', '{"a": 1', '{} x'])
def test_json_object_refuses_other_text(tok, text):
    assert not matches(tok, json_grammar(None), text)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("text", ['{"name": "Ann", "age": 3}', '{"name": "Ann", "age": 3, "tags": ["a", "b"]}'])
def test_json_schema_takes_matching_json(tok, text):
    assert matches(tok, json_grammar(SCHEMA), text)


@pytest.mark.parametrize("text", ['{"name": "Ann"}', '{"name": "Ann", "age": "3"}', '{"name": "Ann", "age": 3, "x": 1}',
                                  '{"name": "Ann", "age": 3, "tags": ["a", "b", "c"]}', '{"name": "Ann","age": 3}'])
def test_json_schema_refuses_what_it_excludes(tok, text):
    assert not matches(tok, json_grammar(SCHEMA), text)


def test_client_compiler_options_are_ignored(tok):
    schema = {"type": "object", "x-guidance": {"whitespace_flexible": True, "item_separator": ","}}
    assert matches(tok, json_grammar(schema), '{"a": 1, "b": 2}')
    assert not matches(tok, json_grammar(schema), '{"a": 1,"b": 2}')
    assert not matches(tok, json_grammar(schema), '{ "a": 1}')


# -- tool calls

def test_tool_call_takes_one_call(tok, tool_calls_id):
    grammar = tool_call_grammar(TOOLS, None, parallel=False)
    assert tool_matches(tok, tool_calls_id, grammar, PARIS)
    assert tool_matches(tok, tool_calls_id, grammar, ' [{"name": "get_time", "arguments": {"zone": "UTC"}}]')
    assert tool_matches(tok, tool_calls_id, grammar,
                        ' [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c", "days": 3}}]')


@pytest.mark.parametrize("text", [
    ' [{"name": "get_wether", "arguments": {"city": "Paris"}}]',  # no such tool
    TWO,  # two calls, not parallel
    ' [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}]',  # extra property
    ' [{"name": "get_weather", "arguments": {"city": "Paris", "country": "FR"}}]',  # extra argument
    ' [{"name": "get_weather", "arguments": {"unit": "c"}}]',  # missing required argument
    ' [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "k"}}]',  # not in the enum
    ' [{"name": "get_weather"}]',  # no arguments
    ' []',  # no call
    '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',  # no space after [TOOL_CALLS]
    '  [{"name": "get_weather", "arguments": {"city": "Paris"}}]',  # two spaces
    ' [{"name":"get_weather", "arguments": {"city": "Paris"}}]',  # no space after ":"
    ' [{"name": "get_weather" , "arguments": {"city": "Paris"}}]',  # space before ","
    ' [ {"name": "get_weather", "arguments": {"city": "Paris"}}]',  # space inside "["
    ' [{"name": "get_weather", "arguments": {"city": "Paris"}}] ',  # trailing space
])
def test_tool_call_refuses_other_text(tok, tool_calls_id, text):
    assert not tool_matches(tok, tool_calls_id, tool_call_grammar(TOOLS, None, parallel=False), text)


def test_tool_call_needs_the_control_token(tok):
    assert not matches(tok, tool_call_grammar(TOOLS, None, parallel=False), PARIS)
    assert not matches(tok, tool_call_grammar(TOOLS, None, parallel=False), "[TOOL_CALLS]" + PARIS)


def test_parallel_tool_calls_take_several(tok, tool_calls_id):
    assert tool_matches(tok, tool_calls_id, tool_call_grammar(TOOLS, None, parallel=True), TWO)
    assert tool_matches(tok, tool_calls_id, tool_call_grammar(TOOLS, None, parallel=True), PARIS)
    assert not tool_matches(tok, tool_calls_id, tool_call_grammar(TOOLS, None, parallel=True), ' []')


def test_named_tool_takes_only_that_tool(tok, tool_calls_id):
    grammar = tool_call_grammar(TOOLS, "get_time", parallel=True)
    assert tool_matches(tok, tool_calls_id, grammar, ' [{"name": "get_time", "arguments": {}}]')
    assert not tool_matches(tok, tool_calls_id, grammar, PARIS)
    assert not tool_matches(tok, tool_calls_id, grammar, TWO)


def test_tool_names_needing_escapes_stay_inside_the_json(tok, tool_calls_id):
    name = 'a"}\n<TOOL_CALLS> é'
    grammar = tool_call_grammar([{"type": "function", "function": {"name": name}}], None, parallel=False)
    check_grammar(grammar, "v3")
    assert tool_matches(tok, tool_calls_id, grammar, " " + json.dumps([{"name": name, "arguments": {}}],
                                                                       ensure_ascii=False))


@pytest.mark.parametrize("tools,name,words", [
    ([], None, "non-empty"),
    ([{"type": "function", "function": {}}], None, "tools[0] has no function name"),
    ([{"type": "function"}], None, "tools[0] has no function name"),
    (TOOLS, "nope", "no tool named 'nope'"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], None, "tools[0].function.parameters"),
    ([TIME] * (grammars.MAX_TOOLS + 1), None, "too many tools"),
])
def test_malformed_tools_are_refused(tools, name, words):
    with pytest.raises(GrammarError, match=words.replace("[", r"\[").replace("]", r"\]")):
        tool_call_grammar(tools, name, parallel=True)


# -- checks and bounds

def test_valid_grammars_pass_the_check():
    check_grammar(json_grammar(None), "v3")
    check_grammar(json_grammar(SCHEMA), "v3")
    check_grammar(tool_call_grammar(TOOLS, None, parallel=True), "v3")
    check_grammar(tool_call_grammar(TOOLS, "get_weather", parallel=False), "v3")


@pytest.mark.parametrize("schema,words", [
    ({"$ref": "#/$defs/missing"}, "$ref target '#/$defs/missing' does not exist"),
    ({"$ref": "https://example.com/schema.json"}, "$ref 'https://example.com/schema.json' cannot be resolved"),
    ({"type": "strng"}, "Invalid type: strng"),
    ({"type": "string", "pattern": "(("}, "invalid regular expression in pattern: unclosed group"),
    ({"type": "string", "pattern": "(?=a)"}, "invalid regular expression in pattern: look-around"),
    ({"oneOf": [{"type": "string"}, {"type": "string"}]}, "oneOf constraints are not supported"),
    ({"type": "string", "format": "bogus"}, "Unknown format: bogus"),
    ({"if": {"type": "string"}}, 'unsupported keywords: ["if"]'),
    ({"type": "string", "minLength": -1}, "minLength"),
    ({"enum": []}, "Unsatisfiable schema"),
])
def test_invalid_schemas_get_one_plain_line(schema, words):
    for grammar in (json_grammar(schema),
                    tool_call_grammar([{"type": "function", "function": {"name": "f", "parameters": schema}}],
                                      None, parallel=False)):
        with pytest.raises(GrammarError) as info:
            check_grammar(grammar, "v3")
        message = str(info.value)
        assert message.startswith("invalid JSON schema: "), message
        assert "\n" not in message and len(message) <= MAX_ERROR_CHARS, message
        assert "lark" not in message.lower() and "%json" not in message and "at 2(" not in message, message
        if schema != {"enum": []}:  # a tool's empty enum reads as its required arguments being unsatisfiable
            assert words in message, message


def test_verdicts_are_cached(monkeypatch):
    calls = []
    validate = grammars._validate
    monkeypatch.setattr(grammars, "_validate", lambda g, v: calls.append(g) or validate(g, v))
    good = json_grammar({"type": "object", "properties": {"cached": {"type": "boolean"}}})
    bad = json_grammar({"type": "cached-nonsense"})
    for _ in range(3):
        check_grammar(good, "v3")
        with pytest.raises(GrammarError, match="cached-nonsense"):
            check_grammar(bad, "v3")
    assert calls == [good, bad]


def test_cache_is_bounded():
    lru = grammars._LRU(2)
    for key in "abc":
        lru.put((key, "v3"), key)
    assert lru.get(("a", "v3")) is None and lru.get(("b", "v3")) == "b" and lru.get(("c", "v3")) == "c"
    lru.get(("b", "v3"))  # most recent now
    lru.put(("d", "v3"), "d")
    assert lru.get(("c", "v3")) is None and lru.get(("b", "v3")) == "b"


def test_schema_bounds():
    big = {"type": "object", "description": "x" * grammars.MAX_SCHEMA_CHARS}
    with pytest.raises(GrammarError, match="too large"):
        json_grammar(big)
    deep: dict = {"type": "object"}
    for _ in range(grammars.MAX_SCHEMA_DEPTH):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(GrammarError, match="nested too deeply"):
        json_grammar(deep)
    with pytest.raises(GrammarError, match="too large"):
        tool_call_grammar([WEATHER, {"type": "function", "function": {"name": "f", "parameters": big}}], None, True)
    many = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"description": "x" * 60_000}}}
            for i in range(10)]
    with pytest.raises(GrammarError, match="tools' schemas are too large"):
        tool_call_grammar(many, None, True)
    for not_a_schema in ([1], "object", 3):
        with pytest.raises(GrammarError, match="must be a JSON object"):
            json_grammar(not_a_schema)  # type: ignore[arg-type]
    with pytest.raises(GrammarError, match="is not JSON"):
        json_grammar({"type": "object", "default": {1, 2}})


def test_schema_within_bounds_passes():
    nested: dict = {"type": "object"}
    for _ in range(10):
        nested = {"type": "object", "properties": {"a": nested}}
    check_grammar(json_grammar(nested), "v3")


# -- random walks: whatever path a model takes through the masks, the result parses and validates

def _valid(value, schema: dict) -> bool:
    """A tiny JSON-schema check covering the keywords used here."""
    if "anyOf" in schema:
        return any(_valid(value, s) for s in schema["anyOf"])
    if "const" in schema and value != schema["const"]:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if kind == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
        return False
    if kind in types and not isinstance(value, types[kind]):
        return False
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and any(key not in properties for key in value):
            return False
        return all(_valid(v, properties[k]) for k, v in value.items() if k in properties)
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return False
        return all(_valid(v, schema.get("items", {})) for v in value)
    return True


CALLS_SCHEMA = {"type": "array", "minItems": 1, "items": {"anyOf": [
    {"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                      "arguments": t["function"].get("parameters") or {"type": "object"}},
     "required": ["name", "arguments"], "additionalProperties": False} for t in TOOLS]}}


def _random_walk(tok, grammar: str, prefix: list[int], seed: int, explore: int = 20, max_steps: int = 400) -> str:
    """Follow the grammar's masks with random tokens, preferring closing ones after `explore` steps."""
    rng = np.random.default_rng(seed)
    pieces = token_bytes("v3")
    closing = np.array([bool(p) and all(b in b'"}]' for b in p) for p in pieces])
    matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
    assert matcher.consume_tokens(prefix), matcher.get_error()
    mask = allocate_token_bitmask(1, tok.vocab_size)
    tokens: list[int] = []
    for step in range(max_steps):
        if matcher.is_accepting():
            break
        fill_next_token_bitmask(matcher, mask)
        allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:tok.vocab_size])
        allowed = allowed[allowed != tok.eos_token]
        assert allowed.size, f"seed {seed}: no token allowed after {tok.decode_str(tokens)!r}"
        if step >= explore and closing[allowed].any():
            allowed = allowed[closing[allowed]]
        token = int(rng.choice(allowed))
        assert matcher.consume_token(token), f"seed {seed}: {matcher.get_error()}"
        tokens.append(token)
    assert matcher.is_accepting(), f"seed {seed}: unfinished after {max_steps} steps: {tok.decode_str(tokens)!r}"
    return tok.decode_bytes(tokens).decode("utf-8")


@pytest.mark.parametrize("seed", range(8))
def test_random_walk_tool_calls_parse_and_validate(tok, tool_calls_id, seed):
    text = _random_walk(tok, tool_call_grammar(TOOLS, None, parallel=True), [tool_calls_id], seed)
    assert text.startswith(" [") and text == " " + json.dumps(json.loads(text), ensure_ascii=False), (seed, text)
    assert _valid(json.loads(text), CALLS_SCHEMA), (seed, text)


@pytest.mark.parametrize("seed", range(4))
def test_random_walk_single_tool_call(tok, tool_calls_id, seed):
    text = _random_walk(tok, tool_call_grammar(TOOLS, "get_weather", parallel=False), [tool_calls_id], seed)
    calls = json.loads(text)
    assert len(calls) == 1 and calls[0]["name"] == "get_weather", (seed, text)
    assert _valid(calls, CALLS_SCHEMA), (seed, text)


@pytest.mark.parametrize("seed", range(4))
def test_random_walk_json_schema(tok, seed):
    text = _random_walk(tok, json_grammar(SCHEMA), [], seed)
    assert _valid(json.loads(text), SCHEMA), (seed, text)


@pytest.mark.parametrize("seed", range(4))
def test_random_walk_json_object(tok, seed):
    text = _random_walk(tok, json_grammar(None), [], seed)
    assert isinstance(json.loads(text), dict), (seed, text)
