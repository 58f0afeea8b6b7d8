"""The PostgreSQL serving database's tables and functions, and the migrations that bring it to
SCHEMA_VERSION (the same number as the SQLite file's, schema.py: one schema history for both).

The shared tables are SQLite's (schema.py), column for column, with PostgreSQL types: times are
DOUBLE PRECISION epoch seconds, counts BIGINT. A PostgreSQL database starts at version 4 (the first
version this store exists in); later versions add a migration here AND in schema.py. Like schema.py,
an upgrade runs inside the caller's transaction, which first takes an advisory lock, so replicas
starting together upgrade once and a failed upgrade leaves the old schema.

What only several replicas need:
- replicas: one row per `muse serve --replica-name`, with a lease (`lease_until`, in the database's
  clock, so replicas on machines whose clocks disagree still agree on it) that the replica renews
  with each heartbeat, and its live engine state (JSON) for the operator's view.
- quota_holds: one row per request in flight on a key with a quota, holding prompt + max_tokens x n
  of its owner's quota; it belongs to a replica and counts only while that replica's lease is live.
  The ledger writer deletes it in the transaction that commits the request's settled row.
- quota_usage: tokens of settled ledger rows per quota owner per UTC day, kept by a trigger on the
  ledger in the same transaction as the row, so it always equals the ledger; a day or month quota
  sums at most 31 rows instead of scanning the ledger.
- muse_reserve(): the atomic admission check (advisory lock per owner; used + live holds + request
  <= quota; insert the hold), one round trip. VOLATILE plpgsql: each statement in it takes a fresh
  snapshot, so it sees the holds and usage that the previous holder of the lock committed.
"""

from __future__ import annotations

from collections.abc import Callable

from muse.server.schema import SCHEMA_VERSION

FIRST_VERSION = 4
SCHEMA_LOCK = 0x6D757365  # pg_advisory_xact_lock key of schema upgrades ("muse")

