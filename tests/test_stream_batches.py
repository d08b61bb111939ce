"""A request's outputs batched across the Serve hop (cluster/serve/stream_batches.py): the first at once, later ones
held at most the interval, the end flushed at once, and a consumer that leaves closes the source."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

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


def test_no_interval_sends_each_item_alone():
    async def scenario() -> list[list[int]]:
        gate = asyncio.Event()
        gate.set()
        return [batch async for batch in batched(_items([0, 1, 2], [3], gate, []), 0.0)]

    assert asyncio.run(scenario()) == [[0], [1], [2], [3]]


def test_the_first_item_goes_at_once_and_the_end_flushes_at_once():
    async def scenario() -> tuple[list[list[int]], float]:
        gate = asyncio.Event()
        batches = batched(_items([0, 1, 2], [3], gate, []), LONG_S)
        start = time.monotonic()
        first = await asyncio.wait_for(anext(batches), 5)  # not held for LONG_S
        gate.set()
        rest = [batch async for batch in batches]  # the source ends: no waiting out the interval
        return [first, *rest], time.monotonic() - start

    result, seconds = asyncio.run(scenario())
    assert result == [[0], [1, 2, 3]]
    assert seconds < LONG_S / 3


def test_a_later_item_is_held_at_most_the_interval():
    async def scenario() -> list[list[int]]:
        gate, log = asyncio.Event(), []
        batches = batched(_items([0, 1], None, gate, log), 0.05)
        got = [await anext(batches)]
        gate.set()  # the source now waits forever after 1: 1 must still come, the interval after it arrived
        got.append(await asyncio.wait_for(anext(batches), 5))
        await batches.aclose()
        assert log == ["closed"]  # the read in progress was cancelled and the source closed
        return got

    assert asyncio.run(scenario()) == [[0], [1]]


def test_a_consumer_that_leaves_closes_the_source():
    async def scenario() -> list[str]:
        gate, log = asyncio.Event(), []
        batches = batched(_items([0], None, gate, log), LONG_S)
        assert await anext(batches) == [0]
        await batches.aclose()  # before the source yields again (a client that disconnected)
        return log

    assert asyncio.run(scenario()) == ["closed"]


def test_an_item_after_a_long_gap_is_not_held():
    """Steps slower than the interval: nothing would join an output, so it goes at once instead of waiting."""
    interval_s, step_s = 1.0, 1.5

    async def slow() -> AsyncIterator[tuple[int, float]]:
        yield 0, time.monotonic()
        await asyncio.sleep(step_s)  # a slow engine step (what is measured, not a synchronization)
        yield 1, time.monotonic()
        await asyncio.Event().wait()

    async def scenario() -> float:
        batches = batched(slow(), interval_s)
        await anext(batches)
        [(item, made)] = await asyncio.wait_for(anext(batches), 5)
        held = time.monotonic() - made
        await batches.aclose()
        assert item == 1
        return held

    assert asyncio.run(scenario()) < interval_s / 2
