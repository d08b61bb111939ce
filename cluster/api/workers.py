"""Request work that holds a CPU (parsing a body, validating it, encoding its chat) runs on a few threads, so a
large request never stalls the event loop (and `/health`, and every stream, with it); a request whose work outlasts
its time budget is refused.

A thread cannot be stopped: work past its budget runs on to its end, and the pool's size bounds how many such
threads there can be. Requests queued behind them spend their own budget waiting.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from cluster.api.errors import APIError

T = TypeVar("T")


class RequestWorkers:
    def __init__(self, threads: int, budget_s: float):
        self.budget_s = budget_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="api-request")

    async def run(self, work: Callable[..., T], *args: object) -> T:
        """`work(*args)`'s result or exception; APIError(400) when it takes longer than the budget."""
        future = asyncio.wrap_future(self._pool.submit(work, *args))
        try:
            return await asyncio.wait_for(future, self.budget_s)
        except asyncio.TimeoutError:
            raise APIError(400, f"the request could not be parsed and tokenized within its {self.budget_s:g} s "
                                f"budget; send a shorter prompt", None, "tokenize_budget_exceeded") from None
