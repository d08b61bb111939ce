"""The cluster ledger: PostgreSQL through an asyncpg pool, shared by every Ingress replica on every node.

Each method is one short transaction; reserve and settle are one statement each. The reserve's debit is a
conditional UPDATE, so concurrent replicas can never spend the same credits twice; the reservation a settle is
closing is locked (FOR UPDATE), and `release_expired` skips locked rows (SKIP LOCKED), so a settle and a release
never both refund one reservation.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from hmac import compare_digest
from urllib.parse import urlsplit

import asyncpg

from cluster.ledger.keys import new_api_key, parse_api_key
from cluster.ledger.rate_window import WINDOW_S, Take
from cluster.ledger.store import (RESERVATION_OPEN, RESERVATION_RELEASED, RESERVATION_SETTLED, InsufficientCredits,
                                  KeyRecord, KeyRevoked, LedgerError, UnknownKey, UsageRow, check_new_key,
                                  check_positive)

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, digest BYTEA NOT NULL, name TEXT, balance BIGINT NOT NULL,
    revoked BOOLEAN NOT NULL DEFAULT FALSE, created DOUBLE PRECISION NOT NULL, rpm_limit BIGINT, tpm_limit BIGINT);
CREATE TABLE IF NOT EXISTS reservations (
    request_id TEXT PRIMARY KEY, key_id TEXT NOT NULL REFERENCES keys (key_id), amount BIGINT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL, state TEXT NOT NULL DEFAULT 'open');
CREATE INDEX IF NOT EXISTS reservations_open ON reservations (expires_at) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS reservations_key ON reservations (key_id) WHERE state = 'open';
CREATE TABLE IF NOT EXISTS usage (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, key_id TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, cost BIGINT NOT NULL,
    time DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS usage_key ON usage (key_id, seq);
CREATE TABLE IF NOT EXISTS rate_events (
    key_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, requests BIGINT NOT NULL, tokens BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS rate_events_key ON rate_events (key_id, at);
"""

_KEY_COLUMNS = "key_id, name, balance, revoked, created, rpm_limit, tpm_limit"

# Reserve and settle are one statement each: the key's row is locked for that statement only (not across several
# round trips of a transaction), which is what many requests on one key queue behind. A statement is atomic: a
# duplicate request id fails the insert and undoes the debit with it.
_RESERVE = """
WITH debit AS (UPDATE keys SET balance = balance - $1 WHERE key_id = $2 AND balance >= $1 AND NOT revoked
               RETURNING balance),
     hold AS (INSERT INTO reservations (request_id, key_id, amount, expires_at) SELECT $3, $2, $1, $4 FROM debit)
SELECT balance FROM debit"""

# The reservation's state before this settle decides the refund: open -> what was not spent; released by the expiry
# sweep (refunded in full) -> the cost is taken back. An already settled one matches nothing (settle is idempotent).
_SETTLE = f"""
WITH prior AS (SELECT request_id, state FROM reservations WHERE request_id = $1 AND state <> '{RESERVATION_SETTLED}'
               FOR UPDATE),
     closed AS (UPDATE reservations AS r SET state = '{RESERVATION_SETTLED}' FROM prior
                WHERE r.request_id = prior.request_id RETURNING r.key_id, r.amount, prior.state AS was),
     charge AS (SELECT key_id, LEAST($4::bigint, amount) AS cost,
                       CASE WHEN was = '{RESERVATION_OPEN}' THEN amount - LEAST($4::bigint, amount)
                            ELSE -LEAST($4::bigint, amount) END AS refund FROM closed),
     credited AS (UPDATE keys SET balance = balance + charge.refund FROM charge WHERE keys.key_id = charge.key_id
                  RETURNING keys.balance),
     logged AS (INSERT INTO usage (request_id, key_id, prompt_tokens, completion_tokens, cost, time)
                SELECT $1, key_id, $2, $3, cost, $5 FROM charge)
SELECT balance FROM credited"""


