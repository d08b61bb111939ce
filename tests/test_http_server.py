"""The single-process server's HTTP front (`cluster.serve.http_server`, issue 24): raw sockets against a real uvicorn
with the guarded protocol, in a thread.

A head that never completes is cut at `header_timeout_s` (uvicorn alone holds it forever: 10 of 10 after 45 s in the
issue), also after a first response on a keep-alive connection; idle keep-alive connections close; one address holds
at most `max_connections_per_client` connections while another is still served, and the server at most
`max_connections`; under a flood exactly the engine's capacity of requests reach the app and every other one is
answered 429 as its head arrives, and a client that goes on sending its body still reads it. Every wait is a socket
read with a timeout or a condition polled to a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
import uvicorn

from cluster.api.errors import APIError
from cluster.api.limits import APILimits
from cluster.config import ModelConfig
from cluster.engine.paged_cache import kv_bytes_per_block
from cluster.serve.args import ServeArgs
from cluster.serve.http_server import ConnectionGuard, http_answer, uvicorn_config
from cluster.serve.resolved import resolve
from cluster.serve.standalone import standalone_config
from tests.test_admission import _Held
from tests.test_api_fuzz import _app

WAIT_S = 20.0  # how long any read waits for the server: a bound for a hung test, not a timing claim
HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"


# -- the guard's arithmetic, without a server ------------------------------------------------------------------------
def test_the_guard_counts_connections_per_address_and_in_all():
    guard = ConnectionGuard(APILimits(max_connections=3, max_connections_per_client=2))
    assert guard.admit("10.0.0.1") is None and guard.admit("10.0.0.1") is None
    refused = guard.admit("10.0.0.1")
    assert refused is not None and (refused.status, refused.code) == (429, "too_many_connections")
    assert guard.admit(None) is None  # no address (a Unix socket): only the total applies
    full = guard.admit("10.0.0.2")
    assert full is not None and full.status == 503
    guard.release("10.0.0.1")
    assert guard.admit("10.0.0.1") is None
    for client in ("10.0.0.1", "10.0.0.1", None):
        guard.release(client)
    assert (guard.total, guard.per_client) == (0, {})
    unlimited = ConnectionGuard(APILimits(max_connections_per_client=0))
    assert all(unlimited.admit("10.0.0.1") is None for _ in range(500))


def test_an_answer_is_a_whole_response_that_closes_the_connection():
    raw = http_answer(APIError(429, "busy"))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert lines[0] == "HTTP/1.1 429 Too Many Requests"
    assert headers["connection"] == "close" and headers["retry-after"] == "5"
    assert headers["content-type"] == "application/json" and int(headers["content-length"]) == len(body)
    assert json.loads(body) == {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": None}}


# -- a real server ---------------------------------------------------------------------------------------------------
@contextmanager
def _serving(config: uvicorn.Config) -> Iterator[int]:
    """`config` served by uvicorn in a thread on a free port of 127.0.0.1 (clients may come from any 127.x
    address)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


@contextmanager
def _guarded(tok, **limits: Any) -> Iterator[int]:
    config = uvicorn_config(_app(tok), "127.0.0.1", 0, APILimits(**limits), log_level="warning", lifespan="off")
    with _serving(config) as port:
        yield port


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT_S, source_address=(source, 0))


def _until_closed(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a server that holds it fails by timeout)."""
    reply = b""
    while chunk := conn.recv(65536):
        reply += chunk
    return reply


def _one_response(conn: socket.socket) -> bytes:
    """One response with a Content-Length body, the connection left open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _more(conn)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += _more(conn)
    return head + b"\r\n\r\n" + body


def _more(conn: socket.socket) -> bytes:
    chunk = conn.recv(65536)
    assert chunk, "the server closed the connection"
    return chunk


def _error(reply: bytes) -> dict:
    return json.loads(reply.partition(b"\r\n\r\n")[2])["error"]


