"""A request's outputs in batches across the Serve hop (AttentionRouter -> Ingress).

Every item a Serve streaming call yields is one Ray message, with its own serialization and bookkeeping on both
sides; a stream that yields each token alone pays that per token. `batched` groups what one request's engine
outputs arrive within an interval into one list (one message): the first batch of a request goes at once (time to
first token is never held back), and a later one is sent `interval_s` after its first output arrived, so no output
waits longer than that. Outputs that come `interval_s` or more after the previous batch's last one (the engine's
steps are slower than the interval: nothing would join them) go at once, with whatever came in the same step (the
other choices of an n > 1 request). A request that ends flushes at once.

One reader task per request moves the source's outputs into a deque; the batches are cut from it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import aclosing
from typing import AsyncGenerator, AsyncIterator, TypeVar

T = TypeVar("T")


async def batched(source: AsyncGenerator[T, None], interval_s: float) -> AsyncIterator[list[T]]:
    """`source`'s items in lists (see the module's doc); `interval_s` <= 0: each item alone, at once.

    An exception from `source` comes after the items it made before it. Closing this iterator (a consumer that
    leaves, a cancelled task) cancels the read in progress, which closes `source` (its own cleanup runs)."""
    if interval_s <= 0:
        async with aclosing(source):
            async for item in source:
                yield [item]
        return
    loop = asyncio.get_running_loop()
    ready: deque[tuple[T, float]] = deque()  # (output, when it arrived)
    arrived = asyncio.Event()

    async def read() -> None:
        try:
            async for item in source:
                ready.append((item, loop.time()))
                arrived.set()
        finally:
            arrived.set()  # the end (or a failure) wakes the batcher too

    reader = loop.create_task(read())
    previous: float | None = None  # when the last output of the previous batch arrived
    try:
        while True:
            while not ready and not reader.done():
                arrived.clear()
                await arrived.wait()
            if ready:
                first = ready[0][1]
                if previous is not None and first - previous < interval_s:
                    # Steps faster than the interval: gather until it has passed (or the request ends).
                    await asyncio.wait({reader}, timeout=first + interval_s - loop.time())
                batch = [item for item, _ in ready]
                previous = ready[-1][1]
                ready.clear()
                yield batch
                continue
            reader.result()  # the source ended: raises what it raised, after the batches before it
            return
    finally:
        if not reader.done():
            reader.cancel()  # raises in `source` where it waits: its cleanup runs (the engine request aborts)
        await asyncio.gather(reader, return_exceptions=True)
