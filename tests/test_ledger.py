"""The ledger on both stores (SQLite in a temporary file, PostgreSQL on a throwaway server): keys, credits,
reservations, the usage log, rate limits. Each test has a database of its own."""

import asyncio
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.ledger import (API_KEY_PREFIX, InsufficientCredits, KeyRevoked, LedgerError, Pricing, RateLimited,
                            UnknownKey, format_dollars, new_api_key, open_ledger, parse_api_key, parse_dollars)
from cluster.ledger.sqlite_store import sqlite_path
from tests.postgres import fresh_database


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return fresh_database(request.getfixturevalue("postgres_url"))


def run(url: str, body):
    """Runs `await body(ledger)` in a fresh event loop, on a freshly opened ledger; its result."""
    async def main():
        ledger = open_ledger(url)
        try:
            return await body(ledger)
        finally:
            await ledger.close()

    return asyncio.run(main())


def stored_key_bytes(url: str) -> bytes:
    """Everything the store holds about keys, as bytes (to look for a secret in it)."""
    if not url.startswith("postgresql://"):
        return b"".join(Path(url + suffix).read_bytes() for suffix in ("", "-wal") if Path(url + suffix).exists())

    async def dump() -> bytes:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            return repr([tuple(r) for r in await conn.fetch("SELECT * FROM keys")]).encode()
        finally:
            await conn.close()

    return asyncio.run(dump())


# keys and money, without a store

def test_api_key_shape_and_parse():
    key_id, key, digest = new_api_key()
    assert key.startswith(f"{API_KEY_PREFIX}{key_id}_") and len(key_id) == 12 and int(key_id, 16) >= 0
    assert parse_api_key(key) == (key_id, digest)
    assert parse_api_key(f"  {key}\n") == (key_id, digest)
    other = new_api_key()
    assert other[0] != key_id and other[2] != digest
    secret = key.rsplit("_", 1)[1]
    for bad in ["", "mck_", key[:-1], key + "x", key.replace("mck_", "sk-"), key.upper(), f"mck_{key_id}{secret}",
                f"mck_{key_id[:-1]}_{secret}", key[:-1] + "-", None, 12]:
        assert parse_api_key(bad) is None, bad
    assert parse_api_key(key[:-1] + ("a" if key[-1] != "a" else "b"))[1] != digest  # same shape, other secret


def test_pricing_is_integer_and_rounds_up():
    p = Pricing()
    assert (p.input_micro_per_million, p.output_micro_per_million) == (2_000_000, 6_000_000)  # $2 / $6 per M
    assert p.cost(1, 0) == 2 and p.cost(0, 1) == 6 and p.cost(0, 0) == 0
    assert p.cost(1_000_000, 1_000_000) == 8_000_000
    assert p.cost(123, 45) == 123 * 2 + 45 * 6
    cheap = Pricing(input_micro_per_million=1, output_micro_per_million=3)
    assert cheap.cost(1, 0) == 1  # a millionth of a micro-dollar is still charged a whole one
    assert cheap.cost(1_000_000, 0) == 1 and cheap.cost(1_000_001, 0) == 2
    assert cheap.cost(333_333, 1) == 1  # 333_336 / 1e6, rounded up
    assert isinstance(p.cost(7, 7), int)
    with pytest.raises(ValueError):
        Pricing(input_micro_per_million=2.5)
    with pytest.raises(ValueError):
        p.cost(-1, 0)


def test_dollars_parse_and_format():
    assert parse_dollars("12.5") == 12_500_000 and parse_dollars("0.000001") == 1 and parse_dollars("3") == 3_000_000
    assert parse_dollars(" 1e2 ") == 100_000_000 and parse_dollars("0.1") + parse_dollars("0.2") == 300_000
    for bad in ["", "abc", "nan", "inf", "1.0000001", "1,5"]:
        with pytest.raises(ValueError):
            parse_dollars(bad)
    assert format_dollars(12_500_000) == "12.500000" and format_dollars(1) == "0.000001"
    assert format_dollars(0) == "0.000000" and format_dollars(-1) == "-0.000001"
    rng = random.Random(5)
    for micro in (rng.randrange(-10**12, 10**12) for _ in range(100)):
        assert parse_dollars(format_dollars(micro)) == micro, micro


