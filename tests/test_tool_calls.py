"""Tool calls read from the text after [TOOL_CALLS]: the same calls however the text is cut into fragments, argument
deltas that concatenate to the final arguments, and malformed or cut-short text that never raises. Tool-call ids."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.api.tool_calls import ParsedToolCall, ToolCallDelta, ToolCallParser, model_tool_id, new_tool_id

ID = re.compile(r"[0-9A-Za-z]{9}")

PARIS = ' [{"name": "get_weather", "arguments": {"city": "Paris"}}]'
# (text, [(name, arguments)], leftover)
CASES = {
    "one": (PARIS, [("get_weather", '{"city": "Paris"}')], ""),
    "parallel": (' [{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}, '
                 '{"name": "get_time", "arguments": {}}, {"name": "sum", "arguments": {"a": -1.5e3, "b": true}}]',
                 [("get_weather", '{"city": "Paris", "days": [1, 2]}'), ("get_time", "{}"),
                  ("sum", '{"a": -1.5e3, "b": true}')], ""),
    "escapes": (r' [{"name": "echo", "arguments": '
                r'{"s": "a\"b\\c\/d\n\u00e9\ud83d\ude00 ]}\"", "t": "Zürich 😀 東京"}}]',
                [("echo", r'{"s": "a\"b\\c\/d\n\u00e9\ud83d\ude00 ]}\"", "t": "Zürich 😀 東京"}')], ""),
    "escaped name": (r' [{"name": "f\u00e9\"x", "arguments": {}}]', [('fé"x', "{}")], ""),
    "arguments first": (' [{"arguments": {"city": "Paris"}, "name": "get_weather"}]',
                        [("get_weather", '{"city": "Paris"}')], ""),
    "string arguments": (r' [{"name": "get_weather", "arguments": "{\"city\": \"Par\\\"is\"}"}]',
                         [("get_weather", r'{"city": "Par\"is"}')], ""),
    "string arguments first": (r' [{"arguments": "{\"a\": 1}", "name": "f"}]', [("f", '{"a": 1}')], ""),
    "model id ignored": (' [{"id": "abcdefghi", "name": "f", "arguments": {"x": 1}, "extra": [{"name": "no"}]}]',
                         [("f", '{"x": 1}')], ""),
    "no arguments": (' [{"name": "f"}]', [("f", "{}")], ""),
    "lone object": (' {"name": "f", "arguments": {"x": null}}', [("f", '{"x": null}')], ""),
    "whitespace": ('\n [ {\n "name" : "f" ,\t"arguments" :{ "x" : 1 } } ,{"name":"g","arguments":{}} ] \n',
                   [("f", '{ "x" : 1 }'), ("g", "{}")], ""),
    "scalar arguments": (' [{"name": "f", "arguments": 12, "x": 1}, {"name": "g", "arguments": null}]',
                         [("f", "12"), ("g", "null")], ""),
    "trailing text": (PARIS + " and more", [("get_weather", '{"city": "Paris"}')], "and more"),
    "unnamed call": (' [{"arguments": {"a": 1}}, {"name": "f", "arguments": {}}]', [("f", "{}")],
                     '{"arguments": {"a": 1}}'),
    "garbage": (" I cannot call tools today.", [], "I cannot call tools today."),
    "garbage json": (' [1, 2]', [], "[1, 2]"),
    "empty": ("", [], ""),
    "empty array": (" []", [], "[]"),
    "broken after a call": (' [{"name": "f", "arguments": {}}, oops]', [("f", "{}")], "oops]"),
    "mismatched brackets": (' [{"name": "f", "arguments": {"a": [1}}]', [("f", '{"a": [1')], "}}]"),
    "bad escape in name": (r' [{"name": "f\x", "arguments": {}}]', [], r'[{"name": "f\x", "arguments": {}}]'),
}


def run(fragments: list[str]) -> tuple[list[ToolCallDelta], list[ParsedToolCall], str]:
    parser = ToolCallParser()
    deltas = [d for fragment in fragments for d in parser.feed(fragment)]
    calls, leftover = parser.finish()
    return deltas, calls, leftover


def check_deltas(deltas: list[ToolCallDelta], calls: list[ParsedToolCall], context: object) -> None:
    """Each call's first delta carries its id and name with no arguments; later ones only argument fragments,
    which concatenate to the call's arguments; indices run 0, 1, ... in order."""
    seen: dict[int, str] = {}
    for d in deltas:
        if d.index not in seen:
            assert d.index == len(seen), context
            assert (d.id, d.name, d.arguments) == (calls[d.index].id, calls[d.index].name, ""), context
            seen[d.index] = ""
        else:
            assert d.id is None and d.name is None and d.arguments, context
            assert d.index == len(seen) - 1, context  # calls stream one after another
            seen[d.index] += d.arguments
    assert list(seen) == list(range(len(calls))), context
    assert [seen[i] for i in range(len(calls))] == [c.arguments for c in calls], context
    assert all(ID.fullmatch(c.id) for c in calls), context


