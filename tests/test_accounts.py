"""Keys, credits and rate limits in the HTTP API (issue 18, phase 2), on a real engine (tiny checkpoint) and on both
ledger stores: SQLite in tmp_path and a real PostgreSQL server.

Exactly the covered requests run when 50 race for credits enough for 10; aborted streams settle to what was
generated and leave no reservation open; every /v1 route wants a usable key (also through the openai SDK);
`x-remaining-credits` is right; two servers sharing one PostgreSQL split the credits exactly; a reservation left by
a dead server is released on the next start; each key gets its own prefix cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

import httpx
import openai
import pytest
import torch

from cluster.api.accounts import Accounts
from cluster.api.server import build_api
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import EngineConfig, LLMEngine
from cluster.engine.paged_cache import kv_bytes_per_block
from cluster.engine.sampling_params import SamplingDefaults
from cluster.ledger import Ledger, Pricing, format_dollars, open_ledger
from cluster.model.loader import load_model
from cluster.serve.engine_backend import EngineBackend
from cluster.tokenizer import load_tokenizer, resolve_tokenizer_version
from tests.test_api_fuzz import uvicorn_server

pytestmark = pytest.mark.e2e  # the HTTP stack on a real engine and real databases

MODEL = "mixtral-tiny"
PRICING = Pricing(1_000_000, 3_000_000)  # $1 in, $3 out per million: 1 and 3 micro-dollars a token
PROMPT = [1, 100, 200, 300]  # token ids: the prompt's length is known exactly
MAX_TOKENS = 4
WORST = PRICING.cost(len(PROMPT), MAX_TOKENS)  # every request below generates all of them (ignore_eos)
BODY = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": MAX_TOKENS,
        "ignore_eos": True, "temperature": 0}


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tiny_dir) -> Iterator[tuple[AsyncEngine, Any]]:
    """One engine for the module, shared by every app (and every event loop) built here."""
    loaded = load_model(tiny_dir, "fp32")
    tok = load_tokenizer(resolve_tokenizer_version(loaded.config))

    def factory() -> LLMEngine:
        blocks = 1024 * kv_bytes_per_block(loaded.config, 16, torch.float32)
        return LLMEngine(loaded.model, tok.decode, tok.eos_id, EngineConfig(kv_cache_bytes=blocks, max_num_seqs=64))

    front = AsyncEngine(factory)
    yield front, (tok, loaded.config)
    front.shutdown()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    from tests.postgres import fresh_database

    return fresh_database(request.getfixturevalue("postgres_url"))


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/ledger.db"


def make_app(served, url: str | None, **kw: Any) -> tuple[Any, Accounts]:
    front, (tok, config) = served
    accounts = Accounts.open(url, PRICING, **kw)
    app = build_api(EngineBackend(front), tok, MODEL, config.max_position_embeddings,
                    SamplingDefaults.for_model(config), accounts=accounts)
    return app, accounts


@asynccontextmanager
async def client(app, key: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers,
                                 timeout=60) as c:
        yield c


@asynccontextmanager
async def ledger_at(url: str) -> AsyncIterator[Ledger]:
    ledger = open_ledger(url)
    try:
        yield ledger
    finally:
        await ledger.close()


async def balance(ledger: Ledger, key_id: str) -> int:
    return next(k.balance_micro for k in await ledger.list_keys() if k.key_id == key_id)


async def no_open_reservations(ledger: Ledger, within_s: float = 20.0) -> int:
    """Polls until no reservation is open or the deadline passes; the count left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while (left := await ledger.open_reservations()) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return left


@dataclass
class Watch:
    """The lowest balance a poller saw while requests ran."""

    lowest: int | None = None


@asynccontextmanager
async def watching(ledger: Ledger, key_id: str) -> AsyncIterator[Watch]:
    watch = Watch()
    stop = asyncio.Event()

    async def poll() -> None:
        while not stop.is_set():
            b = await balance(ledger, key_id)
            watch.lowest = b if watch.lowest is None else min(watch.lowest, b)
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(poll())
    try:
        yield watch
    finally:
        stop.set()
        await task


def error_code(response: httpx.Response) -> str | None:
    return response.json()["error"]["code"]


