"""The single-process server's HTTP front: uvicorn (httptools), its protocol guarded against clients that hold
connections or flood it.

uvicorn alone bounds an idle keep-alive connection (`timeout_keep_alive`), and the app bounds a body
(`body_timeout_s`, 408); nothing bounds a connection whose request head never completes (uvicorn arms no timer
before a first response, and any byte of a next request cancels its keep-alive timer), nor how many connections one
client holds. `GuardedProtocol` adds, per connection:

- a head deadline: a request head must be complete `header_timeout_s` after the connection opened or the previous
  response ended; past it the connection gets 408 (if any of the head arrived) and is closed; a head (URL and
  headers) larger than `MAX_HEAD_BYTES` gets 431;
- connection caps, checked as a connection opens: past `max_connections` in all it gets 503, past
  `max_connections_per_client` from its address 429 (both with Retry-After);
- admission from the head (`cluster.api.admission`): a generation request arriving while the engine's capacity is
  taken (counting the requests still between their head and the end of their response) is answered 429 as its head
  completes, in the read callback: no task, middleware or router runs for it, its body is never read, and a flood's
  refusals go out as their heads arrive.

Every answer here is OpenAI's error JSON with `Connection: close`. The connection is then half-closed and what the
client still sends is read and dropped for up to `LINGER_S` (a close with unread input would reset it, and the
client could lose the answer), then closed.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import urllib.parse
from http import HTTPStatus
from typing import Any, ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from cluster.api.admission import HeadAdmission
from cluster.api.errors import APIError
from cluster.api.limits import APILimits

log = logging.getLogger(__name__)

LINGER_S = 2.0  # how long a refused connection's input is drained before it is closed
MAX_LINGERING = 256  # connections refused as they opened that may drain at once; past it they close at once
MAX_HEAD_BYTES = 64 * 1024  # a request head's URL and headers; past it 431 (httptools itself has no bound)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's timer; its default)
SPARE_FILES = 256  # file descriptors beyond the connections': checkpoint files, pipes, the ledger's


class ConnectionGuard:
    """The server's connection counts, in all and per client address, against `limits`; event-loop thread only."""

    def __init__(self, limits: APILimits, admission: HeadAdmission | None = None):
        self.limits = limits
        self.admission = admission
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.lingering = 0  # connections refused as they opened, still draining (not in `total`)

    def admit(self, client: str | None) -> APIError | None:
        """Count a new connection from `client` (None: no address, e.g. a Unix socket), or the answer refusing it."""
        limits = self.limits
        if self.total >= limits.max_connections:
            return APIError(503, f"the server holds its limit of {limits.max_connections} connections; retry later")
        cap = limits.max_connections_per_client
        if client is not None and cap and self.per_client.get(client, 0) >= cap:
            return APIError(429, f"too many connections from this address (the limit is {cap}): reuse connections "
                                 f"or close idle ones", code="too_many_connections")
        self.total += 1
        if client is not None:
            self.per_client[client] = self.per_client.get(client, 0) + 1
        return None

    def release(self, client: str | None) -> None:
        self.total -= 1
        if client is not None:
            left = self.per_client.pop(client) - 1
            if left:
                self.per_client[client] = left


def http_answer(error: APIError) -> bytes:
    """`error` as a whole HTTP/1.1 response that closes the connection."""
    response = error.response()
    status = f"HTTP/1.1 {error.status} {_reason(error.status)}\r\n".encode()
    headers = b"".join(name + b": " + value + b"\r\n" for name, value in response.raw_headers
                       if name != b"connection")
    return status + headers + b"connection: close\r\n\r\n" + response.body