@pytest.mark.e2e  # starts a server
def test_a_head_that_never_completes_is_answered_408_and_closed(tok):
    with _guarded(tok, header_timeout_s=0.5) as port:
        started = time.monotonic()  # before the connection: the server's clock starts when it accepts it
        half, idle = _connect(port), _connect(port)
        half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Ty")
        cut = _until_closed(half)
        waited = time.monotonic() - started
        assert _until_closed(idle) == b""  # never sent a byte: closed without a word
        after_a_response = _connect(port)
        after_a_response.sendall(HEALTH)
        assert _one_response(after_a_response).startswith(b"HTTP/1.1 200 ")
        after_a_response.sendall(b"GET /health HTTP/1.1\r\nHo")  # cancels uvicorn's keep-alive timer
        cut_later = _until_closed(after_a_response)
    assert waited >= 0.5
    for reply in (cut, cut_later):
        assert reply.startswith(b"HTTP/1.1 408 ") and b"connection: close" in reply, reply
        assert _error(reply)["code"] == "request_timeout" and "did not arrive within 0.5 s" in _error(reply)["message"]


@pytest.mark.e2e  # starts a server
def test_a_head_too_large_is_answered_431_and_bytes_after_a_refusal_are_dropped_quietly(tok, caplog):
    from cluster.serve.http_server import MAX_HEAD_BYTES

    with _guarded(tok, header_timeout_s=WAIT_S) as port:
        conn = _connect(port)
        big = b"x-filler: " + b"a" * MAX_HEAD_BYTES + b"\r\n"
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n" + big + b"\r\n")
        too_large = _until_closed(conn)
        # A refused head with bytes that do not parse behind it, in one packet: answered once, nothing raised.
        conn = _connect(port)
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n" + big + b"\r\n\x00\x01garbage\r\n\r\n")
        with caplog.at_level("WARNING"):
            refused_then_garbage = _until_closed(conn)
            after = _connect(port)
            after.sendall(HEALTH)
            assert _one_response(after).startswith(b"HTTP/1.1 200 ")
    assert too_large.startswith(b"HTTP/1.1 431 ") and b"connection: close" in too_large, too_large[:200]
    assert _error(too_large)["message"] == f"the request head is larger than {MAX_HEAD_BYTES} bytes"
    assert refused_then_garbage.count(b"HTTP/1.1 ") == 1 and refused_then_garbage.startswith(b"HTTP/1.1 431 ")
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()], caplog.text[-2000:]


def test_connections_refused_as_they_open_drain_only_up_to_a_bound():
    from cluster.serve.http_server import MAX_LINGERING, guarded_protocol

    class _Transport:
        def __init__(self) -> None:
            self.closed = self.eof = False

        def get_extra_info(self, name: str) -> Any:
            return ("127.0.0.1", 1) if name == "peername" else None

        def write(self, data: bytes) -> None:
            pass

        def can_write_eof(self) -> bool:
            return True

        def write_eof(self) -> None:
            self.eof = True

        def close(self) -> None:
            self.closed = True

    guard = ConnectionGuard(APILimits(max_connections=1))
    guard.total = 1  # full: every new connection is refused as it opens
    protocol_class = guarded_protocol(guard)
    loop = asyncio.new_event_loop()
    try:
        config = uvicorn.Config(lambda *a: None, lifespan="off")
        config.load()
        state = uvicorn.server.ServerState()
        transports, protocols = [], []
        for _ in range(MAX_LINGERING + 3):
            protocols.append(protocol_class(config=config, server_state=state, app_state={}, _loop=loop))
            transports.append(_Transport())
            protocols[-1].connection_made(transports[-1])
        assert guard.lingering == MAX_LINGERING
        assert [t.closed for t in transports] == [False] * MAX_LINGERING + [True] * 3  # past the bound: closed
        assert all(t.eof for t in transports[:MAX_LINGERING])  # the others half-closed, draining
        protocols[-1].connection_lost(None)  # a closed one leaves the count alone
        assert guard.lingering == MAX_LINGERING
        protocols[0].connection_lost(None)  # a drained one leaves it
        assert guard.lingering == MAX_LINGERING - 1 and guard.total == 1
    finally:
        loop.close()