def summary(calls: list[ParsedToolCall]) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("case", CASES)
def test_whole_text(case):
    text, expected, leftover = CASES[case]
    deltas, calls, rest = run([text])
    assert summary(calls) == expected
    assert rest == leftover
    check_deltas(deltas, calls, case)


@pytest.mark.parametrize("case", CASES)
def test_split_anywhere(case):
    text, expected, leftover = CASES[case]
    for cut in range(len(text) + 1):
        deltas, calls, rest = run([text[:cut], text[cut:]])
        assert (summary(calls), rest) == (expected, leftover), (case, cut)
        check_deltas(deltas, calls, (case, cut))
    deltas, calls, rest = run(list(text))
    assert (summary(calls), rest) == (expected, leftover), (case, "by character")
    check_deltas(deltas, calls, (case, "by character"))


@pytest.mark.parametrize("seed", range(20))
def test_random_splits(seed):
    rng = random.Random(seed)
    for case, (text, expected, leftover) in CASES.items():
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        fragments = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        deltas, calls, rest = run(fragments)
        assert (summary(calls), rest) == (expected, leftover), (seed, case, fragments)
        check_deltas(deltas, calls, (seed, case, fragments))


def test_arguments_stream_before_the_call_closes():
    parser = ToolCallParser()
    first = parser.feed(' [{"name": "get_weather", "arguments": {"ci')
    assert [(d.index, d.name, d.arguments) for d in first] == [(0, "get_weather", ""), (0, None, '{"ci')]
    assert [d.arguments for d in parser.feed('ty": "Paris"}}, {"name": "')] == ['ty": "Paris"}']
    assert [(d.index, d.name) for d in parser.feed('f", ')] == [(1, "f")]


def test_arguments_before_name_are_held_back():
    parser = ToolCallParser()
    assert parser.feed(' [{"arguments": {"a": 1}, ') == []
    deltas = parser.feed('"name": "f"}]')
    assert [(d.index, d.name, d.arguments) for d in deltas] == [(0, "f", ""), (0, None, '{"a": 1}')]


def test_string_arguments_come_whole():
    parser = ToolCallParser()
    assert [d.arguments for d in parser.feed(r' [{"name": "f", "arguments": "{\"a\": ')] == [""]
    assert [d.arguments for d in parser.feed(r'1}"}]')] == ['{"a": 1}']


def test_string_arguments_cut_short_are_empty():
    deltas, calls, rest = run([r' [{"name": "f", "arguments": "{\"a\": 1'])
    assert summary(calls) == [("f", "")] and rest == ""
    check_deltas(deltas, calls, "cut string")


@pytest.mark.parametrize("case", ["parallel", "escapes", "arguments first", "whitespace", "model id ignored"])
def test_cut_short_anywhere(case):
    """A length cut: the calls so far, each with its arguments so far (a prefix of the final ones)."""
    text, expected, _ = CASES[case]
    for cut in range(len(text) + 1):
        deltas, calls, rest = run([text[:cut]])
        check_deltas(deltas, calls, (case, cut))
        assert len(calls) <= len(expected), (case, cut)
        for call, (name, arguments) in zip(calls, expected):
            assert call.name == name and arguments.startswith(call.arguments), (case, cut, call)
        assert rest == ("" if calls else text[:cut].strip()), (case, cut, rest)


