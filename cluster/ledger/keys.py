"""API keys: `mck_{key_id}_{secret}`.

The key id is public (it names the key in the CLI, in logs and in the usage log); the secret is 32 random bytes in
base62 (no `_` or `-`, so a double click selects the whole key). Only sha256(secret) is stored: a copy of the
database gives no usable key, and a 256-bit secret needs no slow hash. The store finds the row by key id and
compares digests with `hmac.compare_digest`, so the time taken says nothing about the secret.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string

API_KEY_PREFIX = "mck_"
_ALPHABET = string.digits + string.ascii_letters  # base62
_SECRET_BYTES = 32
_SECRET_CHARS = 43  # 62**43 > 2**256: every 32-byte secret fits, zero-padded to a fixed width
_KEY_RE = re.compile(rf"{API_KEY_PREFIX}([0-9a-f]{{12}})_([0-9A-Za-z]{{{_SECRET_CHARS}}})")


def _base62(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    for _ in range(_SECRET_CHARS):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def new_api_key() -> tuple[str, str, bytes]:
    """(key_id, the full key to hand out once, the digest to store)."""
    key_id = secrets.token_hex(6)
    secret = _base62(secrets.token_bytes(_SECRET_BYTES))
    return key_id, f"{API_KEY_PREFIX}{key_id}_{secret}", secret_digest(secret)


def parse_api_key(key: str) -> tuple[str, bytes] | None:
    """(key_id, digest of the presented secret), or None when `key` does not have the shape of a key."""
    m = _KEY_RE.fullmatch(key.strip()) if isinstance(key, str) else None
    if m is None:
        return None
    return m.group(1), secret_digest(m.group(2))
