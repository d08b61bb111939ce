"""A request's outputs batched across the Serve hop (cluster/serve/stream_batches.py): the first batch at once, later
ones at most one an interval (none held longer), slow steps not held, the end flushed at once, a source's failure
after what it made, and a consumer that leaves closes the source."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import AsyncIterator

import pytest

from cluster.serve.stream_batches import batched

LONG_S = 30.0  # an interval no test waits out: a batch that arrives sooner was not held for it


async def _items(first: list[int], then: list[int] | None, gate: asyncio.Event, log: list[str]) -> AsyncIterator[int]:
    """Yields `first` at once, waits for `gate`, then yields `then` (or, with None, waits forever); logs its close."""
    try:
        for item in first:
            yield item
        await gate.wait()
        for item in then or []:
            yield item
        if then is None:
            await asyncio.Event().wait()
    finally:
        log.append("closed")


def _run(scenario) -> tuple[object, list[dict]]:
    """`scenario()`'s result and what the loop reported as unhandled (a task exception never retrieved)."""
    reported: list[dict] = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        result = await scenario()
        gc.collect()  # a task dropped with its exception unread is reported when it is collected
        await asyncio.sleep(0)
        return result

    return asyncio.run(main()), reported


def test_no_interval_sends_each_item_alone():
    async def scenario() -> list[list[int]]:
        gate = asyncio.Event()
        gate.set()
        return [batch async for batch in batched(_items([0, 1, 2], [3], gate, []), 0.0)]

    assert _run(scenario)[0] == [[0], [1], [2], [3]]


def test_the_first_batch_goes_at_once_and_the_end_flushes_at_once():
    async def scenario() -> tuple[list[list[int]], float]:
        gate = asyncio.Event()
        batches = batched(_items([0], [1, 2, 3], gate, []), LONG_S)
        start = time.monotonic()
        first = await asyncio.wait_for(anext(batches), 5)  # not held for LONG_S
        gate.set()
        rest = [batch async for batch in batches]  # the source ends: no waiting out the interval
        return [first, *rest], time.monotonic() - start

    (result, seconds), reported = _run(scenario)
    assert result == [[0], [1, 2, 3]] and reported == []
    assert seconds < LONG_S / 3


def test_a_later_output_is_held_about_the_interval_and_no_longer():
    interval_s = 0.2

    async def scenario() -> float:
        gate = asyncio.Event()

        async def stream() -> AsyncIterator[tuple[int, float]]:
            yield 0, time.monotonic()
            await gate.wait()
            yield 1, time.monotonic()  # right after the first batch went: held to the interval's end
            await asyncio.Event().wait()

        batches = batched(stream(), interval_s)
        assert [item for item, _ in await anext(batches)] == [0]
        gate.set()
        [(_, made)] = await asyncio.wait_for(anext(batches), 5)
        held = time.monotonic() - made
        await batches.aclose()
        return held

    held, _ = _run(scenario)
    assert interval_s / 2 < held < interval_s * 3


def test_outputs_after_a_slow_step_are_not_held_and_come_together():
    """Steps slower than the interval: each step's outputs (the choices of an n > 1 request) go at once, together."""
    interval_s, step_s = 0.3, 0.6

    async def steps() -> AsyncIterator[tuple[int, float]]:
        for step in range(3):
            for choice in range(2):
                yield step, time.monotonic()
            await asyncio.sleep(step_s)  # a slow engine step (what is measured, not a synchronization)

    async def scenario() -> list[tuple[list[int], float]]:
        got = []
        async for batch in batched(steps(), interval_s):
            got.append(([step for step, _ in batch], time.monotonic() - batch[-1][1]))
        return got

    got, reported = _run(scenario)
    assert [steps for steps, _ in got] == [[0, 0], [1, 1], [2, 2]] and reported == []
    assert max(held for _, held in got) < interval_s / 2


def test_a_failing_source_raises_after_the_outputs_it_made():
    async def failing() -> AsyncIterator[int]:
        yield 0
        yield 1
        yield 2
        raise RuntimeError("the engine failed")

    async def scenario() -> tuple[list[int], str]:
        got: list[int] = []
        with pytest.raises(RuntimeError) as raised:
            async for batch in batched(failing(), 0.05):
                got.extend(batch)
        return got, str(raised.value)

    (got, message), reported = _run(scenario)
    assert got == [0, 1, 2] and message == "the engine failed" and reported == []


def test_a_consumer_that_leaves_closes_the_source_and_leaves_nothing_unread():
    async def scenario() -> list[str]:
        gate, log = asyncio.Event(), []
        batches = batched(_items([0], None, gate, log), LONG_S)
        assert await anext(batches) == [0]
        gate.set()
        await batches.aclose()  # while the source waits for its next output (a client that disconnected)
        return log

    log, reported = _run(scenario)
    assert log == ["closed"] and reported == []


def test_a_cancelled_consumer_closes_the_source():
    async def scenario() -> list[str]:
        log: list[str] = []
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in batched(_items([0], None, asyncio.Event(), log), LONG_S):
                started.set()

        task = asyncio.ensure_future(consume())
        await started.wait()
        task.cancel()  # as Serve cancels a replica's generator when the caller goes
        await asyncio.gather(task, return_exceptions=True)
        return log

    log, reported = _run(scenario)
    assert log == ["closed"] and reported == []