def test_sqlite_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:///abs/x.db") == Path("/abs/x.db")
    assert sqlite_path("sqlite:rel.db") == tmp_path / "rel.db"
    assert sqlite_path("plain.db") == tmp_path / "plain.db"
    for bad in ["mysql://h/db", "sqlite:", ""]:
        with pytest.raises(ValueError):
            sqlite_path(bad)


# both stores

def test_create_and_authenticate(url):
    async def body(ledger):
        record, key = await ledger.create_key("alice", 5_000_000, rpm=60, tpm=None)
        assert (record.name, record.balance_micro, record.revoked, record.rpm_limit, record.tpm_limit) == \
            ("alice", 5_000_000, False, 60, None)
        assert await ledger.authenticate(key) == record
        assert await ledger.list_keys() == [record]
        key_id, secret = record.key_id, key.rsplit("_", 1)[1]
        wrong = key[:-1] + ("a" if key[-1] != "a" else "b")
        assert await ledger.authenticate(wrong) is None
        _, other = new_api_key()[:2]
        assert await ledger.authenticate(other) is None  # well formed, unknown id
        assert await ledger.authenticate(f"mck_{key_id}_{other.rsplit('_', 1)[1]}") is None  # known id, other secret
        for malformed in ["", "Bearer " + key, key_id, secret, key + "=", "mck_" + key_id]:
            assert await ledger.authenticate(malformed) is None, malformed
        await ledger.revoke(key_id)
        revoked = await ledger.authenticate(key)
        assert revoked is not None and revoked.revoked and revoked.key_id == key_id
        with pytest.raises(UnknownKey):
            await ledger.revoke("000000000000")
        second, _ = await ledger.create_key(None, 0)
        assert [k.key_id for k in await ledger.list_keys()] == [key_id, second.key_id] and second.name is None
        with pytest.raises(ValueError):
            await ledger.create_key("x", -1)
        with pytest.raises(ValueError):
            await ledger.create_key("x", 0, rpm=0)
        return secret

    secret = run(url, body)
    assert secret.encode() not in stored_key_bytes(url)  # only its digest is stored


def test_credit(url):
    async def body(ledger):
        record, _ = await ledger.create_key("bob", 1)
        assert await ledger.credit(record.key_id, 2_500_000) == 2_500_001
        assert (await ledger.list_keys())[0].balance_micro == 2_500_001
        with pytest.raises(UnknownKey):
            await ledger.credit("0123456789ab", 1)
        for bad in (0, -5):
            with pytest.raises(ValueError):
                await ledger.credit(record.key_id, bad)

    run(url, body)


def test_reserve_settle_refund(url):
    async def body(ledger):
        record, key = await ledger.create_key("c", 1000)
        k = record.key_id
        assert await ledger.reserve(k, "r1", 300, ttl_s=60) == 700
        assert await ledger.open_reservations() == 1 and await ledger.open_reservations(k) == 1
        assert await ledger.settle("r1", 10, 20, 120) == 880  # 300 reserved, 120 spent: 180 back
        assert await ledger.open_reservations() == 0
        assert await ledger.settle("r1", 99, 99, 300) == 880  # idempotent: nothing changes
        rows = await ledger.usage(k)
        assert [(u.request_id, u.key_id, u.prompt_tokens, u.completion_tokens, u.cost_micro) for u in rows] == \
            [("r1", k, 10, 20, 120)]
        assert abs(rows[0].time - time.time()) < 60

        assert await ledger.reserve(k, "r2", 100, ttl_s=60) == 780
        assert await ledger.settle("r2", 1, 1, 10_000) == 780  # the cost is capped at the reservation
        with pytest.raises(InsufficientCredits) as e:
            await ledger.reserve(k, "r3", 781, ttl_s=60)
        assert (e.value.key_id, e.value.balance_micro, e.value.needed_micro) == (k, 780, 781)
        with pytest.raises(LedgerError, match="already"):
            await ledger.reserve(k, "r1", 5, ttl_s=60)  # a used request id: refused, nothing taken
        with pytest.raises(UnknownKey):
            await ledger.reserve("0123456789ab", "r4", 1, ttl_s=60)
        with pytest.raises(LedgerError, match="no reservation"):
            await ledger.settle("never", 1, 1, 1)
        assert (await ledger.authenticate(key)).balance_micro == 780
        assert await ledger.reserve(k, "r5", 0, ttl_s=60) == 780  # a free request still gets its row
        await ledger.revoke(k)
        with pytest.raises(KeyRevoked):
            await ledger.reserve(k, "r6", 1, ttl_s=60)
        assert await ledger.settle("r5", 0, 0, 0) == 780  # a revoked key's open request still settles
        assert await ledger.open_reservations() == 0
        assert sum(u.cost_micro for u in await ledger.usage()) == 1000 - 780

    run(url, body)


