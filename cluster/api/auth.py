"""API keys: who is asking. With a ledger, every route but /health and /metrics needs `Authorization: Bearer KEY` or
`x-api-key: KEY` (`AuthMiddleware`); a missing, malformed, unknown or revoked key gets 401 `invalid_api_key`.
Without a ledger the server is open and nothing here touches a request.

A key's record is looked up once per `AUTH_CACHE_S` (concurrent requests with one key share the lookup): a burst of
requests costs the ledger one read, not one each. The reserve checks revocation again, atomically (billing.py), so
a revoked key generates nothing from then on; only the model list may still answer it for that long.

Every response to a keyed request carries `x-remaining-credits`, the balance the ledger last reported, unless its
route set it (billing.py stamps the balance after a reserve or a settle).

Each key gets its own prefix cache: a request's `cache_salt` becomes sha256(key_id NUL client salt) (`salted`), so no
key can time another's cached prompts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.api.errors import AccountError, APIError
from cluster.api.ledger_session import LedgerSession, unavailable
from cluster.engine.sampling_params import SamplingParams
from cluster.ledger import KeyRecord, format_dollars

log = logging.getLogger(__name__)

REMAINING_CREDITS = "x-remaining-credits"
KEY_SCOPE = "moe_cluster.key"  # the ASGI scope entry holding the request's KeyRecord
AUTH_CACHE_S = 2.0  # how long an authenticated key's record is reused
_AUTH_CACHE_KEYS = 4096  # records kept at most (the cache is emptied when it would hold more)
_OPEN_PATHS = ("/health", "/metrics")


def unauthorized(message: str) -> AccountError:
    return AccountError(401, message, "invalid_request_error", "invalid_api_key")


class KeyAuth:
    """Keys checked against the session's ledger, their records cached for `AUTH_CACHE_S`."""

    def __init__(self, session: LedgerSession):
        self.session = session
        self._known: dict[bytes, tuple[float, KeyRecord]] = {}  # sha256(key) -> (reused until, its record)
        self._looking: dict[bytes, asyncio.Task] = {}  # sha256(key) -> the lookup in flight
        self._digests: dict[str, bytes] = {}  # key id -> sha256(key), to note the balances reserves and settles see

    async def authenticate(self, key: str | None) -> KeyRecord:
        """The record of a usable key; AccountError(401) otherwise."""
        if key is None:
            raise unauthorized("no API key: send it as `Authorization: Bearer KEY` or `x-api-key: KEY`")
        try:
            record = await self._lookup(key)
        except Exception as e:
            log.exception("authenticating a key failed")
            raise unavailable("authentication") from e
        if record is None:
            raise unauthorized("incorrect API key provided")
        if record.revoked:
            raise unauthorized(f"the API key {record.key_id} has been revoked")
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
        record = await (await self.session.ledger()).authenticate(key)
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


def salted(key: KeyRecord | None, params: SamplingParams) -> SamplingParams:
    """`params` with the key's own cache salt (see the module docstring); unchanged on an open server."""
    if key is None:
        return params
    salt = hashlib.sha256(f"{key.key_id}\0{params.cache_salt or ''}".encode("utf-8", "surrogatepass"))
    return dataclasses.replace(params, cache_salt=salt.hexdigest())


def presented_key(scope: Scope) -> str | None:
    """The key in `Authorization: Bearer KEY` or else `x-api-key: KEY`; None when neither is there."""
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


def request_key(request: Request) -> KeyRecord | None:
    """The authenticated key of this request; None on an open server."""
    return request.scope.get(KEY_SCOPE)


class AuthMiddleware:
    """ASGI middleware: a usable key for every route but the open ones (its record in scope[KEY_SCOPE]); every
    response to a keyed request gets `x-remaining-credits`, the balance the ledger last reported unless the route
    set it. Closed by default: a path is open only if it is /health or /metrics once the app's mount point (Serve's
    route prefix, in `root_path`) is taken off."""

    def __init__(self, app: ASGIApp, auth: KeyAuth):
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.auth.session.enabled or _route_path(scope) in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        try:
            record = await self.auth.authenticate(presented_key(scope))
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
