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
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters: exactly {}
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
    assert tool_matches(tok, tool_calls_id, grammar, ' [{"name": "get_time", "arguments": {}}]')
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
    ' [{"name": "get_time", "arguments": {"zone": "UTC"}}]',  # an argument of a function without parameters
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


@pytest.mark.parametrize("parameters", [None, {}, {"type": "object", "properties": {}}])
def test_a_function_without_parameters_takes_exactly_an_empty_object(tok, tool_calls_id, parameters):
    """However a client says "no parameters" (left out, empty, or the empty object schema the prompt shows), a forced
    call's arguments are {}: the grammar admits no key at all, so none can be invented."""
    function = {"name": "ping"} | ({} if parameters is None else {"parameters": parameters})
    grammar = tool_call_grammar([{"type": "function", "function": function}], "ping", parallel=False)
    assert tool_matches(tok, tool_calls_id, grammar, ' [{"name": "ping", "arguments": {}}]')
    for invented in ('{"a": 1}', '{"": ""}', '{"ping": true}'):
        assert not tool_matches(tok, tool_calls_id, grammar, f' [{{"name": "ping", "arguments": {invented}}}]')
    matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
    assert matcher.consume_tokens([tool_calls_id, *tok.tokenize_str(' [{"name": "ping", "arguments": {')])
    assert tok.decode_str(matcher.compute_ff_tokens()) == "}}]"  # nothing but the closers can follow


def test_tool_names_needing_escapes_stay_inside_the_json(tok, tool_calls_id):
    name = 'a"}\n<TOOL_CALLS> é'
    grammar = tool_call_grammar([{"type": "function", "function": {"name": name}}], None, parallel=False)
    check_grammar(grammar, "v3", 1024)
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
    check_grammar(json_grammar(None), "v3", 1024)
    check_grammar(json_grammar(SCHEMA), "v3", 1024)
    check_grammar(tool_call_grammar(TOOLS, None, parallel=True), "v3", 1024)
    check_grammar(tool_call_grammar(TOOLS, "get_weather", parallel=False), "v3", 1024)


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
            check_grammar(grammar, "v3", 1024)
        message = str(info.value)
        assert message.startswith("invalid JSON schema: "), message
        assert "\n" not in message and len(message) <= MAX_ERROR_CHARS, message
        assert "lark" not in message.lower() and "%json" not in message and "at 2(" not in message, message
        if schema != {"enum": []}:  # a tool's empty enum reads as its required arguments being unsatisfiable
            assert words in message, message


SELF_REQUIRED = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}  # a $ref to the root
NODE = {"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}, "required": ["next"]}},
        "$ref": "#/$defs/node"}