def test_renewed_reservations_outlive_their_first_expiry(url):
    """A live server renews its open reservations, so only a dead server's expire; settled ones are not renewed."""
    async def body(ledger):
        a, _ = await ledger.create_key("a", 1000)
        now = time.time()
        await ledger.reserve(a.key_id, "long", 100, ttl_s=1)
        await ledger.reserve(a.key_id, "done", 100, ttl_s=1)
        await ledger.settle("done", 1, 1, 10)
        assert await ledger.renew(["long", "done", "unknown"], ttl_s=100, now=now) == 1
        assert await ledger.renew([], ttl_s=100) == 0
        assert await ledger.release_expired(now=now + 50) == 0  # past the first expiry, within the renewed one
        assert await ledger.release_expired(now=now + 150) == 1
        assert (await ledger.list_keys())[0].balance_micro == 990

    run(url, body)


def test_expired_reservations_are_released(url):
    async def body(ledger):
        a, _ = await ledger.create_key("a", 1000)
        b, _ = await ledger.create_key("b", 1000)
        await ledger.reserve(a.key_id, "dead-1", 100, ttl_s=1)
        await ledger.reserve(a.key_id, "dead-2", 50, ttl_s=1)
        await ledger.reserve(b.key_id, "dead-3", 70, ttl_s=1)
        assert await ledger.reserve(a.key_id, "live", 200, ttl_s=3600) == 650
        assert await ledger.release_expired(now=time.time() - 10) == 0  # not yet expired
        assert await ledger.release_expired(now=time.time() + 5) == 3
        assert await ledger.release_expired(now=time.time() + 5) == 0
        balances = {k.key_id: k.balance_micro for k in await ledger.list_keys()}
        assert balances == {a.key_id: 800, b.key_id: 1000}
        assert await ledger.open_reservations() == 1 and await ledger.open_reservations(b.key_id) == 0
        assert await ledger.settle("live", 5, 5, 40) == 960
        # a request that outlived its reservation still pays for what it generated
        assert await ledger.settle("dead-1", 3, 3, 30) == 930
        assert await ledger.settle("dead-1", 3, 3, 30) == 930
        assert sorted(u.cost_micro for u in await ledger.usage(a.key_id)) == [30, 40]

    run(url, body)


def test_usage_log_sums_to_credits_spent(url):
    rng = random.Random(18)
    pricing = Pricing()

    async def body(ledger):
        keys = [(await ledger.create_key(f"k{i}", 10_000_000))[0].key_id for i in range(3)]
        expected = []
        for i in range(40):
            key_id = keys[rng.randrange(3)]
            prompt, max_tokens = rng.randrange(1, 500), rng.randrange(1, 300)
            await ledger.reserve(key_id, f"req-{i}", pricing.cost(prompt, max_tokens), ttl_s=60)
            completion = rng.randrange(0, max_tokens + 1)
            await ledger.settle(f"req-{i}", prompt, completion, pricing.cost(prompt, completion))
            expected.append((f"req-{i}", key_id, pricing.cost(prompt, completion)))
        log = await ledger.usage(limit=1000)
        assert [(u.request_id, u.key_id, u.cost_micro) for u in log] == expected[::-1]  # newest first
        spent = {k.key_id: 10_000_000 - k.balance_micro for k in await ledger.list_keys()}
        for key_id in keys:
            assert sum(u.cost_micro for u in await ledger.usage(key_id, limit=1000)) == spent[key_id], key_id
        assert len(await ledger.usage(limit=5)) == 5
        assert await ledger.open_reservations() == 0

    run(url, body)