_V4 = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE api_keys (
        key_id       TEXT PRIMARY KEY,
        key_hash     TEXT NOT NULL,
        partner      TEXT NOT NULL,
        models       TEXT,
        rpm          BIGINT,
        tpm          BIGINT,
        token_quota  BIGINT,
        period       TEXT,
        expires_at   DOUBLE PRECISION,
        created_at   DOUBLE PRECISION NOT NULL,
        revoked_at   DOUBLE PRECISION,
        rotated_from TEXT,
        owner_id     TEXT
    )""",
    "CREATE UNIQUE INDEX api_keys_hash ON api_keys (key_hash)",
    "CREATE INDEX api_keys_owner ON api_keys (owner_id)",
    """CREATE TABLE ledger (
        request_id        TEXT PRIMARY KEY,
        key_id            TEXT NOT NULL,
        partner           TEXT NOT NULL,
        model             TEXT NOT NULL,
        endpoint          TEXT NOT NULL,
        prompt_tokens     BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cached_tokens     BIGINT NOT NULL,
        status            TEXT NOT NULL,
        http_status       INTEGER NOT NULL,
        finish_reason     TEXT,
        created_at        DOUBLE PRECISION NOT NULL,
        latency_s         DOUBLE PRECISION NOT NULL,
        ttft_s            DOUBLE PRECISION,
        replica           TEXT
    )""",
    "CREATE INDEX ledger_key_time ON ledger (key_id, created_at)",
    "CREATE INDEX ledger_partner_time ON ledger (partner, created_at)",
    "CREATE INDEX ledger_time ON ledger (created_at)",
    "CREATE INDEX ledger_running ON ledger (replica) WHERE status = 'running'",
    """CREATE TABLE admin_keys (
        admin_id   TEXT PRIMARY KEY,
        key_hash   TEXT NOT NULL,
        label      TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    )""",
    "CREATE UNIQUE INDEX admin_keys_hash ON admin_keys (key_hash)",
    """CREATE TABLE replicas (
        name         TEXT PRIMARY KEY,
        pid          INTEGER NOT NULL,
        host         TEXT NOT NULL,
        started_at   DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL,
        lease_until  DOUBLE PRECISION NOT NULL,   -- the database's clock (muse_now())
        state        TEXT                         -- JSON: admission and engine counters at the heartbeat
    )""",
    """CREATE TABLE quota_holds (
        request_id TEXT PRIMARY KEY,
        owner_id   TEXT NOT NULL,
        replica    TEXT NOT NULL,
        tokens     BIGINT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX quota_holds_owner ON quota_holds (owner_id)",
    "CREATE INDEX quota_holds_replica ON quota_holds (replica)",
    """CREATE TABLE quota_usage (
        owner_id TEXT NOT NULL,
        day      BIGINT NOT NULL,                 -- UTC day number: floor(created_at / 86400)
        tokens   BIGINT NOT NULL,
        PRIMARY KEY (owner_id, day)
    )""",
    """CREATE FUNCTION muse_now() RETURNS DOUBLE PRECISION LANGUAGE sql VOLATILE AS
       $$ SELECT extract(epoch FROM clock_timestamp())::double precision $$""",
    # A ledger row counts towards its owner's quota once, when it is settled (inserted settled, or
    # updated from "running"); the ledger upsert never rewrites a settled row, so nothing counts twice.
    """CREATE FUNCTION muse_count_usage() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.status <> 'running' AND (TG_OP = 'INSERT' OR OLD.status = 'running')
           AND NEW.prompt_tokens + NEW.completion_tokens > 0 THEN
            INSERT INTO quota_usage (owner_id, day, tokens)
            VALUES (COALESCE((SELECT owner_id FROM api_keys WHERE key_id = NEW.key_id), NEW.key_id),
                    floor(NEW.created_at / 86400)::bigint, NEW.prompt_tokens + NEW.completion_tokens)
            ON CONFLICT (owner_id, day) DO UPDATE SET tokens = quota_usage.tokens + excluded.tokens;
        END IF;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER ledger_usage AFTER INSERT OR UPDATE ON ledger FOR EACH ROW EXECUTE FUNCTION muse_count_usage()",
    """CREATE FUNCTION muse_reserve(p_request TEXT, p_owner TEXT, p_replica TEXT, p_tokens BIGINT, p_quota BIGINT,
                                    p_first_day BIGINT, p_end_day BIGINT)
       RETURNS TABLE (admitted BOOLEAN, used BIGINT, held BIGINT) LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        v_used BIGINT;
        v_held BIGINT;
    BEGIN
        PERFORM pg_advisory_xact_lock(hashtextextended(p_owner, 0));
        SELECT COALESCE(SUM(q.tokens), 0) INTO v_used FROM quota_usage q
         WHERE q.owner_id = p_owner AND q.day >= p_first_day AND q.day < p_end_day;
        SELECT COALESCE(SUM(h.tokens), 0) INTO v_held FROM quota_holds h JOIN replicas r ON r.name = h.replica
         WHERE h.owner_id = p_owner AND r.lease_until > muse_now();
        IF v_used + v_held + p_tokens > p_quota THEN
            RETURN QUERY SELECT false, v_used, v_held;
            RETURN;
        END IF;
        INSERT INTO quota_holds (request_id, owner_id, replica, tokens, created_at)
        VALUES (p_request, p_owner, p_replica, p_tokens, muse_now());
        RETURN QUERY SELECT true, v_used, v_held;
    END $$""",
)


def _to_v4(cur) -> None:
    for stmt in _V4:
        cur.execute(stmt)


# version -> migration; a new database runs every one from FIRST_VERSION (there is nothing before it)
MIGRATIONS: dict[int, Callable] = {4: _to_v4}
assert sorted(MIGRATIONS) == list(range(FIRST_VERSION, SCHEMA_VERSION + 1))


def db_version(cur) -> int:
    """The schema version of the database; 0 when it has no Muse tables yet."""
    cur.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    if not cur.fetchone()[0]:
        return 0
    cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
    return int(cur.fetchone()[0])


def upgrade(cur, version: int) -> None:
    """Run the migrations after `version` (0: a new database) up to SCHEMA_VERSION and record it; the
    caller holds the transaction and the schema lock."""
    for v in range(max(version + 1, FIRST_VERSION), SCHEMA_VERSION + 1):
        MIGRATIONS[v](cur)
    cur.execute("DELETE FROM schema_version")
    cur.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
