"""Keys, credits and rate limits for the API's routes: one `Accounts` per app, one `Charge` per request.

With a ledger configured (`serve --db URL`), every route (the /v1 routes, and any unknown path) needs
`Authorization: Bearer KEY` or `x-api-key: KEY` (`AuthMiddleware`); only /health and /metrics stay open. A
missing, malformed, unknown or revoked key gets 401 `invalid_api_key`. Without a ledger the server is open and
nothing here touches a request.

A generation request, once validated and tokenized and before the backend sees it:
- takes its worst case, prompt + n x max_tokens tokens, from the key's rate windows, each the last 60 s (only for a
  key with limits: 429 `rate_limit_exceeded`, Retry-After the seconds until enough has left the window; a worst case
  larger than the key's whole tokens-per-minute limit could never pass and gets 400 at once);
- reserves the worst case's price in one atomic ledger call (429 `insufficient_quota` when the balance can't cover
  it; the reservation's id is the completion id);
- settles when it ends, however it ends (`Charge.settle`, run once, as its own task the app holds, so a handler
  cancelled by a disconnect or a drain cannot stop it; a ledger failure is logged, never a 5xx).

What a request is charged: its prompt tokens once the backend accepted it (its first output was not a refusal),
plus every completion token the API read from the backend, over all choices. A refused request (400, 429, 503 from
the backend) and one whose client left before its first token are charged nothing: their settle is at 0 tokens.
The rate windows count a request's worst case when it is admitted and are not given back.

Every response to a keyed request carries `x-remaining-credits` (dollars, 6 decimals): the balance after the
settle for JSON bodies, after the reservation for a stream's headers (its final usage chunk carries the balance
after the settle as `usage.remaining_credits`), the balance the ledger last reported for anything else.

A key's record is looked up once per `AUTH_CACHE_S` (concurrent requests with one key share the lookup): a burst
of requests costs the ledger one read, not one each. The reserve checks revocation again, atomically, so a revoked
key generates nothing from then on; only the model list may still answer it for that long.

Each key gets its own prefix cache: the request's `cache_salt` becomes sha256(key_id NUL client salt), so no key
can time another's cached prompts. Reservations a dead process left open are released when they expire: at
start-up and every `release_period_s` after.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from typing import Any, AsyncGenerator, Awaitable, Callable, Coroutine

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.api.errors import APIError
from cluster.api.sse import EventStream
from cluster.engine.sampling_params import SamplingParams
from cluster.ledger import (InsufficientCredits, KeyRecord, KeyRevoked, Ledger, Pricing, RateLimited, UnknownKey,
                            format_dollars, open_ledger)

log = logging.getLogger(__name__)

REMAINING_CREDITS = "x-remaining-credits"
KEY_SCOPE = "moe_cluster.key"  # the ASGI scope entry holding the request's KeyRecord
DEFAULT_TTL_S = 900.0
DEFAULT_RELEASE_PERIOD_S = 60.0
SETTLE_ATTEMPTS = 4  # a settle the ledger refuses is retried, waiting SETTLE_RETRY_S, then twice as long each time
SETTLE_RETRY_S = 0.5
AUTH_CACHE_S = 2.0  # how long an authenticated key's record is reused
_AUTH_CACHE_KEYS = 4096  # records kept at most (the cache is emptied when it would hold more)
_OPEN_PATHS = ("/health", "/metrics")


class AccountError(APIError):
    """An APIError with OpenAI's `type` for accounts (it differs from the status's usual one) and extra headers."""

    def __init__(self, status: int, message: str, kind: str, code: str, headers: dict[str, str] | None = None,
                 param: str | None = None):
        super().__init__(status, message, param, code)
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict:
        body = super().body()
        body["error"]["type"] = self.kind
        return body

    def response(self) -> Response:
        response = super().response()
        response.headers.update(self.headers)
        return response


def _unauthorized(message: str) -> AccountError:
    return AccountError(401, message, "invalid_request_error", "invalid_api_key")


def _unavailable(what: str) -> APIError:
    return APIError(503, f"the credits ledger is unavailable ({what}); retry")


def presented_key(scope: Scope) -> str | None:
    """The key in `Authorization: Bearer KEY` or else `x-api-key: KEY`; None when neither is there."""
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


class Accounts:
    """Auth, reservations, settles and rate limits against one ledger (None: an open server)."""

    def __init__(self, ledger_url: str | None, pricing: Pricing = Pricing(), reservation_ttl_s: float = DEFAULT_TTL_S,
                 release_period_s: float = DEFAULT_RELEASE_PERIOD_S,
                 opener: Callable[[str], Ledger] = open_ledger):
        self.url = ledger_url
        self.pricing = pricing
        self.ttl_s = reservation_ttl_s
        self.release_period_s = release_period_s
        self._opener = opener
        self._ledger: Ledger | None = None
        self._starting: asyncio.Task | None = None
        self._releaser: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # settles in flight: held here so nothing cancels or collects them
        self.unsettled: set[str] = set()  # request ids reserved and not yet settled: renewed while this server lives
        self._known: dict[bytes, tuple[float, KeyRecord]] = {}  # sha256(key) -> (reused until, its record)
        self._looking: dict[bytes, asyncio.Task] = {}  # sha256(key) -> the lookup in flight
        self._digests: dict[str, bytes] = {}  # key id -> sha256(key), to note the balances reserves and settles see

    @property
    def enabled(self) -> bool:
        return self.url is not None

    # -- life cycle ----------------------------------------------------------------------------------------------
    async def ledger(self) -> Ledger:
        """The ledger, opened on first use in this event loop (the lifespan's start-up, or the first request when
        the server runs without one), with expired reservations released and the periodic release started."""
        if self._ledger is not None:
            return self._ledger
        failed = self._starting is not None and self._starting.done() and (self._starting.cancelled() or
                                                                           self._starting.exception() is not None)
        if self._starting is None or failed:
            self._starting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._starting)

    async def _open(self) -> Ledger:
        assert self.url is not None
        ledger = self._opener(self.url)
        try:
            released = await ledger.release_expired()
        except BaseException:
            await ledger.close()
            raise
        if released:
            log.warning("released %d expired credit reservations (left open by a stopped server)", released)
        self._ledger = ledger
        self._releaser = asyncio.ensure_future(self._release_forever(ledger))
        return ledger

    async def _release_forever(self, ledger: Ledger) -> None:
        """Every period: renew this server's open reservations (a request may outlive `reservation_ttl_s`; only a
        dead server's reservations may expire), then release the expired ones."""
        while True:
            await asyncio.sleep(self.release_period_s)
            try:
                await ledger.renew(sorted(self.unsettled), self.ttl_s)
                released = await ledger.release_expired()
                if released:
                    log.warning("released %d expired credit reservations", released)
            except Exception:
                log.exception("renewing or releasing credit reservations failed")

    async def start(self) -> None:
        if self.enabled:
            await self.ledger()

    async def close(self) -> None:
        """Wait for the settles in flight, stop the periodic release, close the ledger."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=30)
        if self._releaser is not None:
            self._releaser.cancel()
            await asyncio.gather(self._releaser, return_exceptions=True)
        if self._ledger is not None:
            ledger, self._ledger, self._starting = self._ledger, None, None  # a later use opens it afresh
            await ledger.close()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- per request ---------------------------------------------------------------------------------------------
    async def authenticate(self, key: str | None) -> KeyRecord:
        """The record of a usable key; AccountError(401) otherwise."""
        if key is None:
            raise _unauthorized("no API key: send it as `Authorization: Bearer KEY` or `x-api-key: KEY`")
        try:
            record = await self._lookup(key)
        except Exception as e:
            log.exception("authenticating a key failed")
            raise _unavailable("authentication") from e
        if record is None:
            raise _unauthorized("incorrect API key provided")
        if record.revoked:
            raise _unauthorized(f"the API key {record.key_id} has been revoked")
        return record

    async def _lookup(self, key: str) -> KeyRecord | None:
        """The ledger's record of `key` (None: no such key), reused for AUTH_CACHE_S; one lookup at a time per key."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        now = time.monotonic()
        known = self._known.get(digest)
        if known is not None and known[0] > now:
            return known[1]
        looking = self._looking.get(digest)
        if looking is None:
            looking = self._looking[digest] = asyncio.ensure_future(self._authenticate(digest, key))
            looking.add_done_callback(lambda _: self._looking.pop(digest, None))
        return await asyncio.shield(looking)

    async def _authenticate(self, digest: bytes, key: str) -> KeyRecord | None:
        record = await (await self.ledger()).authenticate(key)
        if record is not None:  # unknown keys are not kept: a flood of them must not evict real ones
            if len(self._known) >= _AUTH_CACHE_KEYS:
                self._known.clear()
                self._digests.clear()
            self._known[digest] = (time.monotonic() + AUTH_CACHE_S, record)
            self._digests[record.key_id] = digest
        return record

    def note_balance(self, key_id: str, balance_micro: int) -> None:
        """The key's balance as the ledger just reported it, for the cached record (which stamps other routes)."""
        digest = self._digests.get(key_id)
        known = self._known.get(digest) if digest is not None else None
        if known is not None:
            self._known[digest] = (known[0], dataclasses.replace(known[1], balance_micro=balance_micro))

    def salted(self, key: KeyRecord | None, params: SamplingParams) -> SamplingParams:
        """`params` with the key's own cache salt (see the module docstring); unchanged on an open server."""
        if key is None:
            return params
        salt = hashlib.sha256(f"{key.key_id}\0{params.cache_salt or ''}".encode("utf-8", "surrogatepass"))
        return dataclasses.replace(params, cache_salt=salt.hexdigest())

    async def reserve(self, key: KeyRecord | None, request_id: str, prompt_tokens: int,
                      max_completion_tokens: int) -> Charge:
        """Take the request's worst case from the key's rate windows and balance; AccountError when refused."""
        if key is None:
            return Charge(self, None, request_id, prompt_tokens, 0, None)
        ledger = await self.ledger()
        worst_tokens = prompt_tokens + max_completion_tokens
        balance = {REMAINING_CREDITS: format_dollars(key.balance_micro)}
        if key.tpm_limit is not None and worst_tokens > key.tpm_limit:
            raise AccountError(400, f"this request may use {worst_tokens} tokens ({prompt_tokens} in the prompt + n "
                                    f"x max_tokens), more than this key's limit of {key.tpm_limit} tokens per minute: "
                                    f"it can never pass; lower max_tokens or n", "invalid_request_error",
                               "tokens_per_minute_exceeded", balance, "max_tokens")
        if key.rpm_limit is not None or key.tpm_limit is not None:
            try:
                await ledger.take_rate(key.key_id, 1, worst_tokens, key.rpm_limit, key.tpm_limit)
            except RateLimited as e:
                kind = "requests" if e.what.startswith("requests") else "tokens"
                raise AccountError(429, f"rate limit reached for this key: {e.what}; retry after {e.retry_after_s}s",
                                   kind, "rate_limit_exceeded",
                                   balance | {"Retry-After": str(e.retry_after_s)}) from None
            except Exception as e:
                log.exception("counting a request against its rate limits failed")
                raise _unavailable("rate limits") from e
        amount = self.pricing.cost(prompt_tokens, max_completion_tokens)
        reserving = asyncio.ensure_future(ledger.reserve(key.key_id, request_id, amount, self.ttl_s))
        try:
            after = await asyncio.shield(reserving)
        except asyncio.CancelledError:  # the client left meanwhile: the reservation may still be made, so close it
            self.spawn(self._abandon(reserving, request_id))
            raise
        except InsufficientCredits as e:
            self.note_balance(key.key_id, e.balance_micro)
            raise AccountError(429, f"this key's credits (${format_dollars(e.balance_micro)}) do not cover the "
                                    f"request's worst case (${format_dollars(amount)}: {prompt_tokens} prompt tokens "
                                    f"+ {max_completion_tokens} completion tokens); add credits or lower max_tokens",
                               "insufficient_quota", "insufficient_quota",
                               {REMAINING_CREDITS: format_dollars(e.balance_micro), "x-should-retry": "false"}
                               ) from None
        except KeyRevoked:
            raise _unauthorized(f"the API key {key.key_id} has been revoked") from None
        except UnknownKey:
            raise _unauthorized("incorrect API key provided") from None
        except Exception as e:
            log.exception("reserving credits for %s failed", request_id)
            raise _unavailable("reservation") from e
        self.note_balance(key.key_id, after)
        self.unsettled.add(request_id)
        return Charge(self, key.key_id, request_id, prompt_tokens, amount, after)

    async def _abandon(self, reserving: asyncio.Future, request_id: str) -> None:
        """Settle at 0 a reservation whose request was cancelled while it was being made, once it is."""
        try:
            await reserving
        except Exception:
            return  # refused or failed: nothing was reserved
        try:
            await (await self.ledger()).settle(request_id, 0, 0, 0)
        except Exception:
            log.exception("releasing the reservation of cancelled request %s failed; it expires", request_id)

    async def metered(self, key: KeyRecord | None, request_id: str, prompt_tokens: int, max_completion_tokens: int,
                      generate: Callable[[Charge], Awaitable[Response]]) -> Response:
        """`generate(charge)`'s response, with the request's worst case (its prompts' tokens, and n x max_tokens for
        each prompt) reserved before and settled after, however it ends (a streamed response settles when its stream
        closes: see `cluster.api.sse.EventStream`)."""
        charge = await self.reserve(key, request_id, prompt_tokens, max_completion_tokens)
        try:
            response = await generate(charge)
        except APIError as e:
            response = e.response()
        except BaseException:
            await charge.settle()
            raise
        return await charge.finish(response)


