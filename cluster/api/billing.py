"""Credits and rate limits: what a request may cost, reserved before the backend sees it and settled after.

A generation request, once validated and tokenized and before the backend sees it:
- takes its worst case, prompt + n x max_tokens tokens, from the key's rate windows, each the last 60 s (only for a
  key with limits: 429 `rate_limit_exceeded`, Retry-After the seconds until enough has left the window; a worst case
  larger than the key's whole tokens-per-minute limit could never pass and gets 400 at once);
- reserves the worst case's price in one atomic ledger call (429 `insufficient_quota` when the balance can't cover
  it; the reservation's id is the completion id);
- settles when it ends, however it ends (`Charge.settle`, run once, as a task the ledger session holds, so a handler
  cancelled by a disconnect or a drain cannot stop it; a ledger failure is logged, never a 5xx).

What a request is charged: its prompt tokens once the backend accepted it (its first output was not a refusal),
plus every completion token the API read from the backend, over all choices. A refused request (400, 429, 503 from
the backend) and one whose client left before its first token are charged nothing: their settle is at 0 tokens.
The rate windows count a request's worst case when it is admitted and are not given back.

`x-remaining-credits` (dollars, 6 decimals) on a generation's response: the balance after the settle for JSON
bodies, after the reservation for a stream's headers (its final usage chunk carries the balance after the settle as
`usage.remaining_credits`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import AsyncGenerator, Awaitable, Callable

from starlette.responses import Response

from cluster.api.auth import REMAINING_CREDITS, KeyAuth, unauthorized
from cluster.api.errors import AccountError, APIError
from cluster.api.ledger_session import LedgerSession, unavailable
from cluster.api.sse import EventStream
from cluster.ledger import (InsufficientCredits, KeyRecord, KeyRevoked, Pricing, RateLimited, UnknownKey,
                            format_dollars)

log = logging.getLogger(__name__)

SETTLE_ATTEMPTS = 4  # a settle the ledger refuses is retried, waiting SETTLE_RETRY_S, then twice as long each time
SETTLE_RETRY_S = 0.5


class Billing:
    """Reserves and settles the requests of keys (`auth` notes the balances the ledger reports)."""

    def __init__(self, session: LedgerSession, auth: KeyAuth, pricing: Pricing = Pricing()):
        self.session = session
        self.auth = auth
        self.pricing = pricing

    async def reserve(self, key: KeyRecord | None, request_id: str, prompt_tokens: int,
                      max_completion_tokens: int) -> Charge:
        """Take the request's worst case from the key's rate windows and balance; AccountError when refused."""
        if key is None:
            return Charge(self, None, request_id, prompt_tokens, 0, None, self.pricing)
        ledger = await self.session.ledger()
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
                raise unavailable("rate limits") from e
        pricing = self.pricing  # the request's price, fixed now: a live change applies to later requests
        amount = pricing.cost(prompt_tokens, max_completion_tokens)
        reserving = asyncio.ensure_future(ledger.reserve(key.key_id, request_id, amount, self.session.ttl_s))
        try:
            after = await asyncio.shield(reserving)
        except asyncio.CancelledError:  # the client left meanwhile: the reservation may still be made, so close it
            self.session.spawn(self._abandon(reserving, request_id))
            raise
        except InsufficientCredits as e:
            self.auth.note_balance(key.key_id, e.balance_micro)
            raise AccountError(429, f"this key's credits (${format_dollars(e.balance_micro)}) do not cover the "
                                    f"request's worst case (${format_dollars(amount)}: {prompt_tokens} prompt tokens "
                                    f"+ {max_completion_tokens} completion tokens); add credits or lower max_tokens",
                               "insufficient_quota", "insufficient_quota",
                               {REMAINING_CREDITS: format_dollars(e.balance_micro), "x-should-retry": "false"}
                               ) from None
        except KeyRevoked:
            raise unauthorized(f"the API key {key.key_id} has been revoked") from None
        except UnknownKey:
            raise unauthorized("incorrect API key provided") from None
        except Exception as e:
            log.exception("reserving credits for %s failed", request_id)
            raise unavailable("reservation") from e
        self.auth.note_balance(key.key_id, after)
        self.session.unsettled.add(request_id)
        return Charge(self, key.key_id, request_id, prompt_tokens, amount, after, pricing)

    async def _abandon(self, reserving: asyncio.Future, request_id: str) -> None:
        """Settle at 0 a reservation whose request was cancelled while it was being made, once it is."""
        try:
            await reserving
        except Exception:
            return  # refused or failed: nothing was reserved
        try:
            await (await self.session.ledger()).settle(request_id, 0, 0, 0)
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

    billing: Billing
    key_id: str | None  # None: an open server, nothing to settle
    request_id: str
    prompt_tokens: int
    reserved_micro: int
    balance_micro: int | None  # after the reservation, then after the settle; None: not known
    pricing: Pricing  # the price when the request was reserved: a live change applies to later requests only
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
            self._settling = self.billing.session.spawn(self._settle())
        return await asyncio.shield(self._settling)

    async def _settle(self) -> int | None:
        """Settle is idempotent in the ledger, so a failed attempt is retried; after the last one the reservation is
        left to expire (released in full: the request is then not charged), which is logged."""
        prompt = self.prompt_tokens if self.accepted else 0
        cost = min(self.pricing.cost(prompt, self.completion_tokens), self.reserved_micro)
        try:
            for attempt in range(SETTLE_ATTEMPTS):
                try:
                    self.balance_micro = await (await self.billing.session.ledger()).settle(
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
            self.billing.session.unsettled.discard(self.request_id)
        self.billing.auth.note_balance(self.key_id, self.balance_micro)
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
