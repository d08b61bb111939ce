"""API keys, a credits ledger (SQLite embedded, PostgreSQL for clusters), per-token pricing and rate limits."""

from cluster.ledger.connect import open_ledger
from cluster.ledger.keys import API_KEY_PREFIX, new_api_key, parse_api_key
from cluster.ledger.pricing import MICRO, Pricing, format_dollars, parse_dollars
from cluster.ledger.store import (InsufficientCredits, KeyRecord, KeyRevoked, Ledger, LedgerError, RateLimited,
                                  UnknownKey, UsageRow)

__all__ = ["API_KEY_PREFIX", "MICRO", "InsufficientCredits", "KeyRecord", "KeyRevoked", "Ledger", "LedgerError",
           "Pricing", "RateLimited", "UnknownKey", "UsageRow", "format_dollars", "new_api_key", "open_ledger",
           "parse_api_key", "parse_dollars"]
