"""The embedded ledger: one SQLite file in WAL mode, for a single node.

sqlite3 blocks, so every call runs on this ledger's one worker thread (`run_in_executor`): the event loop never
waits on the disk, and the connection is only ever used by the thread that opened it. Writes take the write lock
up front (BEGIN IMMEDIATE) and wait out other processes' locks (busy timeout) rather than failing.

The file holds the balances, so it is created 0600 in a directory this user owns and no one else can write: in a
directory others can write, they could swap the file, or plant the `-wal` file SQLite replays on open.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from hmac import compare_digest
from pathlib import Path
from typing import Any, TypeVar

from cluster.ledger.keys import new_api_key, parse_api_key
from cluster.ledger.rate_window import WINDOW_S, Take
from cluster.ledger.store import (RESERVATION_OPEN, RESERVATION_RELEASED, RESERVATION_SETTLED, InsufficientCredits,
                                  KeyRecord, KeyRevoked, LedgerError, UnknownKey, UsageRow, check_new_key,
                                  check_positive)
from cluster.user_cache import cache_root, private_directory

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, digest BLOB NOT NULL, name TEXT, balance INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, rpm_limit INTEGER, tpm_limit INTEGER);
CREATE TABLE IF NOT EXISTS reservations (
    request_id TEXT PRIMARY KEY, key_id TEXT NOT NULL REFERENCES keys (key_id), amount INTEGER NOT NULL,
    expires_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'open');
CREATE INDEX IF NOT EXISTS reservations_open ON reservations (state, expires_at);
CREATE TABLE IF NOT EXISTS usage (
    seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, key_id TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cost INTEGER NOT NULL, time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS usage_key ON usage (key_id, seq);
CREATE TABLE IF NOT EXISTS rate_events (
    key_id TEXT NOT NULL, at REAL NOT NULL, requests INTEGER NOT NULL, tokens INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS rate_events_key ON rate_events (key_id, at);
"""

_KEY_COLUMNS = "key_id, name, balance, revoked, created, rpm_limit, tpm_limit"


def sqlite_path(url: str) -> Path:
    """`sqlite:///abs/path.db`, `sqlite:relative.db` or a plain path -> an absolute path."""
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
    elif url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
    elif "://" in url:
        raise ValueError(f"unknown database URL {url!r} (sqlite:///path.db, a path, or postgresql://...)")
    else:
        path = url
    if not path:
        raise ValueError(f"no file in the database URL {url!r}")
    return Path(path).expanduser().absolute()


def default_path() -> Path:
    """The SQLite file used when no --db is given: ledger.db under the user's cache directory."""
    return cache_root() / "ledger.db"


def prepare_file(path: Path) -> None:
    """Create `path` 0600 unless it exists, after checking its directory: this user's, writable by no one else."""
    directory = path.parent
    root = cache_root()
    if directory == root or root in directory.parents:
        private_directory(directory)
    else:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _refuse_unsafe(directory, stat.S_ISDIR, "directory")
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        _refuse_unsafe(path, stat.S_ISREG, "file")
        if os.lstat(path).st_mode & 0o077:  # balances and key digests: readable by this user alone
            os.chmod(path, 0o600)


def _refuse_unsafe(path: Path, is_kind: Callable[[int], bool], kind: str) -> None:
    st = os.lstat(path)
    problem = None
    if not is_kind(st.st_mode):
        problem = f"not a regular {kind}"
    elif st.st_uid != os.getuid():
        problem = f"owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    if problem:
        raise PermissionError(f"refusing the ledger {kind} {path}: {problem}; it must be this user's and writable by "
                              f"no one else")


def _record(row: tuple) -> KeyRecord:
    key_id, name, balance, revoked, created, rpm, tpm = row
    return KeyRecord(key_id, name, balance, bool(revoked), created, rpm, tpm)


