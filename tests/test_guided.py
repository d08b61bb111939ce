"""Grammar-constrained decoding in the engine, on the random tiny model: outputs match their grammar and parse even
when max_tokens is short, a guided seeded choice is the same alone and in a mixed batch, and bad grammars are refused
before anything is kept."""

import json

import llguidance
import pytest
import torch

from cluster.engine.engine import LLMEngine
from cluster.engine.guided import GrammarError
from cluster.engine.outputs import RequestError
from cluster.engine.sampling_params import SamplingParams


# Each engine test runs in series and with steps scheduled ahead (`EngineConfig.async_scheduling`).
pytestmark = pytest.mark.both_schedulings


_FIXED = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def _json(schema: dict | None = None) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema or {"type": "object"}, overrides=_FIXED)


def _prompt(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(100, 32768, (12,), generator=g).tolist()


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[tuple[str, int], dict]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    results: dict[tuple[str, int], dict] = {}
    while engine.has_work():
        for out in engine.step():
            r = results.setdefault((out.request_id, out.index), {"text": "", "tokens": []})
            r["text"] += out.text
            r["tokens"] += out.token_ids
            if out.finished:
                r["finish"], r["generated"] = out.finish_reason, out.completion_tokens
    return results


def _check_person(value: object) -> None:
    assert isinstance(value, dict) and set(value) == {"name", "age", "tags"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 130
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3 and set(value["tags"]) <= {"a", "b"}


@pytest.mark.parametrize("max_tokens", [64, 12])
def test_json_object_outputs_parse_over_20_seeds_even_when_max_tokens_is_short(make_engine, max_tokens):
    """Any JSON object: unbounded, so only the steering near the end of max_tokens makes the short ones close."""
    engine = make_engine(guided=True)
    grammar = _json()
    requests = {f"s{seed}": (_prompt(seed), SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed,
                                                           grammar=grammar)) for seed in range(20)}
    results = _run(engine, requests)
    for (rid, _), r in sorted(results.items()):
        value = json.loads(r["text"])  # raises on anything but one complete JSON value
        assert isinstance(value, dict), (rid, r["text"])
        assert r["finish"] == "stop" and r["generated"] <= max_tokens, (rid, r)


def test_schema_outputs_validate(make_engine):
    engine = make_engine(guided=True)
    grammar = _json(PERSON)
    results = _run(engine, {f"s{seed}": (_prompt(seed), SamplingParams(max_tokens=48, temperature=0.9, seed=seed,
                                                                       grammar=grammar)) for seed in range(8)})
    for r in results.values():
        _check_person(json.loads(r["text"]))


def test_a_forced_tool_call_starts_with_the_control_token(make_engine, tok):
    calls = {"type": "array", "minItems": 1, "maxItems": 1, "x-guidance": _FIXED,
             "items": {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                       "properties": {"name": {"const": "get_weather"}, "arguments": PERSON}}}
    grammar = llguidance.LLMatcher.grammar_from_lark(f'start: <TOOL_CALLS> " " calls\ncalls: %json {json.dumps(calls)}')
    r = _run(make_engine(guided=True), {"t": (_prompt(3), SamplingParams(max_tokens=64, temperature=0.7, seed=3,
                                                                           grammar=grammar))})[("t", 0)]
    assert r["tokens"][0] == tok.control_token("[TOOL_CALLS]")
    [call] = json.loads(r["text"])
    assert call["name"] == "get_weather"
    _check_person(call["arguments"])


def test_parallel_tool_calls_close_the_array_before_max_tokens_runs_out(make_engine):
    """Calls are long and forced once begun: steering must stop starting new ones while one more would not fit."""
    calls = {"type": "array", "minItems": 1, "x-guidance": _FIXED,
             "items": {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                       "properties": {"name": {"const": "get_weather"}, "arguments": PERSON}}}
    grammar = llguidance.LLMatcher.grammar_from_lark(f'start: <TOOL_CALLS> " " calls\ncalls: %json {json.dumps(calls)}')
    requests = {f"s{seed}": (_prompt(seed), SamplingParams(max_tokens=60, temperature=1.0, seed=seed, grammar=grammar))
                for seed in range(12)}
    for rid, r in sorted(_run(make_engine(guided=True), requests).items()):
        parsed = json.loads(r["text"])
        assert r["finish"] == "stop" and len(parsed) >= 1, (rid, r)
        for call in parsed:
            _check_person(call["arguments"])


def test_a_guided_seeded_choice_is_the_same_alone_and_in_a_mixed_batch(make_engine):
    grammar = _json(PERSON)
    target = SamplingParams(max_tokens=40, temperature=0.8, seed=11, grammar=grammar)
    alone = _run(make_engine(guided=True), {"x": (_prompt(1), target)})[("x", 0)]
    others = {f"o{i}": (_prompt(10 + i), SamplingParams(max_tokens=30, temperature=1.0, seed=i, n=2,
                                                         grammar=_json() if i % 2 else None, ignore_eos=True))
              for i in range(5)}
    mixed = _run(make_engine(guided=True), {**others, "x": (_prompt(1), target)})
    assert mixed[("x", 0)] == alone
    assert all(json.loads(mixed[(f"o{i}", c)]["text"]) is not None for i in (1, 3) for c in (0, 1))


def test_logprobs_tokens_and_text_agree_for_guided_output(make_engine, tok):
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=2, logprobs=True, grammar=_json(PERSON))
    r = _run(make_engine(guided=True), {"x": (_prompt(2), params)})[("x", 0)]
    assert tok.decode(r["tokens"]) == r["text"]


def test_bad_grammars_and_unguided_engines_refuse_before_keeping_anything(make_engine):
    engine = make_engine(guided=True)
    with pytest.raises(GrammarError, match="cannot be enforced"):
        engine.add_request("bad", _prompt(0), SamplingParams(grammar="start: undefined_rule"))
    assert not engine.requests and engine.guide.active == 0
    plain = make_engine()
    with pytest.raises(RequestError, match="grammar engine"):
        plain.add_request("g", _prompt(0), SamplingParams(grammar=_json()))
    with pytest.raises(RequestError, match="logit_bias"):
        plain.add_request("b", _prompt(0), SamplingParams(logit_bias=((40000, 1.0),)))
    assert not plain.requests


def test_aborted_guided_requests_release_their_matchers(make_engine):
    engine = make_engine(guided=True)
    engine.add_request("a", _prompt(5), SamplingParams(max_tokens=30, n=3, seed=1, temperature=1.0, grammar=_json()))
    engine.step()
    engine.step()
    assert engine.guide.active == 3
    engine.abort("a")
    assert engine.guide.active == 0