# -- credits -------------------------------------------------------------------------------------------------------
def test_exactly_the_covered_requests_run(served, db_url):
    """50 concurrent requests (JSON and streams) on one key whose balance covers exactly 10 worst cases."""
    async def scenario() -> None:
        app, accounts = make_app(served, db_url)
        async with ledger_at(db_url) as ledger:
            record, key = await ledger.create_key("race", 10 * WORST)
            async with client(app, key) as c, watching(ledger, record.key_id) as watch:
                bodies = [BODY | ({"stream": True} if i % 2 else {}) for i in range(50)]
                responses = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))
            statuses = [r.status_code for r in responses]
            assert statuses.count(200) == 10, statuses
            assert statuses.count(429) == 40, statuses
            assert all(error_code(r) == "insufficient_quota" and r.json()["error"]["type"] == "insufficient_quota"
                       for r in responses if r.status_code == 429)
            assert all("x-remaining-credits" in r.headers for r in responses)
            assert watch.lowest is not None and watch.lowest >= 0
            assert await no_open_reservations(ledger) == 0
            usage = await ledger.usage(record.key_id)
            assert len(usage) == 10
            assert sum(u.cost_micro for u in usage) == 10 * WORST  # every credit spent, each charge once
            assert all((u.prompt_tokens, u.completion_tokens) == (len(PROMPT), MAX_TOKENS) for u in usage)
            assert await balance(ledger, record.key_id) == 0
            await accounts.close()

    asyncio.run(scenario())


def test_aborted_streams_settle_to_what_was_generated(served, db_url):
    """200 streams whose clients leave at seeded random points: each settles to the tokens generated (at least
    those the client got), the log sums to the credits spent, no reservation stays open."""
    streams, seed, max_tokens = 200, 18, 6
    rng = random.Random(seed)
    stops = [rng.randint(0, max_tokens + 1) for _ in range(streams)]  # events read before leaving

    async def one(c: httpx.AsyncClient, limit: asyncio.Semaphore, stop: int, got: dict[str, int]) -> None:
        body = BODY | {"stream": True, "max_tokens": max_tokens}
        async with limit, c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            read = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                got[chunk["id"]] = got.get(chunk["id"], 0) + 1
                read += 1
                if read >= stop:
                    break  # leaving the block closes the connection mid-stream

    async def scenario(port: int) -> None:
        async with ledger_at(db_url) as ledger:
            credits = 1_000_000
            record, key = await ledger.create_key("aborts", credits)
            got: dict[str, int] = {}
            limit = asyncio.Semaphore(16)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                         headers={"x-api-key": key}) as c:
                await asyncio.gather(*(one(c, limit, s, got) for s in stops))
            left = await no_open_reservations(ledger)
            assert left == 0, f"{left} reservations open (seed {seed})"
            usage = {u.request_id: u for u in await ledger.usage(record.key_id, limit=1000)}
            assert len(usage) == streams, f"seed {seed}"
            for request_id, n in got.items():  # a chunk is a token: the charge covers at least what was sent
                assert usage[request_id].completion_tokens >= n, (request_id, seed)
            for u in usage.values():
                assert u.completion_tokens <= max_tokens and u.prompt_tokens in (0, len(PROMPT)), (u, seed)
                assert u.cost_micro == PRICING.cost(u.prompt_tokens, u.completion_tokens), (u, seed)
            assert credits - await balance(ledger, record.key_id) == sum(u.cost_micro for u in usage.values())

    app, accounts = make_app(served, db_url)
    with uvicorn_server(app) as port:
        asyncio.run(scenario(port))


def test_refused_request_is_charged_nothing(served, sqlite_url):
    """A prompt longer than the context is refused (400) before anything is reserved; a request the engine refuses
    (more choices than it allows) settles its reservation at 0."""
    front, (tok, config) = served

    async def scenario() -> None:
        app, accounts = make_app(served, sqlite_url)
        async with ledger_at(sqlite_url) as ledger:
            record, key = await ledger.create_key("refused", 1_000_000)
            long_prompt = [5] * (config.max_position_embeddings + 1)
            async with client(app, key) as c:
                too_long = await c.post("/v1/completions", json=BODY | {"prompt": long_prompt})
                too_many = await c.post("/v1/completions", json=BODY | {"n": front.engine.config.max_n + 1})
            for r in (too_long, too_many):
                assert r.status_code == 400, r.text
                assert r.headers["x-remaining-credits"] == format_dollars(1_000_000)
            assert too_long.json()["error"]["code"] == "context_length_exceeded"
            assert await ledger.open_reservations() == 0
            assert [u.cost_micro for u in await ledger.usage(record.key_id)] == [0]  # the engine's refusal only
            assert await balance(ledger, record.key_id) == 1_000_000
            await accounts.close()

    asyncio.run(scenario())