def test_fifty_concurrent_reserves_on_a_balance_for_ten(url):
    async def body(ledger):
        record, _ = await ledger.create_key("race", 10 * 1234)

        async def one(i: int) -> int | None:
            try:
                return await ledger.reserve(record.key_id, f"req-{i}", 1234, ttl_s=60)
            except InsufficientCredits as e:
                assert e.balance_micro >= 0
                return None

        after = await asyncio.gather(*(one(i) for i in range(50)))
        won = [i for i, b in enumerate(after) if b is not None]
        assert len(won) == 10, after
        assert sorted(b for b in after if b is not None) == [1234 * n for n in range(10)]  # never below zero
        assert (await ledger.list_keys())[0].balance_micro == 0
        costs = {i: 100 * (i % 7) for i in won}
        await asyncio.gather(*(ledger.settle(f"req-{i}", 1, 1, costs[i]) for i in won))
        balance = (await ledger.list_keys())[0].balance_micro
        assert sum(u.cost_micro for u in await ledger.usage()) == 10 * 1234 - balance == sum(costs.values())
        assert await ledger.open_reservations() == 0

    run(url, body)


def test_settle_and_release_racing_refund_once(url):
    """Settles and releases of the same expired reservations, all at once: each is refunded once and charged its
    cost once, whichever comes first (a settle after a release charges in full)."""
    rng = random.Random(7)

    async def body(ledger):
        k = (await ledger.create_key("x", 100_000))[0].key_id
        costs = {f"req-{i}": rng.randrange(0, 1000) for i in range(30)}
        for request_id in costs:
            await ledger.reserve(k, request_id, 1000, ttl_s=0)
        calls = [ledger.settle(r, 1, 1, c) for r, c in costs.items()]
        for at in (5, 12, 19, 26):  # some settles before the first release, some after
            calls.insert(at, ledger.release_expired(now=time.time() + 1))
        done = await asyncio.gather(*calls)
        assert sum(done[at] for at in (5, 12, 19, 26)) <= 30  # each reservation released at most once
        balance = (await ledger.list_keys())[0].balance_micro
        assert balance == 100_000 - sum(costs.values())
        assert sorted((u.request_id, u.cost_micro) for u in await ledger.usage(k)) == sorted(costs.items())
        assert await ledger.open_reservations() == 0

    run(url, body)


