"""The serving database's tables, and the migrations that bring any older file up to SCHEMA_VERSION.

A new file and an upgraded one are built by the same steps (version 0 -> 1 -> 2 ...), so they cannot
drift apart; a test compares their sqlite_master. Each migration is a function of a connection that
is inside the caller's BEGIN IMMEDIATE: an upgrade is one transaction, so a crash or an error in the
middle leaves the old file exactly as it was, and two processes opening an old file at once upgrade
it once (the second one finds the new version). Never edit a migration that has shipped; add one.

History
- 1: api_keys, ledger (one row per request), schema_version.
- 2: api_keys.owner_id, the first key of each key's rotation chain (quotas are shared along a chain);
  filled in for existing keys by following rotated_from. The ledger statuses "running" and
  "interrupted" (crash-safe accounting, ledger.py), with a partial index on the running rows that
  start-up recovery reads. An older Muse would fail on those statuses, which is why it must refuse a
  version-2 file (it does: it reads the version first).
- 3: admin_keys, the operator credentials (sha256 hashes, like api_keys): the row "admin_bootstrap"
  mirrors the server's admin key (MUSE_ADMIN_KEY / --admin-key-file) at every start.
- 4: ledger.replica, the `muse serve --replica-name` that served a request (NULL for one server alone);
  the PostgreSQL store (pgschema.py) starts at this version, with the same tables plus its own.
Stdlib only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

SCHEMA_VERSION = 4

_V1 = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id       TEXT PRIMARY KEY,
        key_hash     TEXT NOT NULL,        -- sha256 hex of the key text (the text is never stored)
        partner      TEXT NOT NULL,
        models       TEXT,                 -- JSON list of model names, NULL = every served model
        rpm          INTEGER,              -- NULL = unlimited
        tpm          INTEGER,
        token_quota  INTEGER,
        period       TEXT,                 -- 'day' | 'month' (UTC calendar), set iff token_quota is
        expires_at   REAL,
        created_at   REAL NOT NULL,
        revoked_at   REAL,
        rotated_from TEXT
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS api_keys_hash ON api_keys (key_hash)",
    """CREATE TABLE IF NOT EXISTS ledger (
        request_id        TEXT PRIMARY KEY,   -- exactly one row per request
        key_id            TEXT NOT NULL,
        partner           TEXT NOT NULL,
        model             TEXT NOT NULL,
        endpoint          TEXT NOT NULL,
        prompt_tokens     INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cached_tokens     INTEGER NOT NULL,
        status            TEXT NOT NULL,
        http_status       INTEGER NOT NULL,
        finish_reason     TEXT,
        created_at        REAL NOT NULL,
        latency_s         REAL NOT NULL,
        ttft_s            REAL
    )""",
    "CREATE INDEX IF NOT EXISTS ledger_key_time ON ledger (key_id, created_at)",
    "CREATE INDEX IF NOT EXISTS ledger_partner_time ON ledger (partner, created_at)",
    "CREATE INDEX IF NOT EXISTS ledger_time ON ledger (created_at)",   # `muse usage --since` over all partners
)


def _to_v1(c: sqlite3.Connection) -> None:
    for stmt in _V1:
        c.execute(stmt)


def chain_root(parents: dict[str, str | None], key_id: str) -> str:
    """The first key of `key_id`'s rotation chain, given key_id -> rotated_from. A predecessor missing
    from `parents` (deleted by hand) is still the root: its ledger rows belong to the chain. Cycle-safe."""
    seen = {key_id}
    while True:
        parent = parents.get(key_id)
        if parent is None or parent in seen:
            return key_id
        seen.add(parent)
        key_id = parent


def _to_v2(c: sqlite3.Connection) -> None:
    # Nullable, because ALTER TABLE cannot add a NOT NULL column without a default; Store always sets it.
    c.execute("ALTER TABLE api_keys ADD COLUMN owner_id TEXT")
    parents = dict(c.execute("SELECT key_id, rotated_from FROM api_keys").fetchall())
    c.executemany("UPDATE api_keys SET owner_id = ? WHERE key_id = ?",
                  [(chain_root(parents, k), k) for k in parents])
    c.execute("CREATE INDEX api_keys_owner ON api_keys (owner_id)")
    c.execute("CREATE INDEX ledger_running ON ledger (request_id) WHERE status = 'running'")


def _to_v3(c: sqlite3.Connection) -> None:
    c.execute("""CREATE TABLE admin_keys (
        admin_id   TEXT PRIMARY KEY,
        key_hash   TEXT NOT NULL,          -- sha256 hex of the credential (the text is never stored)
        label      TEXT NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL
    )""")
    c.execute("CREATE UNIQUE INDEX admin_keys_hash ON admin_keys (key_hash)")


def _to_v4(c: sqlite3.Connection) -> None:
    c.execute("ALTER TABLE ledger ADD COLUMN replica TEXT")


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _to_v1, 2: _to_v2, 3: _to_v3, 4: _to_v4}
assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))


def file_version(c: sqlite3.Connection) -> int:
    """The schema version of the open database; 0 for a new (empty) file."""
    if c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone() is None:
        return 0
    return c.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]


def upgrade(c: sqlite3.Connection, version: int) -> None:
    """Run the migrations after `version` up to SCHEMA_VERSION and record it; the caller holds the
    transaction (BEGIN IMMEDIATE) and commits or rolls back all of it."""
    for v in range(version + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[v](c)
    c.execute("DELETE FROM schema_version")
    c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
