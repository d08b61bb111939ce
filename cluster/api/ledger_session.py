"""The ledger's life in one server process: opened on first use in the process's event loop (the app's start-up,
or the first request of a server run without one), kept while the app lives, closed at its shutdown.

While it is open, every `release_period_s` the session renews the reservations of this process's requests still
running (`unsettled`: a request may outlive the reservation TTL; only a dead process's reservations may expire) and
releases the expired ones, which a killed server left open; it does that at opening too. Work that must outlive the
request that started it (a settle, when a client leaves) runs as a task the session holds (`spawn`), and closing
waits for it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Coroutine

from cluster.api.errors import APIError
from cluster.ledger import Ledger, open_ledger

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 900.0
DEFAULT_RELEASE_PERIOD_S = 60.0
_CLOSE_WAIT_S = 30.0  # for the settles still in flight when the app stops


class LedgerSession:
    def __init__(self, url: str | None, ttl_s: float = DEFAULT_TTL_S,
                 release_period_s: float = DEFAULT_RELEASE_PERIOD_S, opener: Callable[[str], Ledger] = open_ledger):
        """`url` None: an open server, with no ledger; `ttl_s`: how long a reservation lives unless renewed."""
        self.url = url
        self.ttl_s = ttl_s
        self.release_period_s = release_period_s
        self._opener = opener
        self._ledger: Ledger | None = None
        self._starting: asyncio.Task | None = None
        self._releaser: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # settles in flight: held here so nothing cancels or collects them
        self.unsettled: set[str] = set()  # request ids reserved and not yet settled: renewed while this server lives

    @property
    def enabled(self) -> bool:
        return self.url is not None

    async def ledger(self) -> Ledger:
        """The ledger, opened on first use in this event loop, with expired reservations released and the periodic
        release started."""
        if self._ledger is not None:
            return self._ledger
        failed = self._starting is not None and self._starting.done() and (self._starting.cancelled() or
                                                                           self._starting.exception() is not None)
        if self._starting is None or failed:
            self._starting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._starting)

    async def _open(self) -> Ledger:
        assert self.url is not None
        ledger = self._opener(self.url)
        try:
            released = await ledger.release_expired()
        except BaseException:
            await ledger.close()
            raise
        if released:
            log.warning("released %d expired credit reservations (left open by a stopped server)", released)
        self._ledger = ledger
        self._releaser = asyncio.ensure_future(self._release_forever(ledger))
        return ledger

    async def _release_forever(self, ledger: Ledger) -> None:
        while True:
            await asyncio.sleep(self.release_period_s)
            try:
                await ledger.renew(sorted(self.unsettled), self.ttl_s)
                released = await ledger.release_expired()
                if released:
                    log.warning("released %d expired credit reservations", released)
            except Exception:
                log.exception("renewing or releasing credit reservations failed")

    async def start(self) -> None:
        if self.enabled:
            await self.ledger()

    async def close(self) -> None:
        """Wait for the settles in flight, stop the periodic release, close the ledger."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=_CLOSE_WAIT_S)
        if self._releaser is not None:
            self._releaser.cancel()
            await asyncio.gather(self._releaser, return_exceptions=True)
        if self._ledger is not None:
            ledger, self._ledger, self._starting = self._ledger, None, None  # a later use opens it afresh
            await ledger.close()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def unavailable(what: str) -> APIError:
    """The 503 a request gets when the ledger fails under it."""
    return APIError(503, f"the credits ledger is unavailable ({what}); retry")
