"""API key text: generate, check the format, hash. The key text itself is never stored or logged.

A key looks like `muse-sk-<43 random chars>_<6 hex>`:
- `muse-sk-` makes a leaked key recognisable (secret scanners, grep through logs);
- the body is `secrets.token_urlsafe(32)`: 32 random bytes as 43 URL-safe base64 characters
  ([A-Za-z0-9_-]), so a key survives shells, URLs and HTTP headers without quoting;
- the checksum is the first 6 hex digits of sha256(body). It rejects a mistyped or truncated key
  without a database lookup (a wrong key passes it with probability 2**-24), and it is not a secret:
  it only says the body was copied intact.
The body may itself contain "_", so a key is parsed by position (fixed lengths), never by splitting.

Only `hash_key(text)` (sha256 hex of the whole text) reaches the database. sha256 without a salt is
the right tool here, unlike for passwords: the input has 256 bits of entropy, so there is nothing to
brute-force, and an unsalted hash lets the server look a key up by its hash through an index.
What lists, ledger rows and logs show is the public `key_id` ("key_" + 12 hex), never the key.
This module knows nothing about the database (server/store.py) or HTTP (server/app.py).
"""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_PREFIX = "muse-sk-"
BODY_CHARS = 43     # len(secrets.token_urlsafe(32))
CHECKSUM_CHARS = 6
KEY_LENGTH = len(KEY_PREFIX) + BODY_CHARS + 1 + CHECKSUM_CHARS   # 58
KEY_ID_PREFIX = "key_"

_KEY_RE = re.compile(re.escape(KEY_PREFIX) + rf"([A-Za-z0-9_-]{{{BODY_CHARS}}})_([0-9a-f]{{{CHECKSUM_CHARS}}})\Z")
_KEY_ID_RE = re.compile(re.escape(KEY_ID_PREFIX) + r"[0-9a-f]{12}\Z")


def checksum(body: str) -> str:
    """The 6-hex-digit checksum of a key body (first digits of its sha256)."""
    return hashlib.sha256(body.encode("ascii")).hexdigest()[:CHECKSUM_CHARS]


def format_key(body: str) -> str:
    """The full key text for a 43-character body (tests use a fixed body; `generate_key` a random one)."""
    if len(body) != BODY_CHARS or not re.fullmatch(r"[A-Za-z0-9_-]+", body):
        raise ValueError(f"a key body is {BODY_CHARS} URL-safe base64 characters")
    return f"{KEY_PREFIX}{body}_{checksum(body)}"


def generate_key() -> str:
    """A new random key: prefix, 32 random bytes (43 chars), checksum."""
    return format_key(secrets.token_urlsafe(32))


def check_format(text: object) -> bool:
    """True if `text` has the prefix, length, alphabet and a matching checksum (a cheap typo filter).

    Passing says nothing about whether the key exists; `Store.authenticate` decides that.
    """
    if not isinstance(text, str) or len(text) != KEY_LENGTH:
        return False
    m = _KEY_RE.match(text)
    return m is not None and secrets.compare_digest(checksum(m.group(1)), m.group(2))


def hash_key(text: str) -> str:
    """sha256 hex of the whole key text: the only form of a key that is ever stored."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def new_key_id() -> str:
    """A public id for a key ("key_" + 12 hex digits): safe to show in lists, ledger rows and logs."""
    return KEY_ID_PREFIX + secrets.token_hex(6)


def is_key_id(text: str) -> bool:
    """True for text shaped like a key id (not a check that the id exists)."""
    return isinstance(text, str) and _KEY_ID_RE.match(text) is not None
