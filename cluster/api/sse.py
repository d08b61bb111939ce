"""Server-sent events, and ending the work of a response with it: a stream that aborts its generation when the
client goes (and then runs its `on_close`, a request's settle), and `unless_disconnected` for the work done before a
response starts."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncGenerator, Awaitable, Callable, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = "data: [DONE]\n\n"
T = TypeVar("T")


def sse(obj: dict[str, Any]) -> str:
    """One SSE event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


class EventStream(StreamingResponse):
    """SSE that stops generating whenever the response ends: done, client gone, failed send or cancelled; then
    `on_close` runs (a request's settle), also when the stream never started."""

    body_iterator: AsyncGenerator[str, None]

    def __init__(self, events: AsyncGenerator[str, None], headers: dict[str, str] | None = None,
                 on_close: Callable[[], Awaitable[object]] | None = None):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS | (headers or {}))
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # ASGI 2.4 servers raise this from send once the client is gone
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)  # any server: receive() says http.disconnect
                group.cancel_scope.cancel()
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                if self.on_close is not None:
                    await self.on_close()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when the client disconnects first: then `work` is cancelled (which aborts it)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and gone.exception() is not None:  # receive() failed: no news of the client
            await task
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # its cleanup (the abort) has run once this returns
    return None if task.cancelled() else task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