# -- x-remaining-credits ---------------------------------------------------------------------------------------------
def test_remaining_credits_header_and_usage_chunk(served, db_url):
    async def scenario() -> None:
        app, accounts = make_app(served, db_url)
        async with ledger_at(db_url) as ledger:
            start = 1_000_000
            record, key = await ledger.create_key("header", start)
            async with client(app, key) as c:
                plain = await c.post("/v1/chat/completions", json=CHAT)
                after_plain = await balance(ledger, record.key_id)
                streamed = await c.post("/v1/chat/completions",
                                        json=CHAT | {"stream": True, "stream_options": {"include_usage": True}})
                after_stream = await balance(ledger, record.key_id)
                models = await c.get("/v1/models")
            assert plain.status_code == 200, plain.text
            usage = plain.json()["usage"]
            cost = PRICING.cost(usage["prompt_tokens"], usage["completion_tokens"])
            assert after_plain == start - cost
            assert plain.headers["x-remaining-credits"] == format_dollars(after_plain)
            assert "remaining_credits" not in usage
            # the stream's headers: the balance after its reservation; its usage chunk: after its settle
            reserved = PRICING.cost(usage["prompt_tokens"], MAX_TOKENS)
            assert streamed.headers["x-remaining-credits"] == format_dollars(after_plain - reserved)
            last = json.loads(streamed.text.split("\n\n")[-3].removeprefix("data: "))
            assert last["usage"]["remaining_credits"] == format_dollars(after_stream)
            assert after_stream == after_plain - cost
            assert models.status_code == 200 and models.headers["x-remaining-credits"] == format_dollars(after_stream)
            await accounts.close()

    asyncio.run(scenario())


def test_open_server_without_a_ledger(served):
    async def scenario() -> None:
        app, _ = make_app(served, None)
        async with client(app) as c:
            plain = await c.post("/v1/chat/completions", json=CHAT)
            streamed = await c.post("/v1/completions",
                                    json=BODY | {"stream": True, "stream_options": {"include_usage": True}})
            models = await c.get("/v1/models")
        for r in (plain, streamed, models):
            assert r.status_code == 200, r.text
            assert "x-remaining-credits" not in r.headers
        assert "remaining_credits" not in plain.json()["usage"]
        assert '"remaining_credits"' not in streamed.text

    asyncio.run(scenario())


# -- auth ------------------------------------------------------------------------------------------------------------
V1_ROUTES = [("POST", "/v1/chat/completions", CHAT), ("POST", "/v1/completions", BODY), ("GET", "/v1/models", None),
             ("GET", f"/v1/models/{MODEL}", None), ("GET", "/v1/nowhere", None)]


def test_every_v1_route_needs_a_usable_key(served, db_url):
    async def scenario() -> None:
        app, accounts = make_app(served, db_url)
        async with ledger_at(db_url) as ledger:
            good_record, good = await ledger.create_key("good", 1_000_000)
            revoked_record, revoked = await ledger.create_key("revoked", 1_000_000)
            await ledger.revoke(revoked_record.key_id)
            wrong = good[:-4] + ("aaaa" if not good.endswith("aaaa") else "bbbb")  # right shape, wrong secret
            headers = {"missing": {}, "malformed": {"Authorization": "Bearer sk-not-ours"},
                       "wrong": {"Authorization": f"Bearer {wrong}"}, "revoked": {"x-api-key": revoked},
                       "not bearer": {"Authorization": f"Basic {good}"}}
            async with client(app) as c:
                for method, path, body in V1_ROUTES:
                    for name, h in headers.items():
                        r = await c.request(method, path, json=body, headers=h)
                        assert r.status_code == 401, (path, name, r.text)
                        assert error_code(r) == "invalid_api_key", (path, name)
                        assert r.json()["error"]["type"] == "invalid_request_error"
                assert (await c.get("/health")).status_code == 200  # open
                by_bearer = await c.get("/v1/models", headers={"Authorization": f"Bearer {good}"})
                by_header = await c.post("/v1/completions", json=BODY, headers={"x-api-key": good})
            assert by_bearer.status_code == 200 and by_header.status_code == 200, by_header.text
            assert await ledger.usage(revoked_record.key_id) == []
            await accounts.close()

    asyncio.run(scenario())


