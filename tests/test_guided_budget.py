"""Structured output within max_tokens (issue 24): over many schemas and budgets, every request the API's grammar
check admits ends with JSON that parses and validates, finish "stop", however short its max_tokens: the steering
keeps in hand what the rest of the grammar needs (required members, minItems, a pattern's characters), not only
closing brackets. Random tiny model, fixed seeds, one engine running every request side by side."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest
import torch

from cluster.api.grammars import GrammarError, check_grammar, json_grammar, tool_call_grammar
from cluster.engine.engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams


# Each engine test runs in series and with steps scheduled ahead (`EngineConfig.async_scheduling`).
pytestmark = pytest.mark.both_schedulings


SCHEMAS: dict[str, dict | None] = {
    "any object": None,
    "flat, bounded": {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
                      "properties": {"name": {"type": "string", "maxLength": 12},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                     "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}},
    "minItems after a free string": {"type": "object", "required": ["a", "b"],
                                     "properties": {"a": {"type": "string"}, "b": {"type": "array", "minItems": 3}}},
    "nested required": {"type": "object", "required": ["user", "active"], "properties": {
        "active": {"type": "boolean"},
        "user": {"type": "object", "required": ["id", "address"], "properties": {
            "id": {"type": "integer"},
            "address": {"type": "object", "required": ["city", "zip"], "properties": {
                "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}}},
    "array of objects": {"type": "object", "required": ["items"], "properties": {"items": {
        "type": "array", "minItems": 2, "items": {"type": "object", "required": ["sku", "qty"], "properties": {
            "sku": {"type": "string", "minLength": 3}, "qty": {"type": "integer", "minimum": 1}}}}}},
    "anyOf": {"type": "object", "required": ["v"], "properties": {"v": {"anyOf": [
        {"type": "string", "format": "date"}, {"type": "array", "items": {"type": "number"}, "minItems": 1},
        {"type": "null"}]}}},
    "enum and number": {"type": "object", "required": ["color", "n"], "properties": {
        "color": {"enum": ["red", "green", "blue", "ultraviolet"]}, "n": {"type": "number", "minimum": -5,
                                                                         "maximum": 5}}},
    "patterns": {"type": "object", "required": ["to"], "properties": {
        "to": {"type": "string", "format": "email"},
        "cc": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}}}},
    "all optional": {"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": "object", "properties": {"c": {"type": "array",
                                                                              "items": {"type": "integer"}}}},
        "d": {"type": "number"}}},
    "array at the top": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["k", "v"], "properties": {"k": {"type": "string"}, "v": {"type": "integer"}}}},
}
TOOL = {"type": "object", "required": ["city", "days"], "additionalProperties": False,
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
BUDGETS = (6, 12, 20, 32, 48)


def _prompt(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(100, 32768, (12,), generator=g).tolist()


def _run(engine: LLMEngine) -> dict[str, tuple[str, str | None]]:
    texts: dict[str, str] = {}
    finish: dict[str, str | None] = {}
    while engine.has_work():
        for out in engine.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
            if out.finished:
                finish[out.request_id] = out.finish_reason
    return {rid: (texts[rid], finish.get(rid)) for rid in texts}


def test_every_admitted_schema_and_budget_ends_in_json_that_validates(make_engine):
    engine = make_engine(blocks=1024, max_num_seqs=128, max_num_batched_tokens=2048, guided=True)
    expected: dict[str, dict] = {}
    refused: dict[str, list[int]] = {}
    for k, (name, schema) in enumerate(SCHEMAS.items()):
        grammar = json_grammar(schema)
        for budget in BUDGETS:
            try:
                check_grammar(grammar, "v3", budget)
            except GrammarError as e:
                assert "max_tokens" in str(e), e
                refused.setdefault(name, []).append(budget)
                continue
            rid = f"{name} @{budget}"
            expected[rid] = schema or {"type": "object"}
            seed = k * 100 + budget
            engine.add_request(rid, _prompt(seed), SamplingParams(max_tokens=budget, temperature=1.0, seed=seed,
                                                                   grammar=grammar))
    results = _run(engine)
    assert set(results) == set(expected)
    for rid, (text, finish) in sorted(results.items()):
        assert finish == "stop", (rid, finish, text)
        jsonschema.validate(json.loads(text), expected[rid])
    # The check refuses only budgets below what a schema needs: a larger one is always admitted, and every schema
    # is admitted at the largest.
    for name, budgets in refused.items():
        assert budgets == list(BUDGETS[:len(budgets)]) and len(budgets) < len(BUDGETS), (name, budgets)
    assert len(results) >= 2 * len(SCHEMAS), refused


@pytest.mark.parametrize("parallel", [False, True])
def test_forced_tool_calls_close_within_every_budget(make_engine, tok, parallel):
    """Calls are long and forced once begun: a call the budget cannot finish must not start."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": TOOL}},
             {"type": "function", "function": {"name": "get_time"}}]
    grammar = tool_call_grammar(tools, None, parallel)
    engine = make_engine(blocks=1024, max_num_seqs=128, guided=True)
    for budget in BUDGETS[2:]:  # a call of get_time takes 17 tokens at least
        for seed in range(3):
            check_grammar(grammar, "v3", budget)
            engine.add_request(f"{budget}/{seed}", _prompt(seed), SamplingParams(max_tokens=budget, temperature=1.0,
                                                                                 seed=seed, grammar=grammar))
    results = _run(engine)
    assert len(results) == 3 * len(BUDGETS[2:])
    for rid, (text, finish) in sorted(results.items()):
        assert finish == "stop", (rid, text)
        calls = json.loads(text)
        assert 1 <= len(calls) and (parallel or len(calls) == 1), (rid, text)
        for call in calls:
            schema = TOOL if call["name"] == "get_weather" else {"type": "object", "maxProperties": 0}
            jsonschema.validate(call["arguments"], schema)


def test_a_search_that_runs_out_of_time_in_the_step_fails_no_request(make_engine, monkeypatch):
    """Every way-to-the-end search on the engine thread times out at once: the step goes on, each output keeps the
    way it had (or goes unsteered), and every request ends as it would."""
    from cluster.engine import guided
    from cluster.engine.grammar_paths import PathFinder, PathTimeout

    timeouts = []
    find = PathFinder.find

    def impatient(self, matcher, limit, lex=None, deadline=None, explore=True):
        if deadline is not None and deadline - time.monotonic() <= guided.STEP_SEARCH_S:  # the engine's searches
            timeouts.append(limit)
            raise PathTimeout
        return find(self, matcher, limit, lex, deadline, explore)

    monkeypatch.setattr(PathFinder, "find", impatient)
    engine = make_engine(blocks=1024, max_num_seqs=64, guided=True)
    schema = SCHEMAS["nested"] if "nested" in SCHEMAS else next(s for s in SCHEMAS.values() if s)
    grammar = json_grammar(schema)
    for seed in range(12):
        engine.add_request(f"r{seed}", _prompt(seed), SamplingParams(max_tokens=BUDGETS[-1], temperature=1.0,
                                                                      seed=seed, grammar=grammar))
    results = _run(engine)
    assert timeouts, "no search ran on the engine thread: the test proves nothing"
    assert len(results) == 12 and all(finish in ("stop", "length") for _, finish in results.values()), results
