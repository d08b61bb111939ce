"""Ways to the end of a grammar (`PathFinder`), read by llguidance with the v3 tokenizer: a way found is accepted
token by token and completes the output with JSON that validates, from a grammar's start or from the middle of an
output; the search stays within its limit and leaves the matcher where it was."""

from __future__ import annotations

import json

import jsonschema
import pytest

llguidance = pytest.importorskip("llguidance")

from cluster.api.grammars import json_grammar, tool_call_grammar  # noqa: E402
from cluster.engine.grammar_paths import JsonLex, PathFinder  # noqa: E402
from cluster.tokenizer.grammar import grammar_tokenizer, special_token_ids, token_bytes  # noqa: E402
from tests.test_guided_budget import SCHEMAS  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return grammar_tokenizer("v3")


@pytest.fixture(scope="module")
def finder(tok):
    return PathFinder(token_bytes("v3"), special_token_ids("v3"), tok.eos_token)


def _text(tok, path: list[int]) -> str:
    return tok.decode_bytes([t for t in path if t != tok.eos_token]).decode("utf-8")


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_the_way_from_the_start_completes_the_output_with_valid_json(tok, finder, name):
    schema = SCHEMAS[name] or {"type": "object"}
    matcher = llguidance.LLMatcher(tok, json_grammar(SCHEMAS[name]), log_level=0)
    path = finder.find(matcher, 200)
    assert path is not None and finder.completes(matcher, path)
    jsonschema.validate(json.loads(_text(tok, path)), schema)
    assert matcher.consume_tokens(path) and matcher.is_stopped()  # the same, for real


@pytest.mark.parametrize("name,prefix", [
    ("patterns", '{"to": "ann'), ("patterns", '{"to": "a@b.c", "cc": ["x'),
    ("minItems after a free string", '{"a": "x\\'),  # inside an escape
    ("minItems after a free string", '{"a": "", "b": [{"c": [1, '),
])
def test_the_way_from_the_middle_of_an_output_ends_it(tok, finder, name, prefix):
    """From inside a pattern's string, an escape, or nested containers, given where the text stands."""
    matcher = llguidance.LLMatcher(tok, json_grammar(SCHEMAS[name]), log_level=0)
    assert matcher.consume_tokens(tok.tokenize_str(prefix)), matcher.get_error()
    lex = JsonLex()
    lex.feed(prefix.encode())
    path = finder.find(matcher, 64, lex)
    assert path is not None and finder.completes(matcher, path)
    jsonschema.validate(json.loads(prefix + _text(tok, path)), SCHEMAS[name])


def test_a_forced_tool_call_has_a_way_through_its_control_token(tok, finder):
    grammar = tool_call_grammar([{"type": "function", "function": {"name": "get_time"}}], None, parallel=True)
    path = finder.find(llguidance.LLMatcher(tok, grammar, log_level=0), 64)
    assert path is not None and tok.decode_str(path).startswith("<TOOL_CALLS>")
    assert json.loads(_text(tok, path[1:])) == [{"name": "get_time", "arguments": {}}]


def test_the_search_keeps_within_its_limit_and_leaves_the_matcher_as_it_was(tok, finder):
    matcher = llguidance.LLMatcher(tok, json_grammar(SCHEMAS["array of objects"]), log_level=0)
    assert matcher.consume_tokens(tok.tokenize_str('{"items": [{"sku": "ab'))
    lex = JsonLex(in_string=True)
    before = (matcher.compute_bitmask(), matcher.compute_ff_tokens(), matcher.is_accepting())
    path = finder.find(matcher, 200, lex)
    assert path is not None
    assert finder.find(matcher, len(path) - 1, lex) is None  # no way that short: this grammar needs more
    assert (matcher.compute_bitmask(), matcher.compute_ff_tokens(), matcher.is_accepting()) == before
    assert not matcher.is_error()


def test_a_grammar_with_no_end_is_found_to_have_none(tok, finder):
    """A schema that requires itself: llguidance stops at its limit on the way, and says so."""
    schema = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    matcher = llguidance.LLMatcher(tok, json_grammar(schema), log_level=0)
    assert finder.find(matcher, 4096) is None
    assert "Too many items" in matcher.get_error()