class SqliteLedger:
    """The `Ledger` contract on one SQLite file (see `cluster.ledger.store`)."""

    def __init__(self, path: Path, busy_timeout_s: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock  # unix time: reservation expiries, usage times, rate windows
        self._closed = False
        prepare_file(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._db: sqlite3.Connection = self._executor.submit(self._connect, busy_timeout_s).result()

    def _connect(self, busy_timeout_s: float) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit is in the WAL file when it returns, so a killed server loses no settled charge;
        # only a power loss may drop the last commits (never corrupting the file). FULL would fsync every commit, and
        # every request's reserve and settle would queue behind the disk (benchmarks/RESULTS.md, ledger overhead).
        db.execute("PRAGMA synchronous=NORMAL")
        self._db = db
        with self._write():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        return db

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args))

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the write lock from its start."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._db.execute(sql, args).fetchall()  # fetchall: RETURNING statements finish before COMMIT

    def _balance(self, key_id: str) -> int:
        rows = self._rows("SELECT balance FROM keys WHERE key_id = ?", (key_id,))
        if not rows:
            raise UnknownKey(key_id)
        return rows[0][0]

    # keys
    async def create_key(self, name: str | None, credits_micro: int, rpm: int | None = None,
                         tpm: int | None = None) -> tuple[KeyRecord, str]:
        check_new_key(credits_micro, rpm, tpm)
        key_id, key, digest = new_api_key()
        record = KeyRecord(key_id, name, credits_micro, False, self._clock(), rpm, tpm)

        def insert() -> None:
            with self._write() as db:
                db.execute(f"INSERT INTO keys (digest, {_KEY_COLUMNS}) VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
                           (digest, key_id, name, credits_micro, record.created, rpm, tpm))

        await self._call(insert)
        return record, key

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._call(self._rows, f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY created, key_id")
        return [_record(r) for r in rows]

    async def revoke(self, key_id: str) -> None:
        def revoke() -> None:
            with self._write():
                if not self._rows("UPDATE keys SET revoked = 1 WHERE key_id = ? RETURNING key_id", (key_id,)):
                    raise UnknownKey(key_id)

        await self._call(revoke)

    async def credit(self, key_id: str, amount_micro: int) -> int:
        check_positive("the credit", amount_micro)

        def credit() -> int:
            with self._write():
                rows = self._rows("UPDATE keys SET balance = balance + ? WHERE key_id = ? RETURNING balance",
                                  (amount_micro, key_id))
                if not rows:
                    raise UnknownKey(key_id)
                return rows[0][0]

        return await self._call(credit)

    async def authenticate(self, key: str) -> KeyRecord | None:
        parsed = parse_api_key(key)
        if parsed is None:
            return None
        key_id, digest = parsed
        rows = await self._call(self._rows, f"SELECT digest, {_KEY_COLUMNS} FROM keys WHERE key_id = ?", (key_id,))
        if not rows or not compare_digest(bytes(rows[0][0]), digest):
            return None
        return _record(rows[0][1:])

    # credits
    async def reserve(self, key_id: str, request_id: str, amount_micro: int, ttl_s: float) -> int:
        if amount_micro < 0:
            raise ValueError(f"a reservation must be >= 0, not {amount_micro}")

        def reserve() -> int:
            with self._write():
                rows = self._rows("UPDATE keys SET balance = balance - ? "
                                  "WHERE key_id = ? AND balance >= ? AND NOT revoked RETURNING balance",
                                  (amount_micro, key_id, amount_micro))
                if not rows:
                    self._refusal(key_id, amount_micro)
                try:
                    self._db.execute("INSERT INTO reservations (request_id, key_id, amount, expires_at) "
                                     "VALUES (?, ?, ?, ?)", (request_id, key_id, amount_micro, self._clock() + ttl_s))
                except sqlite3.IntegrityError:
                    raise LedgerError(f"request id {request_id!r} already has a reservation") from None
                return rows[0][0]

        return await self._call(reserve)

    def _refusal(self, key_id: str, amount_micro: int) -> None:
        rows = self._rows("SELECT balance, revoked FROM keys WHERE key_id = ?", (key_id,))
        if not rows:
            raise UnknownKey(key_id)
        if rows[0][1]:
            raise KeyRevoked(key_id)
        raise InsufficientCredits(key_id, rows[0][0], amount_micro)

    async def settle(self, request_id: str, prompt_tokens: int, completion_tokens: int, cost_micro: int) -> int:
        if cost_micro < 0 or prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError("cost and token counts must be >= 0")

        def settle() -> int:
            with self._write():
                rows = self._rows("SELECT key_id, amount, state FROM reservations WHERE request_id = ?",
                                  (request_id,))
                if not rows:
                    raise LedgerError(f"no reservation for request id {request_id!r}")
                key_id, amount, state = rows[0]
                if state == RESERVATION_SETTLED:
                    return self._balance(key_id)
                cost = min(cost_micro, amount)
                refund = amount - cost if state == RESERVATION_OPEN else -cost
                balance = self._rows("UPDATE keys SET balance = balance + ? WHERE key_id = ? RETURNING balance",
                                     (refund, key_id))[0][0]
                self._db.execute("UPDATE reservations SET state = ? WHERE request_id = ?",
                                 (RESERVATION_SETTLED, request_id))
                self._db.execute("INSERT INTO usage (request_id, key_id, prompt_tokens, completion_tokens, cost, "
                                 "time) VALUES (?, ?, ?, ?, ?, ?)",
                                 (request_id, key_id, prompt_tokens, completion_tokens, cost, self._clock()))
                return balance

        return await self._call(settle)

    async def renew(self, request_ids: list[str], ttl_s: float, now: float | None = None) -> int:
        expires = (self._clock() if now is None else now) + ttl_s

        def renew() -> int:
            with self._write() as db:
                before = db.total_changes
                db.executemany("UPDATE reservations SET expires_at = ? WHERE request_id = ? AND state = ?",
                               [(expires, r, RESERVATION_OPEN) for r in request_ids])
                return db.total_changes - before

        return await self._call(renew) if request_ids else 0

    async def release_expired(self, now: float | None = None) -> int:
        now = self._clock() if now is None else now

        def release() -> int:
            with self._write() as db:
                rows = self._rows("UPDATE reservations SET state = ? WHERE state = ? AND expires_at <= ? "
                                  "RETURNING key_id, amount", (RESERVATION_RELEASED, RESERVATION_OPEN, now))
                refunds: Counter[str] = Counter()
                for key_id, amount in rows:
                    refunds[key_id] += amount
                db.executemany("UPDATE keys SET balance = balance + ? WHERE key_id = ?",
                               [(amount, key_id) for key_id, amount in refunds.items()])
                db.execute("DELETE FROM rate_events WHERE at <= ?", (now - WINDOW_S,))
                return len(rows)

        return await self._call(release)

    async def usage(self, key_id: str | None = None, limit: int = 100) -> list[UsageRow]:
        sql = "SELECT request_id, key_id, prompt_tokens, completion_tokens, cost, time FROM usage"
        args: tuple = (limit,)
        if key_id is not None:
            sql, args = sql + " WHERE key_id = ?", (key_id, limit)
        rows = await self._call(self._rows, sql + " ORDER BY seq DESC LIMIT ?", args)
        return [UsageRow(*r) for r in rows]

    async def open_reservations(self, key_id: str | None = None) -> int:
        sql = "SELECT count(*) FROM reservations WHERE state = ?"
        args: tuple = (RESERVATION_OPEN,)
        if key_id is not None:
            sql, args = sql + " AND key_id = ?", (RESERVATION_OPEN, key_id)
        return (await self._call(self._rows, sql, args))[0][0]

    # rate limits
    async def take_rate(self, key_id: str, requests: int, tokens: int, rpm: int | None, tpm: int | None,
                        now: float | None = None) -> None:
        take = Take(key_id, requests, tokens, rpm, tpm, self._clock() if now is None else now)
        take.check()

        def take_within_window() -> None:
            with self._write():  # the write lock serializes every take: the check and the insert are one
                self._db.execute("DELETE FROM rate_events WHERE key_id = ? AND at <= ?", (key_id, take.window_start))
                used_requests, used_tokens = self._rows(
                    "SELECT coalesce(sum(requests), 0), coalesce(sum(tokens), 0) FROM rate_events WHERE key_id = ?",
                    (key_id,))[0]
                if take.fits(used_requests, used_tokens):
                    self._db.execute("INSERT INTO rate_events (key_id, at, requests, tokens) VALUES (?, ?, ?, ?)",
                                     (key_id, take.now, requests, tokens))
                    return
                raise take.refusal(self._rows("SELECT at, requests, tokens FROM rate_events WHERE key_id = ? "
                                              "ORDER BY at, rowid", (key_id,)))

        await self._call(take_within_window)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._call(self._db.close)
            self._executor.shutdown()