@pytest.mark.parametrize("schema,words", [
    (SELF_REQUIRED, "too many items"),  # no finite output: llguidance's limit stops the search
    (NODE, "too many items"),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": 10**9}}, "required": ["a"]},
     "no output of at most 256 tokens"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 10**5}}, "required": ["a"]},
     "no output of at most 256 tokens"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 200}, "no output of at most 256 tokens"),
])
def test_schemas_without_an_output_within_max_tokens_are_refused(schema, words):
    """Schemas llguidance compiles but that have no output a request could get (they used to fail the engine's
    step, and every request in it, or to run to max_tokens and answer 200 with JSON that does not parse)."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    grammars_ = [json_grammar(schema)]
    if "$defs" not in schema:  # (a tool's "#/..." refers to the root of the calls' schema, not of its parameters)
        grammars_.append(tool_call_grammar(tools, "f", parallel=False))
    for grammar in grammars_:
        with pytest.raises(GrammarError) as info:
            check_grammar(grammar, "v3", 256)
        message = str(info.value)
        assert words in message.lower() and "\n" not in message and len(message) <= 300, message
        assert "ff_tokens" not in message and "<state>" not in message, message


def test_a_schema_whose_required_parts_exceed_max_tokens_is_refused_for_that_budget_only():
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "array", "minItems": 3}},
              "required": ["a", "b"]}  # '{"a": "", "b": ["", "", ""]}': 15 tokens
    grammar = json_grammar(schema)
    with pytest.raises(GrammarError, match="max_tokens"):
        check_grammar(grammar, "v3", 14)
    check_grammar(grammar, "v3", 15)
    with pytest.raises(GrammarError, match="max_tokens"):
        check_grammar(grammar, "v3", 14)  # from the cache, as before


EMOJI = "\U0001F600" * 30


@pytest.mark.parametrize("schema,keyword", [
    ({"type": "string", "maxLength": EMOJI}, "maxLength must be a number"),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": EMOJI}}}, "/properties/a: minLength"),
    ({"anyOf": [{"type": "integer"}, {"type": "integer", "minimum": EMOJI}]}, "/anyOf/1: minimum"),
    ({"type": "object", "required": EMOJI}, "required must be a list"),
    ({"type": "array", "items": {"type": "string", "pattern": [EMOJI]}}, "/items: pattern must be a string"),
])
def test_keywords_of_the_wrong_type_are_refused_by_name(schema, keyword):
    """Values llguidance panics on (quoting them in its error) are refused before it sees them, by their place in
    the schema and never quoting them."""
    with pytest.raises(GrammarError) as info:
        json_grammar(schema)
    assert keyword in str(info.value) and EMOJI[:1] not in str(info.value), str(info.value)


def test_values_that_are_data_are_not_taken_for_keywords():
    schema = {"type": "object", "properties": {"minLength": {"type": "string"}},
              "default": {"minLength": "x"}, "examples": [{"pattern": 1}], "enum": [{"maxItems": "many"}]}
    assert json_grammar(schema)


def test_a_panic_inside_the_grammar_engine_is_a_refusal():
    """A grammar that makes llguidance panic (here one built without our checks) is refused in one plain line: the
    panic (a BaseException) never reaches the server as a plain-text 500."""
    raw = llguidance.LLMatcher.grammar_from_json_schema({"type": "string", "maxLength": EMOJI})
    with pytest.raises(GrammarError, match="cannot read it") as info:
        check_grammar(raw, "v3", 256)
    assert EMOJI[:1] not in str(info.value)


@pytest.mark.parametrize("string", [
    {"format": "email"}, {"format": "date-time"}, {"format": "date"}, {"format": "time"}, {"format": "uuid"},
    {"format": "ipv4"}, {"format": "ipv6"}, {"format": "hostname"}, {"format": "uri"}, {"format": "duration"},
    {"pattern": "^[A-Z]{3}$"}, {"pattern": "^\\d{3}-\\d{4}$"}, {"pattern": "^\\+?[1-9]\\d{1,14}$"},
    {"pattern": "^(red|green|blue)$"}, {"pattern": "^#[0-9a-fA-F]{6}$"}, {"pattern": "^a+b$"},
    {"pattern": "^[^@]+@[^@]+\\.[a-z]{2,}$"}, {"pattern": "^[\\w.-]+@[\\w-]+\\.[a-z]{2,3}$"},
    {"pattern": "^https?://.+$"}, {"pattern": "^(?:[01]\\d|2[0-3]):[0-5]\\d$"}, {"minLength": 100},
])
def test_strings_with_formats_and_patterns_are_admitted(string):
    """The search for an output finds one for common formats and patterns: none is refused as having no end."""
    schema = {"type": "object", "properties": {"s": {"type": "string"} | string}, "required": ["s"]}
    check_grammar(json_grammar(schema), "v3", 64)


def test_the_check_is_bounded_in_time_and_a_timeout_is_not_a_verdict_for_the_next_request(monkeypatch):
    monkeypatch.setattr(grammars, "CHECK_SECONDS", 0.05)
    calls = []
    judge = grammars._judge
    monkeypatch.setattr(grammars, "_judge", lambda g, v, m: calls.append(g) or judge(g, v, m))
    grammar = json_grammar({"type": "array", "minItems": 100_000})
    for _ in range(2):
        with pytest.raises(GrammarError, match="too complex"):  # 100,000 items to find: seconds without the bound
            check_grammar(grammar, "v3", 1_000_000)
    assert len(calls) == 2  # a busy machine's timeout is judged again, never cached


def test_verdicts_are_cached(monkeypatch):
    calls = []
    judge = grammars._judge
    monkeypatch.setattr(grammars, "_judge", lambda g, v, m: calls.append(g) or judge(g, v, m))
    good = json_grammar({"type": "object", "properties": {"cached": {"type": "boolean"}}})
    bad = json_grammar({"type": "cached-nonsense"})
    for _ in range(3):
        check_grammar(good, "v3", 1024)
        with pytest.raises(GrammarError, match="cached-nonsense"):
            check_grammar(bad, "v3", 1024)
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
    check_grammar(json_grammar(nested), "v3", 1024)


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
                                      "arguments": t["function"].get("parameters") or {
                                          "type": "object", "additionalProperties": False}},
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