def test_openai_sdk_sees_authentication_and_quota_errors(served, sqlite_url):
    async def keys() -> tuple[str, str, str]:
        async with ledger_at(sqlite_url) as ledger:
            _, good = await ledger.create_key("sdk", 1_000_000)
            revoked_record, revoked = await ledger.create_key("sdk-revoked", 1_000_000)
            await ledger.revoke(revoked_record.key_id)
            _, poor = await ledger.create_key("sdk-poor", WORST - 1)
            return good, revoked, poor

    good, revoked, poor = asyncio.run(keys())
    app, accounts = make_app(served, sqlite_url)
    with uvicorn_server(app) as port:
        def sdk(key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)

        for key in ("sk-wrong", good[:-1] + ("a" if good[-1] != "a" else "b"), revoked):
            with sdk(key) as c:
                with pytest.raises(openai.AuthenticationError) as e:
                    c.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=MAX_TOKENS)
                assert e.value.code == "invalid_api_key"
                with pytest.raises(openai.AuthenticationError):
                    c.models.list()
        with sdk(poor) as c:
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS)
            assert e.value.code == "insufficient_quota"
            assert e.value.response.headers["x-remaining-credits"] == format_dollars(WORST - 1)
        with sdk(good) as c:
            raw = c.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                         extra_body={"ignore_eos": True})
            assert raw.parse().usage.completion_tokens == MAX_TOKENS
            assert raw.headers["x-remaining-credits"] == format_dollars(1_000_000 - WORST)


# -- rate limits -----------------------------------------------------------------------------------------------------
def test_rate_limits(served, sqlite_url):
    """rpm 2: two requests just before a calendar minute ends, then the next minute's first is still refused (the
    window is the last 60 s), with Retry-After the seconds until the oldest of the two leaves it; at that moment one
    passes. The store's clock is stepped by hand."""
    minute = 1_800_000_000.0  # a calendar minute's first second
    clock = [minute - 2]

    def opener(url: str) -> Ledger:
        return open_ledger(url, clock=lambda: clock[0])

    async def scenario() -> None:
        app, accounts = make_app(served, sqlite_url, opener=opener)
        async with ledger_at(sqlite_url) as ledger:
            _, by_requests = await ledger.create_key("rpm", 1_000_000, rpm=2)
            _, by_tokens = await ledger.create_key("tpm", 1_000_000, tpm=len(PROMPT) + MAX_TOKENS - 1)
            async with client(app, by_requests) as c:
                first, second = [await c.post("/v1/completions", json=BODY) for _ in range(2)]
                clock[0] = minute + 0.5
                third = await c.post("/v1/completions", json=BODY)
                clock[0] = minute + 57.9
                fourth = await c.post("/v1/completions", json=BODY)
                clock[0] = minute + 58
                fifth = await c.post("/v1/completions", json=BODY)
            async with client(app, by_tokens) as c:
                never = await c.post("/v1/completions", json=BODY)
            assert await ledger.open_reservations() == 0
            await accounts.close()
        assert first.status_code == second.status_code == fifth.status_code == 200
        for refused, retry_after in ((third, "58"), (fourth, "1")):
            assert refused.status_code == 429 and error_code(refused) == "rate_limit_exceeded", refused.text
            assert refused.headers["retry-after"] == retry_after, refused.headers
            assert f"retry after {retry_after}s" in refused.json()["error"]["message"]
        assert never.status_code == 400 and error_code(never) == "tokens_per_minute_exceeded", never.text

    asyncio.run(scenario())


# -- several servers, restarts -----------------------------------------------------------------------------------------
@contextmanager
def two_servers(served, url: str) -> Iterator[tuple[int, int]]:
    """Two apps, each in its own uvicorn thread and event loop with its own ledger connections."""
    (a, _), (b, _) = make_app(served, url), make_app(served, url)
    with uvicorn_server(a) as port_a, uvicorn_server(b) as port_b:
        yield port_a, port_b


