"""A request's outputs in batches across the Serve hop (AttentionRouter -> Ingress).

Every item a Serve streaming call yields is one Ray message, with its own serialization and bookkeeping on both
sides; a stream that yields each token alone pays that per token. `batched` groups what one request's engine
outputs arrive within an interval into one list (one message): the first output of a request goes at once (time to
first token is never held back), and any later one waits at most `interval_s` after the first output of its batch
arrived. A request that ends flushes at once. An output that came after a gap of `interval_s` or more (the engine's
steps are slower than the interval: nothing would join it) goes at once too.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, TypeVar

T = TypeVar("T")


async def batched(source: AsyncIterator[T], interval_s: float) -> AsyncIterator[list[T]]:
    """`source`'s items in lists (see the module's doc); `interval_s` <= 0: each item alone, at once.

    Closing this iterator (a consumer that leaves) cancels the read in progress and closes `source`."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Future | None = None  # the read of `source` in progress, kept across a batch's deadline
    first = True
    last_arrival: float | None = None  # when the latest output came
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            try:
                batch = [await pending]  # however long the engine takes
            except StopAsyncIteration:
                return
            pending = None
            now = loop.time()
            slow = last_arrival is not None and now - last_arrival >= interval_s
            deadline = now if first or slow else now + interval_s
            first, last_arrival = False, now
            while (remaining := deadline - loop.time()) > 0:
                pending = asyncio.ensure_future(anext(source))
                done, _ = await asyncio.wait({pending}, timeout=remaining)
                if not done:  # the deadline: send what there is; the read goes on for the next batch
                    break
                pending = None
                try:
                    batch.append(done.pop().result())
                except StopAsyncIteration:
                    yield batch
                    return
                last_arrival = loop.time()
            yield batch
    finally:
        if pending is not None and not pending.done():
            pending.cancel()  # raises in `source` where it waits: its own cleanup runs (the engine request aborts)
            try:
                await pending
            except (asyncio.CancelledError, StopAsyncIteration):
                pass
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