@dataclasses.dataclass
class Charge:
    """One request's reservation and what it used so far; `settle` closes it once."""

    accounts: Accounts
    key_id: str | None  # None: an open server, nothing to settle
    request_id: str
    prompt_tokens: int
    reserved_micro: int
    balance_micro: int | None  # after the reservation, then after the settle; None: not known
    accepted: bool = False  # the backend's first output was not a refusal: the prompt is charged
    completion_tokens: int = 0  # read from the backend so far, every choice
    streaming: bool = False  # the response is a stream, which settles when it closes
    _settling: asyncio.Task | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.balance_micro is None else {REMAINING_CREDITS: format_dollars(self.balance_micro)}

    async def remaining_after_settle(self) -> str | None:
        """Settle, then the balance after it in dollars (None when unknown: an open server, a ledger failure)."""
        balance = await self.settle()
        return None if balance is None else format_dollars(balance)

    async def settle(self) -> int | None:
        """Close the reservation at what was used (once; later calls wait for the first); the balance after, or
        None when the ledger failed (logged) or there is none."""
        if self.key_id is None:
            return None
        if self._settling is None:
            self._settling = self.accounts.spawn(self._settle())
        return await asyncio.shield(self._settling)

    async def _settle(self) -> int | None:
        """Settle is idempotent in the ledger, so a failed attempt is retried; after the last one the reservation is
        left to expire (released in full: the request is then not charged), which is logged."""
        prompt = self.prompt_tokens if self.accepted else 0
        cost = min(self.accounts.pricing.cost(prompt, self.completion_tokens), self.reserved_micro)
        try:
            for attempt in range(SETTLE_ATTEMPTS):
                try:
                    self.balance_micro = await (await self.accounts.ledger()).settle(
                        self.request_id, prompt, self.completion_tokens, cost)
                    break
                except Exception:
                    if attempt == SETTLE_ATTEMPTS - 1:
                        log.exception("settling %s (%d + %d tokens) failed %d times; its reservation is released "
                                      "when it expires", self.request_id, prompt, self.completion_tokens,
                                      SETTLE_ATTEMPTS)
                        return None
                    await asyncio.sleep(SETTLE_RETRY_S * 2 ** attempt)
        finally:
            self.accounts.unsettled.discard(self.request_id)
        self.accounts.note_balance(self.key_id, self.balance_micro)
        return self.balance_micro

    def stream(self, events: AsyncGenerator[str, None]) -> EventStream:
        """The SSE response of `events`, with the balance after the reservation, settling when it closes."""
        self.streaming = True
        return EventStream(events, self.headers, self.settle)

    async def finish(self, response: Response) -> Response:
        """A JSON response, settled and stamped with the balance after; a stream as it is (it settles itself)."""
        if self.streaming:
            return response
        await self.settle()
        response.headers.update(self.headers)
        return response


