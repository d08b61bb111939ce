"""A graceful stop for the HTTP API: an ASGI middleware that drains it.

`close(grace_s)` stops admitting (every new request, `/health` included, gets 503 with `Retry-After`, so load
balancers and Kubernetes take the server out of rotation), waits up to `grace_s` for the requests in flight, then
cuts the rest: a stream that has started ends with an error event and `data: [DONE]`, a response that has not
started becomes a 503. Cutting cancels the request's handler, which aborts its engine request and frees its blocks.
Both serving modes use it: the single-process server on SIGTERM/SIGINT, and each Ingress replica when the driver
drains it before shutting Serve down.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

from cluster.api.errors import APIError, error_response

log = logging.getLogger(__name__)

Message = dict[str, Any]
ASGIApp = Callable[[dict, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

_SHUTTING_DOWN = "the server is shutting down; retry the request"
_CUT_WAIT_S = 5.0  # how long cut handlers get to unwind (their engine requests are aborted on the way)


class _Exchange:
    """One request's response as it goes out: whether it started, is a stream, and has ended."""

    def __init__(self, send: Callable[[Message], Awaitable[None]]):
        self._send = send
        self.started = self.streaming = self.ended = False
        self.cut = False  # set by `Drain.close` before it cancels the handler

    async def send(self, message: Message) -> None:
        if self.cut:  # the handler is being cancelled: what goes out now is the drain's
            return
        if message["type"] == "http.response.start":
            self.started = True
            headers = dict(message.get("headers") or [])
            self.streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.ended = True
        await self._send(message)

    async def finish(self, scope: dict, receive: Callable[[], Awaitable[Message]]) -> None:
        """End a response whose handler was cut: an error event and [DONE] for a stream, else a 503."""
        if self.ended:
            return
        if not self.started:
            await error_response(503, _SHUTTING_DOWN)(scope, receive, self._send)
        elif self.streaming:
            event = json.dumps(APIError(503, _SHUTTING_DOWN).body())
            body = f"data: {event}\n\ndata: [DONE]\n\n".encode()
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
        else:
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        self.ended = True


class Drain:
    """ASGI middleware around the API app; see the module docstring."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.closing = False
        self._handlers: dict[asyncio.Task, _Exchange] = {}

    @property
    def in_flight(self) -> int:
        return len(self._handlers)

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.closing:
            return await error_response(503, _SHUTTING_DOWN)(scope, receive, send)
        exchange = _Exchange(send)
        handler = asyncio.ensure_future(self.app(scope, receive, exchange.send))
        self._handlers[handler] = exchange
        try:
            await asyncio.shield(handler)
        except asyncio.CancelledError:
            if not exchange.cut:  # this task itself was cancelled (the server is going away): take the handler too
                handler.cancel()
                raise
            await exchange.finish(scope, receive)
        finally:
            self._handlers.pop(handler, None)

    def stop_admitting(self) -> None:
        """From now on every new request gets 503 (`close` does this first)."""
        self.closing = True

    async def close(self, grace_s: float) -> None:
        """Stop admitting, give the requests in flight `grace_s` to finish, then cut the rest."""
        self.stop_admitting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._handlers and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if not self._handlers:
            return
        log.warning("cutting %d requests still running after the %.0fs grace period", len(self._handlers), grace_s)
        for handler, exchange in list(self._handlers.items()):
            exchange.cut = True
            handler.cancel()
        deadline = loop.time() + _CUT_WAIT_S
        while self._handlers and loop.time() < deadline:
            await asyncio.sleep(0.02)
