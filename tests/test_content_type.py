"""Every POST route takes JSON only (issue 24, API 6): a body declared as anything else, or not declared at all,
gets 415 in OpenAI's error JSON before a byte of it is read, and nothing reaches the backend. A `text/plain` or form
POST is what any web page can make a browser send without asking (a CORS simple request)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from tests.test_api_fuzz import HELLO, INTERNALS, _app, _Recorder, uvicorn_server

REFUSED = [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
           "multipart/form-data; boundary=xyz", "application/jsonx", "application/json-seq", "json", "",
           "application/json; charset=latin-1", "text/json", "application/json\x00", "x" * 5000]
ACCEPTED = ["application/json", "application/json; charset=utf-8", 'Application/JSON; Charset="UTF-8"',
            "application/merge-patch+json", " application/json ;charset=utf8"]


def _post_routes(app) -> list[str]:
    return sorted(r.path for r in app.routes if isinstance(r, Route) and "POST" in (r.methods or ()))


def _body(path: str) -> bytes:
    return (b'{"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 1}' if "chat" in path
            else b'{"prompt": "Say hello.", "max_tokens": 1}')


async def _post(app, path: str, content_type: str | None) -> tuple[int, dict[str, str], dict, bool]:
    """POST straight into the ASGI app: (status, headers, JSON body, whether the app asked for the body)."""
    raw = _body(path)
    headers = [(b"content-length", str(len(raw)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type.encode("latin-1")))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 5000), "server": ("test", 80)}
    read = False
    sent: list[dict[str, Any]] = []
    ended = asyncio.Event()

    async def receive() -> dict:
        nonlocal read
        if not read:
            read = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await ended.wait()  # the client stays until the response has ended
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            ended.set()

    await asyncio.wait_for(app(scope, receive, send), timeout=20)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body), read


def test_the_post_routes_are_the_generation_routes(tok):
    assert _post_routes(_app(tok)) == ["/v1/chat/completions", "/v1/completions"]


@pytest.mark.parametrize("content_type", REFUSED)
def test_a_body_not_declared_json_gets_415_before_it_is_read(tok, content_type):
    backend = _Recorder()
    app = _app(tok, backend)
    for path in _post_routes(app):
        status, headers, body, read = asyncio.run(_post(app, path, content_type))
        assert status == 415, (path, body)
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("invalid_request_error", "unsupported_media_type"), error
        assert "application/json" in error["message"] and len(error["message"]) < 400, error["message"]
        assert "\x00" not in error["message"] and not INTERNALS.search(error["message"]), error["message"]
        assert headers["content-type"] == "application/json"
        assert not read, "the body was read"
    assert backend.calls == []


@pytest.mark.parametrize("content_type", ACCEPTED)
def test_json_content_types_are_served(tok, content_type):
    backend = _Recorder()
    app = _app(tok, backend)
    for path in _post_routes(app):
        status, _, body, read = asyncio.run(_post(app, path, content_type))
        assert status == 200 and read, (path, body)
    assert len(backend.calls) == 2


@pytest.mark.e2e  # starts a server
def test_a_form_post_through_a_real_server_gets_415(tok):
    """The issue's report, as a browser's form would send it (and a fetch() without headers: text/plain)."""
    backend = _Recorder()
    with uvicorn_server(_app(tok, backend)) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        form = client.post("/v1/chat/completions", data={"messages": "hello"})
        plain = client.post("/v1/completions", content=b'{"prompt": "hi"}', headers={"content-type": "text/plain"})
        served = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1})
    assert form.status_code == plain.status_code == 415, (form.text, plain.text)
    assert form.json()["error"]["code"] == plain.json()["error"]["code"] == "unsupported_media_type"
    assert served.status_code == 200, served.text
    assert len(backend.calls) == 1