@pytest.mark.e2e  # starts a server
def test_an_idle_keep_alive_connection_is_closed(tok):
    config = uvicorn_config(_app(tok), "127.0.0.1", 0, APILimits(header_timeout_s=60), log_level="warning",
                            lifespan="off", timeout_keep_alive=0.5)
    with _serving(config) as port, _connect(port) as conn:
        conn.sendall(HEALTH)
        assert _one_response(conn).startswith(b"HTTP/1.1 200 ")
        assert _until_closed(conn) == b""


@pytest.mark.e2e  # starts a server
def test_one_address_holds_at_most_its_connections_while_another_is_served(tok):
    config = uvicorn_config(_app(tok), "127.0.0.1", 0, APILimits(max_connections_per_client=3, header_timeout_s=60),
                            log_level="warning", lifespan="off")
    guard: ConnectionGuard = config.http.guard
    with _serving(config) as port:
        held = [_connect(port) for _ in range(3)]
        for conn in held:  # each is served: the server has counted it
            conn.sendall(HEALTH)
            assert _one_response(conn).startswith(b"HTTP/1.1 200 ")
        with _connect(port) as fourth:
            refused = _until_closed(fourth)
        with _connect(port, "127.0.0.2") as other:
            other.sendall(HEALTH)
            served = _one_response(other)
        held.pop().close()
        deadline = time.monotonic() + WAIT_S
        while guard.per_client.get("127.0.0.1") != 2:  # the server reads the close and counts the connection out
            assert time.monotonic() < deadline, guard.per_client
            time.sleep(0.005)
        with _connect(port) as again:
            again.sendall(HEALTH)
            served_again = _one_response(again)
        for conn in held:
            conn.close()
    assert refused.startswith(b"HTTP/1.1 429 ") and b"retry-after: 5" in refused, refused
    error = _error(refused)
    assert (error["type"], error["code"]) == ("rate_limit_error", "too_many_connections"), error
    assert served.startswith(b"HTTP/1.1 200 ") and served_again.startswith(b"HTTP/1.1 200 ")


@pytest.mark.e2e  # starts a server
def test_the_server_holds_at_most_max_connections(tok):
    with _guarded(tok, max_connections=2, header_timeout_s=60) as port:
        held = [_connect(port, f"127.0.0.{i}") for i in (1, 2)]
        for conn in held:
            conn.sendall(HEALTH)
            assert _one_response(conn).startswith(b"HTTP/1.1 200 ")
        with _connect(port, "127.0.0.3") as third:
            refused = _until_closed(third)
        for conn in held:
            conn.close()
    assert refused.startswith(b"HTTP/1.1 503 ") and b"retry-after: 5" in refused, refused
    assert _error(refused)["type"] == "service_unavailable_error"


# -- a full engine's 429, from the head --------------------------------------------------------------------------------
class _CountingApp:
    """The app, counting the requests that reach it."""

    def __init__(self, app: Callable):
        self.app = app
        self.paths: list[str] = []

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)


def _chat_head(length: int) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % length)


def _tiny_server(tiny_dir: Path, max_num_seqs: int, max_waiting: int) -> tuple[uvicorn.Config, _CountingApp, Any]:
    """`moe-cluster serve --no-ray`'s config over the tiny checkpoint, its app counting the requests it sees."""
    config_json = ModelConfig.from_file(tiny_dir)
    args = ServeArgs(model=str(tiny_dir), device="cpu", dtype="fp32", moe_backend="torch", attention_backend="torch",
                     kv_cache_bytes=64 * kv_bytes_per_block(config_json, 16, torch.float32),
                     max_num_seqs=max_num_seqs, max_waiting=max_waiting)
    config, _, engine = standalone_config(resolve(args), "127.0.0.1", 0)
    counted = _CountingApp(config.app)
    config.app = counted
    return config, counted, engine