def _reason(status: int) -> str:
    return HTTPStatus(status).phrase


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head deadline, connection caps and early refusal (module docstring).
    Subclassed per server by `guarded_protocol`, which sets `guard`."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client_host: str | None = None
        self._counted = False
        self._refused = False  # answered here: what the client still sends is dropped
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_begun = False  # a byte of the awaited head has arrived
        self._linger: asyncio.TimerHandle | None = None
        self._lingers_uncounted = False  # a connection refused as it opened, draining: in `guard.lingering`
        self._head_bytes = 0  # of the request head being read
        self._admitted: list[RequestResponseCycle] = []  # generation requests the guard's admission counts in

    # -- connection life -----------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else None
        refusal = self.guard.admit(host)
        if refusal is not None:
            self.transport = transport  # uvicorn never sees this connection
            self._refuse(refusal)
            return
        self._client_host, self._counted = host, True
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave(self._admitted)  # their responses end here, whatever they were
        self._stop_head_timer()
        if self._linger is not None:
            self._linger.cancel()
        if self._lingers_uncounted:
            self._lingers_uncounted = False
            self.guard.lingering -= 1
        if self._counted:
            self._counted = False
            self.guard.release(self._client_host)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_timer is not None:
            self._head_begun = True
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._leave([cycle for cycle in self._admitted if cycle.response_complete])
        super().on_response_complete()
        # No pipelined request started: the next head is awaited, within the deadline.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_head()

    # -- parser callbacks: once refused, the rest of the bytes fed in this read are ignored ------------------------
    def on_message_begin(self) -> None:
        if not self._refused:
            self._head_bytes = 0
            super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._refused and self._head_fits(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._refused and self._head_fits(len(name) + len(value)):
            super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # bytes after a refusal that do not parse: the answer went out already
            super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._stop_head_timer()
        admission = self.guard.admission
        counted = False
        if admission is not None and self._is_generation(admission):
            refusal = admission.enter()
            if refusal is not None:
                self._refuse(refusal)
                return
            counted = True
        super().on_headers_complete()
        if counted:
            self._admitted.append(self.cycle)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    # -- what this class adds ----------------------------------------------------------------------------------------
    def _is_generation(self, admission: HeadAdmission) -> bool:
        """Whether the head that just completed is a generation request, to admit here; not when an earlier request
        on the connection is still being answered (pipelined: its answer must wait its turn; the route decides)."""
        if not (self.cycle is None or self.cycle.response_complete):
            return False
        method = self.parser.get_method().decode("ascii", "replace")
        path = httptools.parse_url(self.url).path.decode("ascii", "replace")
        if "%" in path:
            path = urllib.parse.unquote(path)
        return admission.is_generation(method, path)

    def _leave(self, cycles: list[RequestResponseCycle]) -> None:
        """The admission counts out these generation requests, whose responses have ended."""
        admission = self.guard.admission
        for cycle in list(cycles):
            self._admitted.remove(cycle)
            assert admission is not None
            admission.leave()

    def _await_head(self) -> None:
        self._stop_head_timer()
        self._head_begun = False
        self._head_timer = self.loop.call_later(self.guard.limits.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._head_begun:  # nothing of a request: an idle connection, closed without a word
            self.transport.close()
            return
        self._refuse(APIError(408, f"the request head did not arrive within {self.guard.limits.header_timeout_s:g} "
                                   f"s", code="request_timeout"))

    def _head_fits(self, nbytes: int) -> bool:
        self._head_bytes += nbytes
        if self._head_bytes <= MAX_HEAD_BYTES:
            return True
        self._refuse(APIError(431, f"the request head is larger than {MAX_HEAD_BYTES} bytes"))
        return False

    def _refuse(self, error: APIError) -> None:
        """Answer `error`, then half-close and drain the connection for up to LINGER_S (module docstring); a
        connection refused as it opened closes at once when MAX_LINGERING of those drain already."""
        self._refused = True
        self._stop_head_timer()
        transport = self.transport
        transport.write(http_answer(error))
        if not self._counted:
            if self.guard.lingering >= MAX_LINGERING:
                transport.close()
                return
            self.guard.lingering += 1
            self._lingers_uncounted = True
        if transport.can_write_eof():
            transport.write_eof()
            self._linger = self.loop.call_later(LINGER_S, transport.close)
        else:  # TLS: no half-close
            transport.close()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """A `GuardedProtocol` class for one server, counting its connections in `guard`."""
    return type("GuardedProtocol", (GuardedProtocol,), {"guard": guard})


def uvicorn_config(app: Any, host: str, port: int, limits: APILimits, admission: HeadAdmission | None = None,
                   **kwargs: Any) -> uvicorn.Config:
    """A uvicorn config serving `app` through a `GuardedProtocol` under `limits`, admitting generation requests from
    their heads with `admission` (None: the routes decide); no WebSockets (the API has none)."""
    protocol = guarded_protocol(ConnectionGuard(limits, admission))
    kwargs.setdefault("timeout_keep_alive", KEEP_ALIVE_S)
    return uvicorn.Config(app, host=host, port=port, http=protocol, ws="none", **kwargs)


def allow_open_files(connections: int) -> None:
    """Raise this process's soft limit on open files to fit `connections` (a shell's default is often 1024, and a
    server past it fails to accept instead of answering 503), as far as the hard limit allows; a warning if not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + SPARE_FILES
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    if raised < wanted:
        log.warning("open files are limited to %d (hard limit): fewer than max_connections=%d need; lower it or "
                    "raise the limit", raised, connections)
