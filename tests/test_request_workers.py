"""Request workers: small bodies never queue behind large ones; a budget counts a request's own work; the queue
wait has its own bound; a request whose client left is never encoded."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest

from cluster.api.errors import APIError
from cluster.api.workers import SMALL_BODY_BYTES, RequestWorkers

SMALL = b"{}"
LARGE = b" " * (SMALL_BODY_BYTES + 1)
HELD_S = 60  # how long a held work waits for its release before failing the test


class _Held:
    """Work that says when it started and runs until the test releases it."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, body: bytes) -> int:
        self.started.set()
        assert self.release.wait(HELD_S), "the test never released the work"
        return len(body)


@asynccontextmanager
async def _occupied(workers: RequestWorkers, held: _Held) -> AsyncIterator[None]:
    """The large lane's one thread busy with `held` until the block ends; then it is released and finished."""
    first = asyncio.create_task(workers.run(held, LARGE))
    try:
        assert await asyncio.to_thread(held.started.wait, HELD_S), "the held work never started"
        yield
    finally:
        held.release.set()
        await asyncio.gather(first, return_exceptions=True)


def test_a_small_body_is_served_while_large_ones_hold_every_large_thread():
    workers = RequestWorkers(threads=1, budget_s=30)
    held = _Held()

    async def scenario() -> int:
        async with _occupied(workers, held):  # held until the block ends: the small body cannot wait behind it
            return await workers.run(len, SMALL)

    assert asyncio.run(scenario()) == len(SMALL)
    workers.close()


def test_the_budget_counts_a_requests_own_work_not_its_wait_in_the_queue():
    """Queued 1.2 s behind another body, then 1.2 s of its own work: within a 2 s budget, as each part is."""
    workers = RequestWorkers(threads=1, budget_s=2.0)
    held = _Held()

    def slow(body: bytes) -> int:
        time.sleep(1.2)  # the request's own work
        return len(body)

    async def scenario() -> int:
        async with _occupied(workers, held):
            second = asyncio.create_task(workers.run(slow, LARGE))
            await asyncio.sleep(1.2)  # the time it spends queued
        return await second

    assert asyncio.run(scenario()) == len(LARGE)
    workers.close()


def test_work_past_its_budget_is_a_400():
    workers = RequestWorkers(threads=1, budget_s=0.05)
    held = _Held()
    try:
        with pytest.raises(APIError) as refused:
            asyncio.run(workers.run(held, SMALL))
        assert (refused.value.status, refused.value.code) == (400, "tokenize_budget_exceeded")
    finally:
        held.release.set()
        workers.close()


def test_a_request_no_thread_takes_up_within_the_budget_gets_503_and_never_runs():
    workers = RequestWorkers(threads=1, budget_s=0.2)
    held = _Held()
    ran: list[bytes] = []

    async def scenario() -> None:
        async with _occupied(workers, held):
            await workers.run(ran.append, LARGE)

    with pytest.raises(APIError) as busy:
        asyncio.run(scenario())
    workers.close()
    assert busy.value.status == 503 and "busy" in busy.value.message
    assert ran == []


def test_a_request_whose_client_left_while_it_was_queued_is_never_encoded():
    workers = RequestWorkers(threads=1, budget_s=30)
    held = _Held()
    ran: list[bytes] = []

    async def scenario() -> bool:
        async with _occupied(workers, held):
            second = asyncio.create_task(workers.run(ran.append, LARGE))
            await asyncio.sleep(0)  # let it queue
            second.cancel()
            await asyncio.gather(second, return_exceptions=True)
        await workers.run(len, LARGE)  # queued behind where the cancelled one was: it would have run by now
        return second.cancelled()

    assert asyncio.run(scenario()) is True
    assert ran == []
    workers.close()
