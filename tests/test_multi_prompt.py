"""A request's prompts read as one request (`cluster.api.multi_prompt`), over scripted backends: choices numbered
prompt * n + i, nothing handed on before every prompt answered, a refusal of one prompt aborts the others at once,
and closing the request closes every prompt's."""

import asyncio
import collections
from typing import AsyncIterator

from cluster.api.multi_prompt import generate_prompts
from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.health import Health


class _Scripted:
    """A backend answering prompt [p] with two outputs per choice ("p{p}s0", then "p{p}s1", which finishes it).
    Prompt p answers only once prompt `after[p]` has answered; `silent` prompts never answer; `refuse` is answered
    with a 429. It records the prompts closed, and keeps each prompt's iterator (which is then closed only if the
    merge closes it, never by the garbage collector)."""

    def __init__(self, after: dict[int, int] | None = None, silent: tuple[int, ...] = (), refuse: int | None = None):
        self.after = after or {}
        self.silent = silent
        self.refuse = refuse
        self.answered: collections.defaultdict[int, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self.closed: set[str] = set()
        self.made: list[AsyncIterator[RequestOutput]] = []

    def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                 stream: bool = True) -> AsyncIterator[RequestOutput]:
        outputs = self._answer(request_id, prompt[0], params)
        self.made.append(outputs)
        return outputs

    async def _answer(self, request_id: str, p: int, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        try:
            if p in self.silent:
                await asyncio.Event().wait()
            if p in self.after:
                await self.answered[self.after[p]].wait()
            self.answered[p].set()
            if p == self.refuse:
                for out in RequestOutput.errors(request_id, params.n, "the server is at capacity", 429):
                    yield out
                return
            for step in (0, 1):
                for i in range(params.n):
                    yield RequestOutput(request_id, i, f"p{p}s{step}", [step], finish_reason="stop" if step else None)
        finally:
            self.closed.add(request_id)

    def overloaded(self) -> str | None:
        return None

    async def health(self) -> Health:
        return Health()


def test_choices_are_numbered_prompt_times_n_plus_i():
    async def scenario():
        backend = _Scripted(after={0: 2, 1: 0})  # prompt 2 answers first, then 0, then 1
        outputs = generate_prompts(backend, "r", [[0], [1], [2]], SamplingParams(n=2))
        return [out async for out in outputs], backend

    got, backend = asyncio.run(scenario())
    # Each prompt's first output, in prompt order once all are there; then the rest as they come, each choice's in
    # order.
    assert [(o.index, o.text) for o in got[:3]] == [(0, "p0s0"), (2, "p1s0"), (4, "p2s0")]
    assert sorted((o.index, o.text) for o in got) == sorted((p * 2 + i, f"p{p}s{step}") for p in range(3)
                                                            for i in range(2) for step in range(2))
    for index in range(6):
        assert [o.text[-2:] for o in got if o.index == index] == ["s0", "s1"]
    assert backend.closed == {"r-0", "r-1", "r-2"}


def test_a_refused_prompt_is_the_answer_and_the_others_are_stopped():
    """Prompt 0 answers, then prompt 1 is refused, while prompt 2 computes on: the request's first output is the
    refusal (prompt 0's was held back), and closing it stops prompts 0 and 2 without waiting on prompt 2."""
    async def scenario():
        backend = _Scripted(after={1: 0}, silent=(2,), refuse=1)
        outputs = generate_prompts(backend, "r", [[0], [1], [2]], SamplingParams(n=2))
        first = await asyncio.wait_for(anext(outputs), timeout=30)  # (a bound for a broken merge, not a wait)
        await asyncio.wait_for(outputs.aclose(), timeout=30)  # what the route does with a refusal
        return first, backend, set(backend.closed)  # closed by then, not when collected

    first, backend, closed = asyncio.run(scenario())
    assert first.failed and first.error_status == 429 and first.index == 2  # prompt 1's first choice
    assert backend.answered[0].is_set() and closed == {"r-0", "r-1", "r-2"}


def test_closing_the_request_closes_every_prompt():
    async def scenario():
        backend = _Scripted()
        outputs = generate_prompts(backend, "r", [[0], [1]], SamplingParams(n=1))
        await anext(outputs)
        await outputs.aclose()  # the client left after the first chunk
        return set(backend.closed)  # closed by then, not when collected

    assert asyncio.run(scenario()) == {"r-0", "r-1"}


def test_a_lone_prompt_is_the_backend_request_itself():
    backend = _Scripted()
    outputs = generate_prompts(backend, "r", [[0]], SamplingParams())
    assert outputs is backend.made[0]  # no merging: the request id and indexes as they are
