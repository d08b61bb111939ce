"""A request body read under the API's limits, then decoded as strict JSON.

Before anything is read, the body must be declared JSON: `Content-Type: application/json` or a structured `+json`
type (`application/merge-patch+json`), with no charset or `charset=utf-8`. Anything else, or no Content-Type at all,
is a 415. A browser sends `text/plain`, form types or none without asking the server first (a CORS "simple
request"), so on an open server any web page could otherwise make its visitors' browsers generate; a JSON body needs
the browser to ask first (a CORS preflight), which this API never grants.

Reading: a declared Content-Length over the limit is refused before a byte is read; a streamed (chunked) body is
refused as soon as it passes the limit; a body still arriving after the timeout is refused. The 413/408 answers
close the connection (errors.py), so a refused client holds nothing.

Decoding follows RFC 8259, not Python's leniencies: UTF-8 only, no NaN/Infinity, no lone UTF-16 surrogates (a
"\\ud800" escape decodes to a str no encoder or tokenizer accepts). Python's own limits (nesting depth, integer
digits) become 400s that say so in words, never its exception text.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from starlette.requests import ClientDisconnect, Request

from cluster.api.errors import APIError
from cluster.api.limits import APILimits

# A \u escape of a surrogate (D800-DFFF); only escapes can put one in a str once the bytes decoded as strict UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


async def read_body(request: Request, limits: APILimits) -> bytes:
    """The whole body, or the APIError (415, 413, 408, 400) that refuses it; ClientDisconnect if the client left."""
    require_json(request.headers.get("content-type"))
    declared = _content_length(request)
    if declared is not None and declared > limits.max_body_bytes:
        raise _too_large(limits.max_body_bytes, declared)
    try:
        return await asyncio.wait_for(_receive(request, limits.max_body_bytes), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                       code="request_timeout") from None


def require_json(content_type: str | None) -> None:
    """APIError(415) unless `content_type` declares JSON in UTF-8 (module docstring)."""
    media_type, *params = (content_type or "").split(";")
    media_type = media_type.strip().lower()
    kind, _, subtype = media_type.partition("/")
    if not (kind == "application" and (subtype == "json" or subtype.endswith("+json"))):
        declared = f"Content-Type {_quoted(content_type)}" if content_type else "no Content-Type"
        raise APIError(415, f"the request body must be JSON, sent with Content-Type: application/json; this request "
                            f"has {declared}", code="unsupported_media_type")
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise APIError(415, f"the request body must be JSON in UTF-8, sent with Content-Type: application/json; "
                                f"this request declares {_quoted(param.strip())}", code="unsupported_media_type")


def _quoted(text: str, most: int = 100) -> str:
    """A client's header value for a message: repr'd (no control characters) and cut short."""
    return repr(text if len(text) <= most else text[:most] + "...")


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not (value.strip().isascii() and value.strip().isdigit()):
        raise APIError(400, "the Content-Length header is not a number of bytes")
    return int(value)


async def _receive(request: Request, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:  # stop reading: the rest is never received
            raise _too_large(max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(max_bytes: int, declared: int | None = None) -> APIError:
    size = "is larger" if declared is None else f"of {declared} bytes is larger"
    return APIError(413, f"the request body {size} than the limit of {max_bytes} bytes", code="request_too_large")


def decode_json(raw: bytes) -> Any:
    """The JSON value of a body; an APIError(400) saying what is wrong with it otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: it is not UTF-8 (at byte {e.start})") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark, which RFC 8259 lets parsers ignore
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") \
            from None
    except _NotJSON as e:
        raise APIError(400, f"the request body is not valid JSON: {e} is not a JSON value") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
        raise APIError(400, "the request body has an integer with too many digits") from None
    if _SURROGATE_ESCAPE.search(text) and (found := _lone_surrogate(value)) is not None:
        where, param = found
        raise APIError(400, f"{where} is not valid Unicode: it holds a lone UTF-16 surrogate", param)
    return value


class _NotJSON(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJSON(name)  # NaN, Infinity, -Infinity: Python writes them, JSON has no such values


def _lone_surrogate(value: Any) -> tuple[str, str | None] | None:
    """A string (or key) holding a lone surrogate, in words and as a param ('messages[0].content'); None if none."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not _is_unicode(item):
                return (path, path) if path else ("the request body", None)
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(item))
        elif isinstance(item, dict):
            for key, v in item.items():
                name = f"{path}.{_printable(key)}" if path else _printable(key)
                if not _is_unicode(key):
                    return f"the key {name}", None
                stack.append((name, v))
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")
