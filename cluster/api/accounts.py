"""Keys, credits and rate limits for one app, against one ledger (or none: an open server): the three parts,
built together. `ledger_session.py` keeps the ledger open and its reservations renewed; `auth.py` says who asks
(keys, and the prefix-cache salt a key gets); `billing.py` reserves a request's worst case and settles what it used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cluster.api.auth import KeyAuth
from cluster.api.billing import Billing
from cluster.api.ledger_session import DEFAULT_RELEASE_PERIOD_S, DEFAULT_TTL_S, LedgerSession
from cluster.ledger import Ledger, Pricing, open_ledger


@dataclass(frozen=True)
class Accounts:
    session: LedgerSession
    auth: KeyAuth
    billing: Billing

    @classmethod
    def open(cls, ledger_url: str | None, pricing: Pricing = Pricing(), reservation_ttl_s: float = DEFAULT_TTL_S,
             release_period_s: float = DEFAULT_RELEASE_PERIOD_S,
             opener: Callable[[str], Ledger] = open_ledger) -> "Accounts":
        """The accounts of `ledger_url` (None: an open server); the ledger itself opens at the app's start-up."""
        session = LedgerSession(ledger_url, reservation_ttl_s, release_period_s, opener)
        auth = KeyAuth(session)
        return cls(session, auth, Billing(session, auth, pricing))

    async def start(self) -> None:
        await self.session.start()

    async def close(self) -> None:
        await self.session.close()