_RACER = """
import asyncio, sys
from cluster.ledger import InsufficientCredits, open_ledger

async def main(url, key_id, tag):
    ledger = open_ledger(url)
    await ledger.list_keys()  # connected before the start
    print("ready", flush=True)
    sys.stdin.readline()

    async def one(i):
        try:
            return await ledger.reserve(key_id, f"{tag}-{i}", 100, 60)
        except InsufficientCredits:
            return None

    after = await asyncio.gather(*(one(i) for i in range(25)))
    await ledger.close()
    print(" ".join("-" if b is None else str(b) for b in after), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


def test_two_processes_share_the_ledger(url):
    """Two OS processes (two replicas) race 25 reserves each on one key covering 10."""
    key_id = run(url, lambda ledger: ledger.create_key("shared", 1000))[0].key_id
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, url, key_id, tag], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for tag in ("p1", "p2")]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outputs
    after = [int(b) for out in outputs for b in out if b != "-"]
    assert len(after) == 10 and sorted(after) == list(range(0, 1000, 100)), outputs

    async def check(ledger):
        assert (await ledger.list_keys())[0].balance_micro == 0
        assert await ledger.open_reservations(key_id) == 10

    run(url, check)


# Rate limits: the store's clock is stepped by hand (`now=`), so windows and boundaries are exact, with no sleeping.
MINUTE = 1_800_000_000.0  # a calendar minute's first second (a multiple of 60)


def test_rate_limits_hold_over_any_60_s_not_the_calendar_minute(url):
    """Issue 24's report: with rpm 5, 8 requests passed in 3.7 s across a minute boundary. Five at :58 fill the
    window; the three just after :00 are refused, each told to retry when the oldest of the five leaves (at :58 +
    60 s), and then exactly one more fits."""
    async def body(ledger):
        k = (await ledger.create_key("r", 0))[0].key_id
        for i in range(5):
            await ledger.take_rate(k, 1, 10, rpm=5, tpm=None, now=MINUTE - 2 + 0.2 * i)  # :58.0 ... :58.8
        retries = []
        for t in (MINUTE, MINUTE + 0.7, MINUTE + 1.7):  # the next calendar minute
            with pytest.raises(RateLimited) as e:
                await ledger.take_rate(k, 1, 10, rpm=5, tpm=None, now=t)
            assert (e.value.what, e.value.key_id) == ("requests per minute", k)
            retries.append(e.value.retry_after_s)
        assert retries == [58, 58, 57]  # ceil(:58.0 + 60 - t)
        with pytest.raises(RateLimited) as e:
            await ledger.take_rate(k, 1, 10, rpm=5, tpm=None, now=MINUTE + 57.99)
        assert e.value.retry_after_s == 1  # never 0
        await ledger.take_rate(k, 1, 10, rpm=5, tpm=None, now=MINUTE + 58)  # :58.0 has left: one place
        with pytest.raises(RateLimited):
            await ledger.take_rate(k, 1, 10, rpm=5, tpm=None, now=MINUTE + 58.1)
        await ledger.take_rate(k, 1, 10, rpm=None, tpm=None, now=MINUTE)  # no limits: always taken

        other = (await ledger.create_key("t", 0))[0].key_id
        await ledger.take_rate(other, 1, 60, rpm=None, tpm=100, now=MINUTE + 10)
        await ledger.take_rate(other, 1, 30, rpm=None, tpm=100, now=MINUTE + 20)
        with pytest.raises(RateLimited) as e:
            await ledger.take_rate(other, 1, 50, rpm=None, tpm=100, now=MINUTE + 30)
        assert (e.value.retry_after_s, e.value.what) == (40, "tokens per minute")  # the 60 leave at +70
        await ledger.take_rate(other, 1, 10, rpm=None, tpm=100, now=MINUTE + 30)  # the refused take counted nothing
        with pytest.raises(RateLimited) as e:
            await ledger.take_rate(other, 1, 90, rpm=None, tpm=100, now=MINUTE + 31)
        assert e.value.retry_after_s == 49  # the 60 and the 30 must both leave: at +80
        with pytest.raises(RateLimited):
            await ledger.take_rate(other, 1, 101, rpm=None, tpm=100, now=MINUTE + 600)  # never fits
        await ledger.take_rate(other, 1, 100, rpm=None, tpm=100, now=MINUTE + 600)

        third = (await ledger.create_key("c", 0))[0].key_id

        async def one() -> bool:
            try:
                await ledger.take_rate(third, 1, 1, rpm=5, tpm=None, now=MINUTE + 10)
                return True
            except RateLimited:
                return False

        assert sum(await asyncio.gather(*(one() for _ in range(20)))) == 5  # concurrent takes: exactly the limit
        assert await ledger.release_expired(now=MINUTE + 600) == 0  # drops the rows that left the window
        await ledger.take_rate(third, 1, 1, rpm=5, tpm=None, now=MINUTE + 600)

    run(url, body)


def test_no_60_s_window_ever_admits_more_than_the_limits(url):
    """Seeded attempts of random sizes at random times over five calendar minutes, against rpm and tpm together:
    the store admits exactly what a reference sliding window admits, so every 60 s window (wherever it starts) holds
    at most the limits; and each refusal's retry is the first moment the take would fit if nothing else came."""
    rpm, tpm = 7, 400
    rng = random.Random(24)
    times = sorted(MINUTE - 90 + rng.uniform(0, 300) for _ in range(120))
    attempts = [(t, rng.randint(1, 120)) for t in times]

    def fits(admitted: list[tuple[float, int]], now: float, tokens: int) -> bool:
        window = [n for at, n in admitted if at > now - 60]
        return len(window) + 1 <= rpm and sum(window) + tokens <= tpm

    async def body(ledger):
        k = (await ledger.create_key("w", 0))[0].key_id
        admitted: list[tuple[float, int]] = []
        refusals = 0
        for now, tokens in attempts:
            expected = fits(admitted, now, tokens)
            try:
                await ledger.take_rate(k, 1, tokens, rpm=rpm, tpm=tpm, now=now)
                assert expected, f"admitted at {now - MINUTE:+.2f} s"
                admitted.append((now, tokens))
            except RateLimited as e:
                assert not expected, f"refused at {now - MINUTE:+.2f} s"
                refusals += 1
                retry = now + e.retry_after_s
                assert fits(admitted, retry, tokens) and not fits(admitted, retry - 1, tokens), (now, e.retry_after_s)
        assert refusals > 20 and len(admitted) > 20  # both sides were exercised
        for start, _ in admitted:  # every window starting at an admitted take (the fullest ones) is within limits
            window = [n for at, n in admitted if start <= at < start + 60]
            assert len(window) <= rpm and sum(window) <= tpm, (start, window)
        assert len({int(at // 60) for at, _ in admitted}) >= 4  # across calendar minutes

    run(url, body)


# SQLite files

def test_sqlite_file_is_private(tmp_path):
    path = tmp_path / "sub" / "ledger.db"

    async def body(ledger):
        await ledger.create_key("x", 1)
        for suffix in ("", "-wal", "-shm"):
            assert stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode) == 0o600, suffix

    run(f"sqlite://{path}", body)
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        open_ledger(str(shared / "ledger.db"))
    assert not (shared / "ledger.db").exists()
    (tmp_path / "link.db").symlink_to(path)
    with pytest.raises(PermissionError, match="not a regular file"):
        open_ledger(str(tmp_path / "link.db"))
    path.chmod(0o644)  # an existing ledger others can read is made private again
    run(f"sqlite://{path}", lambda ledger: ledger.list_keys())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_sqlite_default_under_the_cache(tmp_path, monkeypatch):
    from cluster.ledger.sqlite_store import default_path

    monkeypatch.setenv("MOE_CLUSTER_CACHE", str(tmp_path / "cache"))
    path = default_path()
    assert path == tmp_path / "cache" / "ledger.db"
    run(str(path), lambda ledger: ledger.create_key("y", 1))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_postgres_password_from_the_url_or_the_environment(monkeypatch):
    """A k8s Secret provides the password through an environment variable; a password in the URL wins."""
    import cluster.ledger.postgres_store as pg

    seen = []

    async def create_pool(url, **kwargs):
        seen.append((url, kwargs["password"]))
        raise ConnectionRefusedError("no server here")

    monkeypatch.setattr(pg.asyncpg, "create_pool", create_pool)
    monkeypatch.setenv("MOE_CLUSTER_DB_PASSWORD", "from-env")
    monkeypatch.setenv("OTHER_PASSWORD", "other")
    for url, env in [("postgresql://u@db:5432/ledger", None), ("postgres://u:in-url@db/ledger", None),
                     ("postgresql://u@db/ledger", "OTHER_PASSWORD"), ("postgresql://u@db/ledger", "UNSET_VAR")]:
        ledger = open_ledger(url) if env is None else open_ledger(url, password_env=env)
        with pytest.raises(ConnectionRefusedError):
            asyncio.run(ledger.list_keys())
    assert [p for _, p in seen] == ["from-env", None, "other", None]