def test_unnamed_call_cut_short_is_dropped():
    deltas, calls, rest = run([' [{"name": "f", "arguments": {}}, {"argu'])
    assert summary(calls) == [("f", "{}")] and rest == ""


@pytest.mark.parametrize("seed", range(10))
def test_malformed_text_never_raises(seed):
    """Random JSON-ish text, in random fragments: no exception, deltas consistent with the calls."""
    rng = random.Random(seed)
    alphabet = ['[', ']', '{', '}', '"', ':', ',', ' ', '\\', 'a', '1', '"name"', '"arguments"', '"f"', '"id"',
                'null', '\\u00e9', '\\"', 'é']
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 3)))
        fragments = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        deltas, calls, rest = run(fragments)
        check_deltas(deltas, calls, (seed, text))
        assert (summary(calls), rest) == (summary(run([text])[1]), run([text])[2]), (seed, text)


def test_unicode_escapes_decode_in_names_and_string_arguments():
    _, calls, _ = run([r' [{"name": "\ud83d\ude00", "arguments": "{\"s\": \"\u00e9\"}"}]'])
    assert summary(calls) == [("😀", '{"s": "é"}')]
    _, calls, _ = run([r' [{"name": "f", "arguments": "\ud800"}]'])  # a lone surrogate cannot be sent as UTF-8
    assert summary(calls) == [("f", "\ufffd")]


def test_round_trip_of_generated_calls():
    """Calls written the way mistral-common writes them come back exactly."""
    rng = random.Random(7)
    for trial in range(50):
        calls = [{"name": f"tool_{rng.randint(0, 9)}",
                  "arguments": {"q": "".join(rng.choice('ab "\\\n/é😀{}[]') for _ in range(rng.randint(0, 12))),
                                "n": rng.randint(-5, 5), "l": [None, True, 1.5]}}
                 for _ in range(rng.randint(1, 3))]
        text = " " + json.dumps(calls, ensure_ascii=rng.random() < 0.5)
        cuts = sorted(rng.sample(range(len(text) + 1), len(text) // 4))
        fragments = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        deltas, parsed, rest = run(fragments)
        assert rest == "" and [(c.name, json.loads(c.arguments)) for c in parsed] == \
            [(c["name"], c["arguments"]) for c in calls], (trial, text)
        check_deltas(deltas, parsed, (trial, text))


# -- ids

def test_model_tool_id_keeps_valid_ids():
    for client_id in ("abcDEF123", "000000000", "ZZZZZZZZZ"):
        assert model_tool_id(client_id) == client_id


@pytest.mark.parametrize("client_id", ["call_abc123", "", "abcDEF12", "abcDEF1234", "abcDEF12\n", "abcDEF12é",
                                       "abcd-fghi", "\ud800", "x" * 10_000])
def test_model_tool_id_maps_others_to_nine_alphanumerics(client_id):
    mapped = model_tool_id(client_id)
    assert ID.fullmatch(mapped) and mapped != client_id
    assert model_tool_id(client_id) == mapped


def test_model_tool_id_is_the_same_in_every_process():
    ids = ["call_abc123", "call_Xy", "toolu_01"]
    code = f"from cluster.api.tool_calls import model_tool_id; print([model_tool_id(i) for i in {ids!r}])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123"}, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == str([model_tool_id(i) for i in ids])
    assert model_tool_id("call_abc") == "t4mxTRtst"  # pinned: a change would break ids already sent to clients
    assert len({model_tool_id(f"call_{i}") for i in range(1000)}) == 1000


def test_new_tool_ids_are_fresh():
    ids = {new_tool_id() for _ in range(200)}
    assert len(ids) == 200 and all(ID.fullmatch(i) for i in ids)
