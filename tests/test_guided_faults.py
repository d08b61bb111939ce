"""One request's failure never fails another (issue 24): a grammar that errs, allows nothing or panics inside
llguidance, and a choice whose output handling raises, end their own request with an error output while every
other sequence of the step goes on; a step that fails as a whole still hands out the outputs it made, so no request
is left without an answer. Faults are injected into one sequence of a real engine (tiny model, real llguidance)."""

from __future__ import annotations

import asyncio
import json
import threading

import llguidance
import pytest
import torch

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import LLMEngine
from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams


# Each engine test runs in series and with steps scheduled ahead (`EngineConfig.async_scheduling`).
pytestmark = pytest.mark.both_schedulings


_FIXED = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_FIXED)
NAMED = llguidance.LLMatcher.grammar_from_json_schema(  # at least 5 tokens: '{"', 'name', '":', ' ""', '}'
    {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}, overrides=_FIXED)
WAIT_S = 60  # for an answer that must come (a hang fails the test instead of the run)


def _prompt(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(100, 32768, (12,), generator=g).tolist()


def _panic_type() -> type[BaseException]:
    """pyo3's PanicException, as llguidance raises it (its own panic on a maxLength given as text)."""
    schema = llguidance.LLMatcher.grammar_from_json_schema({"type": "string", "maxLength": "\U0001F600" * 30})
    try:
        llguidance.LLMatcher.validate_grammar_with_warnings(schema)
    except BaseException as e:  # noqa: B036 (what we want is the class of this BaseException)
        return type(e)
    raise AssertionError("llguidance no longer panics on this schema: find another way to make a panic")


PanicException = _panic_type()


class _Faulty:
    """A real matcher that fails at one point (fault injection); everything else is the real one's. Not an
    LLMatcher, so the batched mask call refuses it and the guide computes that step's masks row by row."""

    def __init__(self, inner, consume=None, mask=None):
        self._inner, self._consume, self._mask = inner, consume, mask

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def consume_token(self, token: int) -> bool:
        return self._consume(token) if self._consume is not None else self._inner.consume_token(token)

    def unsafe_compute_mask_ptr(self, ptr: int, size: int) -> None:
        if self._mask is not None:
            self._mask()
        self._inner.unsafe_compute_mask_ptr(ptr, size)


def _run(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Step until done; each request's final output (text accumulated)."""
    finals: dict[str, RequestOutput] = {}
    texts: dict[str, str] = {}
    while engine.has_work():
        for out in engine.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
            if out.finished:
                out.text = texts[out.request_id]
                finals[out.request_id] = out
    return finals


def _add(engine: LLMEngine, names: list[str], max_tokens: int = 20, grammar: str | None = ANY_OBJECT) -> None:
    for i, name in enumerate(names):
        engine.add_request(name, _prompt(i), SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i,
                                                            grammar=grammar))


def _guided(engine: LLMEngine, request_id: str):
    return engine.guide._seqs[engine.requests[request_id][0].seq_id]


def test_a_grammar_limit_met_while_running_fails_its_request_alone(make_engine):
    """llguidance refusing a token (its limits: "Too many items") once the output is under way: that request ends
    with a 400 error, its blocks and matcher freed; the guided and free bystanders finish normally."""
    engine = make_engine(guided=True)
    _add(engine, ["limit", "guided"], grammar=NAMED)
    engine.add_request("free", _prompt(5), SamplingParams(max_tokens=20, temperature=1.0, seed=5))
    taken = []

    def consume(token: int) -> bool:
        taken.append(token)
        return len(taken) < 3 and real.consume_token(token)  # the third token meets the limit

    real = _guided(engine, "limit").matcher
    _guided(engine, "limit").matcher = _Faulty(real, consume=consume)
    _guided(engine, "limit").matcher.get_error = lambda: "parser error: Too many items (limit 50000; ff_tokens)"
    finals = _run(engine)
    assert finals["limit"].finish_reason == "error" and finals["limit"].error_status == 400, finals["limit"]
    assert "Too many items" in finals["limit"].error and "\n" not in finals["limit"].error
    assert finals["guided"].finish_reason == "stop" and isinstance(json.loads(finals["guided"].text), dict)
    assert finals["free"].finish_reason == "length" and finals["free"].error is None
    assert len(taken) == 3


def test_a_panic_in_one_rows_mask_fails_that_request_alone(make_engine):
    """A panic inside llguidance (a BaseException that `except Exception` lets through) computing one row's mask:
    that request ends with a 500, the rest of the batch is masked row by row and finishes normally."""
    engine = make_engine(guided=True)
    _add(engine, ["panics", "a", "b"], grammar=NAMED)
    steps = {"n": 0}

    def mask() -> None:
        steps["n"] += 1
        if steps["n"] == 3:
            raise PanicException("injected panic")

    _guided(engine, "panics").matcher = _Faulty(_guided(engine, "panics").matcher, mask=mask)
    finals = _run(engine)
    assert finals["panics"].finish_reason == "error" and finals["panics"].error_status == 500
    assert "injected" not in finals["panics"].error  # the client gets no internals
    for name in ("a", "b"):
        assert finals[name].finish_reason == "stop" and isinstance(json.loads(finals[name].text), dict), finals[name]


def test_a_matcher_that_allows_nothing_fails_its_request_alone(make_engine):
    """A matcher in an error state allows no token: its request ends with a 400 (it used to end with EOS as if it
    had finished, with output that does not match its grammar); its neighbour goes on."""
    engine = make_engine(guided=True)
    _add(engine, ["stuck", "fine"])
    _guided(engine, "stuck").matcher.consume_token(engine.eos_id)  # EOS before "{": an error state
    finals = _run(engine)
    assert finals["stuck"].finish_reason == "error" and finals["stuck"].error_status == 400
    assert finals["fine"].finish_reason == "stop" and isinstance(json.loads(finals["fine"].text), dict)


def test_a_choice_whose_output_handling_raises_fails_its_request_alone(make_engine, monkeypatch):
    """Any exception while one choice's token is taken (here its detokenizer's) ends that request with a 500;
    a request that finishes in the same step still gets its output, and later requests are served."""
    engine = make_engine()
    engine.add_request("done", _prompt(1), SamplingParams(max_tokens=3, temperature=1.0, seed=1))
    engine.add_request("broken", _prompt(2), SamplingParams(max_tokens=10, temperature=1.0, seed=2))
    engine.add_request("long", _prompt(3), SamplingParams(max_tokens=10, temperature=1.0, seed=3))
    broken = engine.outputs[engine.requests["broken"][0].seq_id]
    push, pushed = broken.push, []

    def push_then_fail(token: int, logprobs):
        pushed.append(token)
        if len(pushed) == 3:  # the step in which "done" takes its last token
            raise RuntimeError("detokenizer bug")
        return push(token, logprobs)

    monkeypatch.setattr(broken, "push", push_then_fail)
    finals = _run(engine)
    assert finals["broken"].finish_reason == "error" and finals["broken"].error_status == 500
    assert "detokenizer bug" not in finals["broken"].error
    assert finals["done"].finish_reason == "length" and finals["done"].completion_tokens == 3
    assert finals["long"].finish_reason == "length" and finals["long"].completion_tokens == 10


def test_a_step_that_fails_as_a_whole_still_answers_every_request(make_engine):
    """The error path itself failing mid-step, after a request finished in that step: the step raises, and
    `fail_all` hands out that request's final output with the errors of the others (it used to lose it: its
    client waited until it gave up)."""
    engine = make_engine()
    engine.add_request("finishes", _prompt(1), SamplingParams(max_tokens=2, temperature=1.0, seed=1))
    engine.add_request("breaks", _prompt(2), SamplingParams(max_tokens=10, temperature=1.0, seed=2))
    engine.add_request("waits", _prompt(3), SamplingParams(max_tokens=10, temperature=1.0, seed=3))
    append = engine._append

    def faulty_append(s, token, logprobs):
        if s.seq.request_id == "breaks" and len(s.seq.output) == 1:
            raise RuntimeError("bad token")
        return append(s, token, logprobs)

    def failing_error_path(seq, e):
        raise RuntimeError("the error path failed too")

    engine._append, engine._fail_request = faulty_append, failing_error_path
    outs = []
    with pytest.raises(RuntimeError, match="error path failed"):
        for _ in range(3):  # the second step raises (its outputs come a call later when steps are scheduled ahead)
            outs += engine.step()
    outs += engine.fail_all("engine step failed", status=500)
    finals = {o.request_id: o for o in outs if o.finished}
    assert finals["finishes"].finish_reason == "length" and finals["finishes"].error is None
    assert finals["finishes"].completion_tokens == 2
    assert finals["breaks"].finish_reason == "error" and finals["waits"].finish_reason == "error"
    assert not engine.fail_all("again")  # handed out once


def test_the_async_front_survives_a_panic_and_answers_every_stream(make_engine):
    """A panic escaping a whole step (not an Exception) used to end the engine thread and leave every stream
    waiting forever: now the step's requests get errors and the next request is served."""
    engine = make_engine(guided=True)
    step = engine.step
    state = {"n": 0}

    def panicking_step():
        state["n"] += 1
        if state["n"] == 3:
            raise PanicException("injected panic")
        return step()

    engine.step = panicking_step
    front = AsyncEngine(lambda: engine)

    async def add(request_id: str, seed: int):
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=seed, grammar=NAMED)
        return await front.add_request(request_id, _prompt(seed), params)

    async def drain(stream) -> list[RequestOutput]:
        return [out async for out in stream]

    async def scenario():
        gate = threading.Event()  # holds the engine thread until both requests are queued: they share every step
        front.call(lambda e: gate.wait(WAIT_S))
        streams = [await add("a", 1), await add("b", 2)]
        gate.set()
        first = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), WAIT_S)
        later = await asyncio.wait_for(drain(await add("c", 3)), WAIT_S)
        return first, later

    try:
        (a, b), c = asyncio.run(scenario())
    finally:
        front.shutdown()
    assert a[-1].finish_reason == "error" and b[-1].finish_reason == "error"
    assert c[-1].finish_reason == "stop" and isinstance(json.loads("".join(o.text for o in c)), dict)


def test_a_panic_admitting_a_request_refuses_it_and_the_loop_goes_on(make_engine):
    """A panic while the engine thread admits a request (its matcher copied, say) used to end that thread."""
    engine = make_engine(guided=True)
    add_request = engine.add_request

    def add(request_id, prompt, params):
        if request_id == "panics":
            raise PanicException("injected panic")
        return add_request(request_id, prompt, params)

    engine.add_request = add
    front = AsyncEngine(lambda: engine)

    async def collect(request_id: str, seed: int) -> list[RequestOutput]:
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=seed, grammar=NAMED)
        return [out async for out in await front.add_request(request_id, _prompt(seed), params)]

    async def scenario():
        return (await asyncio.wait_for(collect("panics", 1), WAIT_S),
                await asyncio.wait_for(collect("after", 2), WAIT_S))

    try:
        refused, after = asyncio.run(scenario())
    finally:
        front.shutdown()
    assert refused[-1].finish_reason == "error" and refused[-1].error_status == 500
    assert "injected" not in refused[-1].error
    assert after[-1].finish_reason == "stop" and isinstance(json.loads("".join(o.text for o in after)), dict)
