"""Request work that holds a CPU (parsing a body, validating it, encoding its chat) runs on a few threads, so a
large request never stalls the event loop (and `/health`, and every stream, with it); a request whose work outlasts
its time budget is refused.

Two lanes of threads: bodies up to `SMALL_BODY_BYTES` (every ordinary chat) have their own, so they never queue
behind megabyte prompts. A request's budget counts its own work from the moment a thread takes it up, not its time
in the queue; the queue wait has a bound of its own (the same length), past which the request gets 503 and
Retry-After: the server is busy, the request is not at fault.

A thread cannot be stopped: work past its budget runs on to its end, and each lane's size bounds how many such
threads there can be.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from cluster.api.errors import APIError

T = TypeVar("T")

SMALL_BODY_BYTES = 64 * 1024


class RequestWorkers:
    def __init__(self, threads: int, budget_s: float):
        """threads: per lane."""
        self.budget_s = budget_s
        self._small = ThreadPoolExecutor(threads, thread_name_prefix="api-request-small")
        self._large = ThreadPoolExecutor(threads, thread_name_prefix="api-request-large")

    async def run(self, work: Callable[[bytes], T], body: bytes) -> T:
        """`work(body)`'s result or exception; APIError(400) when the work takes longer than the budget, 503 when
        no thread took it up within the budget."""
        loop = asyncio.get_running_loop()
        started = loop.create_future()

        def timed() -> T:
            loop.call_soon_threadsafe(_set_once, started)
            return work(body)

        lane = self._small if len(body) <= SMALL_BODY_BYTES else self._large
        inner = lane.submit(timed)
        try:
            await asyncio.wait_for(asyncio.shield(started), self.budget_s)
        except asyncio.TimeoutError:
            if inner.cancel():
                raise APIError(503, f"the server is busy encoding other requests: none of its threads took this one "
                                    f"up within {self.budget_s:g} s; retry later") from None
        except asyncio.CancelledError:  # the client left while the request was queued
            inner.cancel()
            raise
        try:
            return await asyncio.wait_for(asyncio.wrap_future(inner), self.budget_s)
        except asyncio.TimeoutError:
            raise APIError(400, f"the request could not be parsed and tokenized within its {self.budget_s:g} s "
                                f"budget; send a shorter prompt", None, "tokenize_budget_exceeded") from None

    def close(self) -> None:
        """Wait for the work under way; queued work that no thread took up is dropped."""
        for lane in (self._small, self._large):
            lane.shutdown(wait=True, cancel_futures=True)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
