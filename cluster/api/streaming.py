"""Response plumbing shared by the API's generation routes (chat and text completions).

A route reads a request's first output (`first_output`) before any response starts, so a refused request gets its
OpenAI error JSON and status even when it asked to stream. Every way a response can end early (client gone, failed
send, cancellation) closes the backend's iterator (`close_outputs`), which aborts the generation: `EventStream` does
it for SSE, `unless_disconnected` for the work done before a response starts.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from cluster.api.errors import APIError
from cluster.api.protocol import TokenLogprob, TopLogprob
from cluster.engine.outputs import RequestOutput, TokenLogprobs
from cluster.tokenizer import Tokenizer

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = "data: [DONE]\n\n"
GONE = 499  # the status answered to a client that disconnected (nginx's): nobody reads it
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
T = TypeVar("T")


# -- reading the backend's outputs ---------------------------------------------------------------------------------
async def first_output(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The first output, or the APIError it carries."""
    try:
        first = await anext(outputs)
    except StopAsyncIteration:
        raise APIError(500, "the backend ended the request without any output") from None
    if failed(first):
        raise output_error(first)
    return first


def failed(out: RequestOutput) -> bool:
    return out.error is not None or out.finish_reason in ("error", "abort")


def output_error(out: RequestOutput) -> APIError:
    """The APIError a failed output carries (`failed(out)` holds)."""
    if out.finish_reason == "abort" and out.error is None:
        return APIError(503, "the request was aborted before it finished")
    code = getattr(out, "error_code", None)
    param = "messages" if code == "context_length_exceeded" else None
    return APIError(out.error_status, out.error or "generation failed", param, code)


async def close_outputs(outputs: AsyncIterator[RequestOutput]) -> None:
    """Closing the backend's iterator aborts the request if it is still running."""
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        await aclose()


# -- logprobs ------------------------------------------------------------------------------------------------------
def token_text(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text and UTF-8 bytes; a byte-fallback piece such as <0xE5> is that byte ("\\xe5" as text)."""
    piece = tokenizer.piece(token_id)
    if m := _BYTE_PIECE.fullmatch(piece):
        raw = bytes([int(m.group(1), 16)])
        return raw.decode("utf-8", errors="backslashreplace"), list(raw)
    text = piece.replace("\u2581", " ")  # SentencePiece's word-start marker
    return text, list(text.encode())


def token_logprob(tokenizer: Tokenizer, token_id: int, lp: TokenLogprobs) -> TokenLogprob:
    """A sampled token's logprob in OpenAI's form."""
    text, raw = token_text(tokenizer, token_id)
    top = []
    for tid, value in lp.top:
        t, b = token_text(tokenizer, tid)
        top.append(TopLogprob(token=t, logprob=value, bytes=b))
    return TokenLogprob(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=top)


# -- server-sent events ----------------------------------------------------------------------------------------------
def sse(obj: dict[str, Any]) -> str:
    """One SSE event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


class EventStream(StreamingResponse):
    """SSE that stops generating whenever the response ends: done, client gone, failed send or cancelled."""

    body_iterator: AsyncGenerator[str, None]

    def __init__(self, events: AsyncGenerator[str, None]):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)

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
            await self.body_iterator.aclose()


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