def test_two_servers_sharing_postgres_run_exactly_the_covered_requests(served, postgres_url):
    from tests.postgres import fresh_database

    url = fresh_database(postgres_url)

    async def scenario(ports: tuple[int, int]) -> None:
        async with ledger_at(url) as ledger:
            record, key = await ledger.create_key("shared", 10 * WORST)
            clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{p}", timeout=60, headers={"x-api-key": key})
                       for p in ports]
            try:
                async with watching(ledger, record.key_id) as watch:
                    responses = await asyncio.gather(*(clients[i % 2].post("/v1/completions", json=BODY)
                                                       for i in range(50)))
            finally:
                for c in clients:
                    await c.aclose()
            statuses = [r.status_code for r in responses]
            assert statuses.count(200) == 10 and statuses.count(429) == 40, statuses
            assert watch.lowest is not None and watch.lowest >= 0
            assert await no_open_reservations(ledger) == 0
            assert sum(u.cost_micro for u in await ledger.usage(record.key_id)) == 10 * WORST
            assert await balance(ledger, record.key_id) == 0

    with two_servers(served, url) as ports:
        asyncio.run(scenario(ports))


def test_a_dead_servers_reservation_is_released_on_the_next_start(served, db_url):
    """A reservation a killed server left open (short TTL) is refunded when the next server starts; settled
    charges stay."""
    async def scenario() -> None:
        async with ledger_at(db_url) as ledger:
            record, key = await ledger.create_key("restart", 1_000_000)
            await ledger.reserve(record.key_id, "settled-before-the-kill", 100, ttl_s=0.2)
            await ledger.settle("settled-before-the-kill", 10, 10, 40)
            await ledger.reserve(record.key_id, "cmpl-left-open", 500, ttl_s=0.2)  # then the process died
            assert await balance(ledger, record.key_id) == 1_000_000 - 40 - 500
            await asyncio.sleep(0.3)
            app, accounts = make_app(served, db_url, reservation_ttl_s=0.2)
            await accounts.start()  # what the app's lifespan runs at start-up
            assert await ledger.open_reservations() == 0
            assert await balance(ledger, record.key_id) == 1_000_000 - 40
            assert [u.cost_micro for u in await ledger.usage(record.key_id)] == [40]
            await accounts.close()

    asyncio.run(scenario())


def test_periodic_release(served, sqlite_url):
    async def scenario() -> None:
        app, accounts = make_app(served, sqlite_url, release_period_s=0.1)
        await accounts.start()
        async with ledger_at(sqlite_url) as ledger:
            record, _ = await ledger.create_key("periodic", 1000)
            await ledger.reserve(record.key_id, "cmpl-stale", 600, ttl_s=0.05)
            assert await no_open_reservations(ledger, within_s=5) == 0
            assert await balance(ledger, record.key_id) == 1000
        await accounts.close()

    asyncio.run(scenario())


def test_a_live_servers_reservations_are_renewed_past_their_ttl(served, sqlite_url):
    """A request may outlive `reservation_ttl_s`: while its server lives the sweep renews it, so it is never
    released (and its credits never spent twice); once settled it is no longer renewed."""
    async def scenario() -> None:
        app, accounts = make_app(served, sqlite_url, reservation_ttl_s=0.3, release_period_s=0.1)
        await accounts.start()
        async with ledger_at(sqlite_url) as ledger:
            created, key = await ledger.create_key("long", 1000)
            record = await accounts.auth.authenticate(key)
            charge = await accounts.billing.reserve(record, "cmpl-long", 10, 10)
            await asyncio.sleep(1.0)  # three TTLs, ten sweeps
            assert await ledger.open_reservations() == 1
            charge.accepted, charge.completion_tokens = True, 4
            assert await charge.settle() == 1000 - PRICING.cost(10, 4)
            assert await ledger.open_reservations() == 0 and not accounts.session.unsettled
        await accounts.close()

    asyncio.run(scenario())