@pytest.mark.e2e  # starts a server over a real engine
def test_a_full_engine_refuses_from_the_head_without_the_app(tiny_dir: Path):
    config, counted, engine = _tiny_server(tiny_dir, max_num_seqs=1, max_waiting=0)
    body = json.dumps({"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2, "stream": True}).encode()
    try:
        with _serving(config) as port, _Held(engine):
            admitted = _connect(port)
            admitted.sendall(_chat_head(len(body)) + body)
            deadline = time.monotonic() + WAIT_S
            while engine.in_flight == 0:  # the engine's one place is taken
                assert time.monotonic() < deadline, "the first request was not admitted"
                time.sleep(0.005)
            with _connect(port) as head_only:  # its body never comes: the answer does not wait for it
                head_only.sendall(_chat_head(100_000))
                refused = _until_closed(head_only)
            with _connect(port) as whole:  # sends its 1 MiB body after the head: reads its answer, not a reset
                whole.sendall(_chat_head(2**20) + b" " * 2**20)
                refused_whole = _until_closed(whole)
            with _connect(port) as health:
                health.sendall(HEALTH)
                healthy = _one_response(health)
        admitted.close()
    finally:
        engine.shutdown()
    assert counted.paths == ["/v1/chat/completions", "/health"]  # the refused two never reached the app
    for reply in (refused, refused_whole):
        assert reply.startswith(b"HTTP/1.1 429 ") and b"retry-after: 5" in reply and b"connection: close" in reply
        error = _error(reply)
        assert error["type"] == "rate_limit_error" and "sequences are in flight" in error["message"], error
    assert healthy.startswith(b"HTTP/1.1 200 ")


@pytest.mark.e2e  # starts a server over a real engine
def test_a_flood_sends_the_engine_its_capacity_and_refuses_the_rest_from_their_heads(tiny_dir: Path):
    """30 requests whose bodies have not come yet (their handlers wait in the body read, so the engine has admitted
    none of them): the first 4 heads (2 running + 2 waiting) go on to the app, the other 26 are answered at once.
    Counting only what the engine admitted, all 30 would reach the app and be encoded before any was refused."""
    config, counted, engine = _tiny_server(tiny_dir, max_num_seqs=2, max_waiting=2)
    admission = config.http.guard.admission
    body = json.dumps({"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2}).encode()
    try:
        with _serving(config) as port:
            conns = [_connect(port) for _ in range(30)]
            for conn in conns:
                conn.sendall(_chat_head(len(body)))
            answers: dict[socket.socket, bytes] = {}
            pending = list(conns)
            deadline = time.monotonic() + WAIT_S
            while len(answers) < 26 and time.monotonic() < deadline:
                readable, _, _ = select.select(pending, [], [], max(0.0, deadline - time.monotonic()))
                for conn in readable:
                    answers[conn] = _until_closed(conn)
                    pending.remove(conn)
            assert len(answers) == 26 and len(pending) == 4, f"{len(answers)} answered before any body was sent"
            assert admission.active == 4
            for conn in pending:
                conn.sendall(body)
            served = [_one_response(conn) for conn in pending]
            deadline = time.monotonic() + WAIT_S
            while admission.active:  # each is counted out as its response ends
                assert time.monotonic() < deadline, admission.active
                time.sleep(0.005)
            for conn in conns:
                conn.close()
    finally:
        engine.shutdown()
    assert counted.paths == ["/v1/chat/completions"] * 4
    for reply in answers.values():
        assert reply.startswith(b"HTTP/1.1 429 ") and b"retry-after: 5" in reply, reply
        error = _error(reply)
        assert error["type"] == "rate_limit_error" and "at capacity" in error["message"], error
    assert all(reply.startswith(b"HTTP/1.1 200 ") for reply in served), served
