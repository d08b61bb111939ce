"""Per-key rate limits over a sliding window: the last `WINDOW_S` seconds, whenever a request arrives.

Each admitted take (a request, its worst-case tokens) is one row, (key, time, requests, tokens), in the ledger's
`rate_events` table, so every replica sharing the store counts it. A take is admitted when the rows of the last
`WINDOW_S` seconds plus itself stay within both limits, atomically per key (the stores serialize the check and the
insert); so no window of `WINDOW_S` seconds, wherever it starts, ever holds more than the limit. A refused take
counts nothing, and is told how long until enough of the oldest rows have left the window for it to fit
(`retry_after`): that is its Retry-After.

The stores run the SQL; the arithmetic is here, the same for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from cluster.ledger.store import RateLimited

WINDOW_S = 60.0  # "per minute": any 60 s, not the calendar minute


@dataclass(frozen=True)
class Take:
    key_id: str
    requests: int
    tokens: int
    rpm: int | None  # None: no limit
    tpm: int | None
    now: float  # unix time

    @property
    def window_start(self) -> float:
        """Rows at or before this time have left the window."""
        return self.now - WINDOW_S

    def check(self) -> None:
        """Refuse a take that could never fit, whatever the window holds; ValueError for negative counts."""
        if self.requests < 0 or self.tokens < 0:
            raise ValueError(f"requests and tokens must be >= 0, not {self.requests}, {self.tokens}")
        if self.rpm is not None and self.requests > self.rpm:
            raise RateLimited(self.key_id, math.ceil(WINDOW_S), "requests per minute")
        if self.tpm is not None and self.tokens > self.tpm:
            raise RateLimited(self.key_id, math.ceil(WINDOW_S), "tokens per minute")

    def fits(self, used_requests: int, used_tokens: int) -> bool:
        """Whether the take fits beside what the window holds."""
        return ((self.rpm is None or used_requests + self.requests <= self.rpm) and
                (self.tpm is None or used_tokens + self.tokens <= self.tpm))

    def refusal(self, rows: Iterable[tuple[float, int, int]]) -> RateLimited:
        """The refusal of a take that does not fit beside `rows`, the window's (time, requests, tokens), oldest
        first: its retry is when the oldest rows that must leave for it to fit have left (whole seconds, >= 1)."""
        rows = list(rows)
        used_requests = sum(r for _, r, _ in rows)
        used_tokens = sum(t for _, _, t in rows)
        what = ("requests per minute" if self.rpm is not None and used_requests + self.requests > self.rpm
                else "tokens per minute")
        for at, requests, tokens in rows:
            used_requests -= requests
            used_tokens -= tokens
            if self.fits(used_requests, used_tokens):  # once the row at `at` has left, the take fits
                return RateLimited(self.key_id, max(1, math.ceil(at + WINDOW_S - self.now)), what)
        return RateLimited(self.key_id, math.ceil(WINDOW_S), what)  # not reached: `check` refused it first
