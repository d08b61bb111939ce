"""The ledger's contract: what both stores (SQLite, PostgreSQL) provide.

Money is integer micro-dollars. A request reserves its worst-case cost up front in one atomic statement (the balance
can never be spent twice), then settles to its real cost: the difference is refunded and a usage-log row written,
once, however often settle is called. Each reservation carries an expiry, so one left open by a dead process is
refunded by `release_expired`. Rate-limit windows live in the store too (`rate_window`), so every replica sharing it
counts them.
`cluster.ledger.open_ledger` opens one by URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

RESERVATION_OPEN, RESERVATION_SETTLED, RESERVATION_RELEASED = "open", "settled", "released"


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    name: str | None
    balance_micro: int
    revoked: bool
    created: float  # unix time
    rpm_limit: int | None  # requests per minute; None: unlimited
    tpm_limit: int | None  # tokens per minute; None: unlimited


@dataclass(frozen=True)
class UsageRow:
    request_id: str
    key_id: str
    prompt_tokens: int
    completion_tokens: int
    cost_micro: int
    time: float  # unix time of the settlement


class LedgerError(Exception):
    """Base of the ledger's refusals."""


class UnknownKey(LedgerError):
    def __init__(self, key_id: str, reason: str = "no such key") -> None:
        super().__init__(f"{reason}: {key_id}")
        self.key_id = key_id


class KeyRevoked(UnknownKey):
    """Raised by `reserve` for a key revoked after it authenticated."""

    def __init__(self, key_id: str) -> None:
        super().__init__(key_id, "key revoked")


class InsufficientCredits(LedgerError):
    def __init__(self, key_id: str, balance_micro: int, needed_micro: int) -> None:
        super().__init__(f"key {key_id} has {balance_micro} micro-dollars, the request needs {needed_micro}")
        self.key_id = key_id
        self.balance_micro = balance_micro
        self.needed_micro = needed_micro


class RateLimited(LedgerError):
    def __init__(self, key_id: str, retry_after_s: int, what: str) -> None:
        super().__init__(f"key {key_id} is over its {what} limit; retry after {retry_after_s}s")
        self.key_id = key_id
        self.retry_after_s = retry_after_s
        self.what = what  # "requests per minute" or "tokens per minute"


class Ledger(Protocol):
    async def create_key(self, name: str | None, credits_micro: int, rpm: int | None = None,
                         tpm: int | None = None) -> tuple[KeyRecord, str]:
        """The new key's record and the full key (shown once: only its digest is stored)."""

    async def list_keys(self) -> list[KeyRecord]: ...

    async def revoke(self, key_id: str) -> None:
        """UnknownKey when there is no such key."""

    async def credit(self, key_id: str, amount_micro: int) -> int:
        """Adds `amount_micro` (> 0); the new balance. UnknownKey when there is no such key."""

    async def authenticate(self, key: str) -> KeyRecord | None:
        """The key's record, or None: malformed, unknown or wrong secret. Revoked keys are returned (check
        `revoked`)."""

    async def reserve(self, key_id: str, request_id: str, amount_micro: int, ttl_s: float) -> int:
        """Takes `amount_micro` from the balance in one atomic statement and records an open reservation expiring in
        `ttl_s`; the balance after. InsufficientCredits, KeyRevoked or UnknownKey otherwise (nothing taken);
        LedgerError for a request id already used."""

    async def settle(self, request_id: str, prompt_tokens: int, completion_tokens: int, cost_micro: int) -> int:
        """Closes the reservation at `cost_micro` (capped at the amount reserved), refunds the rest and writes the
        usage-log row; the balance after. A second call changes nothing. After `release_expired` refunded the
        reservation, the cost is charged again in full (the balance may go below zero: a charge is never lost).
        LedgerError for a request id never reserved."""

    async def renew(self, request_ids: list[str], ttl_s: float, now: float | None = None) -> int:
        """Moves the expiry of those still open to `ttl_s` from now (a live server renews its requests', so only a
        dead one's expire); how many."""

    async def release_expired(self, now: float | None = None) -> int:
        """Refunds every open reservation past its expiry in full; how many. Also drops the rate rows that have left
        the window."""

    async def usage(self, key_id: str | None = None, limit: int = 100) -> list[UsageRow]:
        """The usage log, newest first."""

    async def open_reservations(self, key_id: str | None = None) -> int: ...

    async def take_rate(self, key_id: str, requests: int, tokens: int, rpm: int | None, tpm: int | None,
                        now: float | None = None) -> None:
        """Counts `requests` and `tokens` in the key's sliding window (the last 60 s, `rate_window`), atomically and
        only if both stay within their limits (None: no limit); RateLimited(retry_after_s: until enough has left the
        window for this take to fit) otherwise, with nothing counted. `now`: unix time (default: the store's
        clock)."""

    async def close(self) -> None: ...


def check_new_key(credits_micro: int, rpm: int | None, tpm: int | None) -> None:
    if credits_micro < 0:
        raise ValueError(f"credits must be >= 0, not {credits_micro}")
    for name, limit in (("rpm", rpm), ("tpm", tpm)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be >= 1 (or unset), not {limit}")


def check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, not {value}")
