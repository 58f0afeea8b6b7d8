"""The response cache: one SQLite file of (provider identity, request) -> response.

    cache = ResponseCache("~/.muse/eval-cache.sqlite3")
    key = cache.key(provider.identity, request)
    cache.get(key) -> dict | None;  cache.put(key, provider.identity, request, response)

The key is the sha256 of the canonical JSON of (CACHE_VERSION, identity, request). A provider's
identity holds what its answers depend on: for a local checkpoint the sha256 of its manifest.json
(which lists every file's sha256) and the dtype, so a new or retrained checkpoint never reads an old
checkpoint's answers; for an endpoint its base URL and model id (an endpoint that changes the model
behind a name cannot be detected: pass --no-cache, or a new cache, after redeploying).

Every response is committed the moment it arrives (WAL, synchronous=NORMAL: a commit costs no fsync,
and a killed process loses nothing committed). So an eval killed half way and run again sends only
the requests whose answers it had not received: at most the --concurrency requests in flight at the
kill go out twice. A finished eval reruns from the cache alone.

Failed answers that would fail the same way again (a 400, a reply that is not what was asked for)
are stored too, as {"error": reason}; timeouts and server errors are not.

This module knows SQLite and JSON. It does not know providers, tasks or what a response means.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from muse.common.errors import UsageError

CACHE_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""


def default_cache_path() -> Path:
    """$MUSE_EVAL_CACHE, else $MUSE_HOME/eval-cache.sqlite3 (MUSE_HOME defaults to ~/.muse)."""
    if os.environ.get("MUSE_EVAL_CACHE"):
        return Path(os.environ["MUSE_EVAL_CACHE"]).expanduser()
    return Path(os.environ.get("MUSE_HOME") or "~/.muse").expanduser() / "eval-cache.sqlite3"


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=True)


class ResponseCache:
    """A thread-safe SQLite map from request keys to responses (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA)
        except sqlite3.Error as e:
            raise UsageError(f"cannot open the eval cache {self.path} ({e}); pass --cache PATH or --no-cache") from None
        self._lock = threading.Lock()
        self.hits = self.misses = self.writes = 0

    @staticmethod
    def key(identity: str, request: Mapping) -> str:
        return hashlib.sha256(canonical([CACHE_VERSION, identity, request]).encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._conn.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: str, identity: str, request: Mapping, response: Mapping) -> None:
        """Store one response; committed before this returns (one autocommit statement)."""
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                               (key, identity, canonical(request), canonical(response), time.time()))
        self.writes += 1

    def count(self, identity: str | None = None) -> int:
        with self._lock:
            if identity is None:
                return self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            return self._conn.execute("SELECT COUNT(*) FROM responses WHERE identity = ?", (identity,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class NoCache:
    """--no-cache: the same interface, remembering nothing."""

    path = None
    hits = misses = writes = 0

    key = staticmethod(ResponseCache.key)

    def get(self, key: str) -> None:
        self.misses += 1
        return None

    def put(self, key, identity, request, response) -> None:
        pass

    def count(self, identity: str | None = None) -> int:
        return 0

    def close(self) -> None:
        pass
