"""Waiting for a condition in tests: poll it until it holds or a deadline passes, then fail saying what was
awaited. A wait is for something observable (a log line, a status, a process gone), never a guess at a duration."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")
POLL_S = 0.05


def wait_until(condition: Callable[[], T], timeout_s: float, what: str | Callable[[], str]) -> T:
    """`condition()`'s first truthy value; AssertionError naming `what` (a string, or a function giving the
    context to show, e.g. a log's tail) once `timeout_s` has passed without one."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:g}s for: {what() if callable(what) else what}")
        time.sleep(POLL_S)
    return value


async def wait_until_async(condition: Callable[[], Awaitable[T]], timeout_s: float, what: str) -> T:
    """`wait_until` for a condition that is awaited, without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while not (value := await condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:g}s for: {what}")
        await asyncio.sleep(POLL_S)
    return value
