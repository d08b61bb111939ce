"""A POST straight into an ASGI app, with no HTTP client in between: for tests that time a request from its arrival
at the app, or read a stream while it is still open (httpx's ASGI transport hands a response over only once it has
ended). And `on_standalone`: a workload against the single-process app of some settings, over httpx."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable, TypeVar

import httpx

from cluster.serve.args import ServeArgs

T = TypeVar("T")


async def asgi_post(app, path: str, body: dict, on_message: Callable[[dict[str, Any]], None]) -> None:
    """POST `body` as JSON to `path`; each message the app sends (the response's start, then its body chunks) goes
    to `on_message`. The client stays connected until the response has ended."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("test", 1),
             "server": ("test", 80), "headers": [(b"content-type", b"application/json"),
                                                 (b"content-length", str(len(raw)).encode())]}
    ended = asyncio.Event()
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await ended.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        on_message(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            ended.set()

    await app(scope, receive, send)


def on_standalone(args: ServeArgs, work: Callable[[httpx.AsyncClient], Awaitable[T]], timeout_s: float = 120) -> T:
    """`work(client)` against the single-process app (`--no-ray`) of `args`, no Ray involved, over httpx's ASGI
    transport; the engine is shut down after."""
    from cluster.serve.resolved import resolve
    from cluster.serve.standalone import build_standalone_app

    app, engine = build_standalone_app(resolve(args))

    async def run() -> T:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=timeout_s) as client:
            return await work(client)

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()