def test_a_price_change_applies_to_later_requests_only(served, sqlite_url):
    """A live price change (the Ingress's user_config) reaches requests reserved after it: one reserved before
    settles at the price it was reserved at, neither above its reservation nor at the new price."""
    async def scenario() -> None:
        app, accounts = make_app(served, sqlite_url)
        await accounts.start()
        async with ledger_at(sqlite_url) as ledger:
            created, key = await ledger.create_key("price", 10_000)
            record = await accounts.auth.authenticate(key)
            before = await accounts.billing.reserve(record, "cmpl-before", 10, 10)
            accounts.billing.pricing = Pricing(5_000_000, 9_000_000)  # what app.state.reconfigure does
            after = await accounts.billing.reserve(record, "cmpl-after", 10, 10)
            for charge in (before, after):
                charge.accepted, charge.completion_tokens = True, 4
            start = await balance(ledger, created.key_id) + before.reserved_micro + after.reserved_micro
            await before.settle()
            await after.settle()
            assert await balance(ledger, created.key_id) == (
                start - PRICING.cost(10, 4) - Pricing(5_000_000, 9_000_000).cost(10, 4))
        await accounts.close()

    asyncio.run(scenario())


def test_a_request_cancelled_while_reserving_leaves_no_reservation_open(served, sqlite_url):
    """The client leaves while its reserve is in flight: the reserve still lands, and is settled at 0 at once."""
    async def scenario() -> None:
        app, accounts = make_app(served, sqlite_url)
        await accounts.start()
        async with ledger_at(sqlite_url) as ledger:
            created, key = await ledger.create_key("gone", 1000)
            record = await accounts.auth.authenticate(key)
            used = await accounts.session.ledger()
            landed = asyncio.Event()
            reserve = used.reserve

            async def slow_reserve(*args: Any, **kw: Any) -> int:  # lands, then answers late
                after = await reserve(*args, **kw)
                landed.set()
                await asyncio.sleep(0.5)
                return after

            used.reserve = slow_reserve
            reserving = asyncio.ensure_future(accounts.billing.reserve(record, "cmpl-gone", 10, 10))
            await asyncio.wait_for(landed.wait(), 10)
            assert await ledger.open_reservations() == 1
            reserving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reserving
            assert await no_open_reservations(ledger, within_s=5) == 0
            assert [(u.request_id, u.cost_micro) for u in await ledger.usage(created.key_id)] == [("cmpl-gone", 0)]
            assert await balance(ledger, created.key_id) == 1000
        await accounts.close()

    asyncio.run(scenario())


def test_a_ledger_url_with_a_password_is_refused():
    from cluster.serve.args import ServeArgs

    with pytest.raises(ValueError, match="MOE_CLUSTER_DB_PASSWORD"):
        ServeArgs(db="postgresql://moe:secret@db:5432/ledger")
    assert ServeArgs(db="postgresql://moe@db:5432/ledger").db == "postgresql://moe@db:5432/ledger"


# -- prefix cache ----------------------------------------------------------------------------------------------------
def test_each_key_has_its_own_prefix_cache(served, sqlite_url):
    prompt = list(range(1000, 1048))  # three 16-token blocks

    async def scenario() -> tuple[int, int, int]:
        app, accounts = make_app(served, sqlite_url)
        async with ledger_at(sqlite_url) as ledger:
            _, a = await ledger.create_key("a", 1_000_000)
            _, b = await ledger.create_key("b", 1_000_000)
        body = BODY | {"prompt": prompt, "max_tokens": 1, "cache_salt": "shared"}
        cached = []
        for key in (a, a, b):
            async with client(app, key) as c:
                r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        await accounts.close()
        return tuple(cached)

    first, again, other_key = asyncio.run(scenario())
    assert first == 0 and again >= 32, (first, again)
    assert other_key == 0  # key b reuses nothing key a computed, though both sent the same salt


def test_salt_is_the_keys_own():
    from cluster.api.auth import salted
    from cluster.engine.sampling_params import SamplingParams
    from cluster.ledger import KeyRecord

    key = KeyRecord("0123456789ab", None, 0, False, 0.0, None, None)
    plain, with_salt = SamplingParams(max_tokens=1), SamplingParams(max_tokens=1, cache_salt="s")
    assert salted(key, plain).cache_salt == hashlib.sha256(b"0123456789ab\0").hexdigest()
    assert salted(key, with_salt).cache_salt == hashlib.sha256(b"0123456789ab\0s").hexdigest()
    assert salted(None, with_salt).cache_salt == "s"