class AuthMiddleware:
    """ASGI middleware: a usable key for every route but the open ones (its record in scope[KEY_SCOPE]); every
    response to a keyed request gets `x-remaining-credits`, the balance the ledger last reported unless the route
    set it. Closed by default: a path is open only if it is /health or /metrics once the app's mount point (Serve's
    route prefix, in `root_path`) is taken off."""

    def __init__(self, app: ASGIApp, accounts: Accounts):
        self.app = app
        self.accounts = accounts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.accounts.enabled or _route_path(scope) in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        try:
            record = await self.accounts.authenticate(presented_key(scope))
        except APIError as e:
            return await e.response()(scope, receive, send)
        scope[KEY_SCOPE] = record
        stamp = (REMAINING_CREDITS.encode(), format_dollars(record.balance_micro).encode())

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                if not any(name.lower() == stamp[0] for name, _ in headers):
                    message = {**message, "headers": headers + [stamp]}
            await send(message)

        await self.app(scope, receive, stamped)


def _route_path(scope: Scope) -> str:
    """The path within the app: under a route prefix, servers keep the prefix in `path` and name it in
    `root_path`."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def request_key(request: Request) -> KeyRecord | None:
    """The authenticated key of this request; None on an open server."""
    return request.scope.get(KEY_SCOPE)
