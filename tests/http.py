"""Reading server-sent events in tests: one parser for every test that reads a stream, so each checks the same
framing (blocks of one `data:` line, a stream ending with one `[DONE]`)."""

from __future__ import annotations

import json
from typing import Any, Iterable

DONE = "[DONE]"
_DATA = "data: "


def data_of(line: str) -> str | None:
    """The payload of one streamed `data:` line; None for any other line (blank separators, comments)."""
    return line[len(_DATA):] if line.startswith(_DATA) else None


def sse_data(text: str) -> list[str]:
    """Every `data:` payload of a whole SSE body, in order, "[DONE]" included; each block must be one `data:` line."""
    blocks = [block for block in text.split("\n\n") if block]
    bad = [block for block in blocks if not block.startswith(_DATA) or "\n" in block]
    assert not bad, f"blocks that are not one SSE data line: {bad[:3]}"
    return [block[len(_DATA):] for block in blocks]


def sse_chunks(text: str) -> list[dict[str, Any]]:
    """The JSON chunks of a whole stream, which must end with one [DONE] and nothing after it."""
    return _chunks(sse_data(text))


def sse_line_chunks(lines: Iterable[str]) -> list[dict[str, Any]]:
    """`sse_chunks` of a stream read line by line (httpx's `iter_lines`)."""
    return _chunks([payload for line in lines if (payload := data_of(line)) is not None])


def _chunks(payloads: list[str]) -> list[dict[str, Any]]:
    assert payloads and payloads[-1] == DONE and DONE not in payloads[:-1], \
        f"the stream does not end with one [DONE]: {payloads[-3:]}"
    return [json.loads(payload) for payload in payloads[:-1]]