# A key's takes queue on a transaction-scoped advisory lock of their own (not the key's row, which reserve and settle
# update), taken in its own statement: a statement sees what was committed before it began, so the window is read
# after the lock is held, never before. Two keys whose hashes collide merely share a queue.
_RATE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('moe-cluster rate window'), hashtext($1))"
# Prune, count and insert in one statement (its parts see one snapshot: the sum skips the rows it prunes itself).
_TAKE = """
WITH pruned AS (DELETE FROM rate_events WHERE key_id = $1 AND at <= $2 - $7::double precision),
     used AS (SELECT coalesce(sum(requests), 0)::bigint AS requests, coalesce(sum(tokens), 0)::bigint AS tokens
              FROM rate_events WHERE key_id = $1 AND at > $2 - $7::double precision),
     taken AS (INSERT INTO rate_events (key_id, at, requests, tokens) SELECT $1, $2, $3, $4 FROM used
               WHERE ($5::bigint IS NULL OR used.requests + $3 <= $5)
                 AND ($6::bigint IS NULL OR used.tokens + $4 <= $6) RETURNING 1)
SELECT EXISTS (SELECT 1 FROM taken)"""


def _record(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(row["key_id"], row["name"], row["balance"], row["revoked"], row["created"], row["rpm_limit"],
                     row["tpm_limit"])


# Connections per replica: a burst of requests each holds one for a statement at a time, and a smaller pool makes
# them queue for connections (benchmarks/RESULTS.md, ledger overhead); several replicas must fit the server's
# max_connections (PostgreSQL's default is 100).
POOL_CONNECTIONS = 32


class PostgresLedger:
    """The `Ledger` contract on PostgreSQL (see `cluster.ledger.store`). The pool opens on first use, in the event
    loop that uses it."""

    def __init__(self, url: str, password: str | None = None, max_connections: int = POOL_CONNECTIONS,
                 clock: Callable[[], float] = time.time) -> None:
        self._url = url
        self._clock = clock  # unix time: reservation expiries, usage times, rate windows
        self._password = None if urlsplit(url).password else password  # the URL's own password wins
        self._max_connections = max_connections
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def _connect(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is None:
                pool = await asyncpg.create_pool(self._url, password=self._password, min_size=1,
                                                 max_size=self._max_connections)
                try:
                    async with pool.acquire() as conn, conn.transaction():
                        # replicas starting together: one creates the tables, the others then find them
                        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('moe-cluster ledger schema'))")
                        await conn.execute(SCHEMA)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
        return self._pool

    # keys
    async def create_key(self, name: str | None, credits_micro: int, rpm: int | None = None,
                         tpm: int | None = None) -> tuple[KeyRecord, str]:
        check_new_key(credits_micro, rpm, tpm)
        key_id, key, digest = new_api_key()
        record = KeyRecord(key_id, name, credits_micro, False, self._clock(), rpm, tpm)
        pool = await self._connect()
        await pool.execute(f"INSERT INTO keys (digest, {_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, FALSE, $5, $6, $7)",
                           digest, key_id, name, credits_micro, record.created, rpm, tpm)
        return record, key

    async def list_keys(self) -> list[KeyRecord]:
        pool = await self._connect()
        return [_record(r) for r in await pool.fetch(f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY created, key_id")]

    async def revoke(self, key_id: str) -> None:
        pool = await self._connect()
        if await pool.fetchval("UPDATE keys SET revoked = TRUE WHERE key_id = $1 RETURNING key_id", key_id) is None:
            raise UnknownKey(key_id)

    async def credit(self, key_id: str, amount_micro: int) -> int:
        check_positive("the credit", amount_micro)
        pool = await self._connect()
        balance = await pool.fetchval("UPDATE keys SET balance = balance + $1 WHERE key_id = $2 RETURNING balance",
                                      amount_micro, key_id)
        if balance is None:
            raise UnknownKey(key_id)
        return balance

    async def authenticate(self, key: str) -> KeyRecord | None:
        parsed = parse_api_key(key)
        if parsed is None:
            return None
        key_id, digest = parsed
        pool = await self._connect()
        row = await pool.fetchrow(f"SELECT digest, {_KEY_COLUMNS} FROM keys WHERE key_id = $1", key_id)
        if row is None or not compare_digest(bytes(row["digest"]), digest):
            return None
        return _record(row)

    # credits
    async def reserve(self, key_id: str, request_id: str, amount_micro: int, ttl_s: float) -> int:
        if amount_micro < 0:
            raise ValueError(f"a reservation must be >= 0, not {amount_micro}")
        pool = await self._connect()
        try:
            balance = await pool.fetchval(_RESERVE, amount_micro, key_id, request_id, self._clock() + ttl_s)
        except asyncpg.UniqueViolationError:
            raise LedgerError(f"request id {request_id!r} already has a reservation") from None
        if balance is None:  # refused: say why (off the hot path)
            row = await pool.fetchrow("SELECT balance, revoked FROM keys WHERE key_id = $1", key_id)
            if row is None:
                raise UnknownKey(key_id)
            if row["revoked"]:
                raise KeyRevoked(key_id)
            raise InsufficientCredits(key_id, row["balance"], amount_micro)
        return balance

    async def settle(self, request_id: str, prompt_tokens: int, completion_tokens: int, cost_micro: int) -> int:
        if cost_micro < 0 or prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError("cost and token counts must be >= 0")
        pool = await self._connect()
        balance = await pool.fetchval(_SETTLE, request_id, prompt_tokens, completion_tokens, cost_micro, self._clock())
        if balance is not None:
            return balance
        balance = await pool.fetchval("SELECT k.balance FROM reservations r JOIN keys k USING (key_id) "
                                      "WHERE r.request_id = $1", request_id)  # settled before: nothing changes
        if balance is None:
            raise LedgerError(f"no reservation for request id {request_id!r}")
        return balance

    async def renew(self, request_ids: list[str], ttl_s: float, now: float | None = None) -> int:
        if not request_ids:
            return 0
        expires = (self._clock() if now is None else now) + ttl_s
        pool = await self._connect()
        status = await pool.execute("UPDATE reservations SET expires_at = $1 WHERE request_id = ANY($2::text[]) "
                                    "AND state = $3", expires, request_ids, RESERVATION_OPEN)
        return int(status.split()[-1])  # "UPDATE n"

    async def release_expired(self, now: float | None = None) -> int:
        now = self._clock() if now is None else now
        pool = await self._connect()
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch("UPDATE reservations SET state = $1 WHERE request_id IN ("
                                    "SELECT request_id FROM reservations WHERE state = $2 AND expires_at <= $3 "
                                    "FOR UPDATE SKIP LOCKED) AND state = $2 RETURNING key_id, amount",
                                    RESERVATION_RELEASED, RESERVATION_OPEN, now)
            refunds: Counter[str] = Counter()
            for row in rows:
                refunds[row["key_id"]] += row["amount"]
            # keys in one order, so two replicas releasing at once cannot deadlock on them
            await conn.executemany("UPDATE keys SET balance = balance + $1 WHERE key_id = $2",
                                   [(refunds[k], k) for k in sorted(refunds)])
            await conn.execute("DELETE FROM rate_events WHERE at <= $1", now - WINDOW_S)
            return len(rows)

    async def usage(self, key_id: str | None = None, limit: int = 100) -> list[UsageRow]:
        pool = await self._connect()
        rows = await pool.fetch("SELECT request_id, key_id, prompt_tokens, completion_tokens, cost, time FROM usage "
                                "WHERE $1::text IS NULL OR key_id = $1 ORDER BY seq DESC LIMIT $2", key_id, limit)
        return [UsageRow(*r) for r in rows]

    async def open_reservations(self, key_id: str | None = None) -> int:
        pool = await self._connect()
        return await pool.fetchval("SELECT count(*) FROM reservations WHERE state = $1 "
                                   "AND ($2::text IS NULL OR key_id = $2)", RESERVATION_OPEN, key_id)

    # rate limits
    async def take_rate(self, key_id: str, requests: int, tokens: int, rpm: int | None, tpm: int | None,
                        now: float | None = None) -> None:
        take = Take(key_id, requests, tokens, rpm, tpm, self._clock() if now is None else now)
        take.check()
        pool = await self._connect()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(_RATE_LOCK, key_id)
            if await conn.fetchval(_TAKE, key_id, take.now, requests, tokens, rpm, tpm, WINDOW_S):
                return
            rows = await conn.fetch("SELECT at, requests, tokens FROM rate_events WHERE key_id = $1 AND at > $2 "
                                    "ORDER BY at", key_id, take.window_start)
        raise take.refusal((r["at"], r["requests"], r["tokens"]) for r in rows)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
