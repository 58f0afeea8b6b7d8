"""The PostgreSQL serving database, for several `muse serve` replicas behind one load balancer: the
same tables and Store interface as SQLite (sqlstore.py), plus what replicas must agree on.

    muse serve runs/x --db postgresql://muse@db/muse --replica-name a --port 8000
    muse serve runs/x --db postgresql://muse@db/muse --replica-name b --port 8001

Replicas and leases. Each server registers its --replica-name in `replicas` with a lease
(LEASE_S, in the database's clock) and renews it every LEASE_S / 3 from a heartbeat thread, which also
writes the replica's live engine state (JSON) for the operator's view of every replica. A name held
by a live lease is refused to a second server, as the SQLite store's flock refuses a second server.
A replica that stops renewing (SIGKILL, a dead machine, a stall longer than the lease) is dead once
its lease expires: its quota holds stop counting at that moment, and the next sweep by any replica
(every heartbeat, and at start-up: `recover_interrupted`) turns its "running" ledger rows into
"interrupted" ones, exactly as a restarted SQLite server does with its own, and deletes its holds.

Quotas are exact across replicas. Before admission a request calls muse_reserve() (pgschema.py): one
round trip that, under a per-owner advisory lock, adds the owner's settled usage this period
(quota_usage, kept by a trigger in step with the ledger) and the live holds of every replica, and
inserts this request's hold only if the sum stays within the quota. The hold is deleted in the same
transaction that commits the request's settled ledger row (whose trigger adds the real tokens to
quota_usage), so at no instant is a request counted neither as held nor as used; a request refused
before it began releases its hold at once. What a quota check cannot see is a settled row no replica
has written yet (the writer's queue, milliseconds): its hold still counts, so it errs on the safe side.
Holds commit asynchronously (synchronous_commit off, see __init__): a crash of PostgreSQL itself may
lose the last milliseconds of holds, never a ledger row.

Keys: one round trip per generation request. `admit` is one statement (_ADMIT) that reads the key's
row again and calls muse_reserve() only for a key still active and with a quota, under the quota and
period the row holds now. Because of it, `authenticate(cached=True)` (what the generation routes ask
for) may answer from this replica's memory for AUTH_CACHE_S: a key revoked or expired anywhere is still
refused before it generates a token (at admission instead of at the door), and a quota change still
applies to the next request; a change of models, rpm or tpm reaches this replica within AUTH_CACHE_S,
or at the next admission on that key, which refreshes the cached copy. Other routes read the key on
every request. Why: the key's look-up was one of two round trips per request, and under load each
round trip costs milliseconds of waiting for a CPU (BENCHMARKS.md, section 7).

Rate limits (rpm, tpm) are a per-replica share, not shared buckets: each replica enforces
limit // (live replicas) (at least 1), counted in its own memory as with one server (limits.py). With
a load balancer that spreads a key's requests evenly, the key gets its full limit; a client pinned to
one replica gets 1/N of it; the sum over replicas never exceeds the limit (unless the limit is below
the number of replicas, when each replica allows 1). Why not buckets in the database: a rate limit
smooths load, it does not bill; a round trip per request (two with tpm) would double the store's time
per request for an accuracy nobody is billed on. The quota, which bills, is exact.

The ledger writer (ledger.py) commits batches over its own connection; reads and key operations use a
connection pool (psycopg_pool). A URL's password is never printed (`safe_url`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
from psycopg_pool import ConnectionPool

from muse.common.logging import get_logger
from muse.server import pgschema
from muse.server.keys import hash_key
from muse.server.ledger import REC_FIELDS, LedgerWriter
from muse.server.limits import QuotaExceeded, RateLimiter, _quota_error, _QuotaState, period_end
from muse.server.records import ApiKey, UsageRecord
from muse.server.schema import SCHEMA_VERSION
from muse.server.sqlstore import CLOSE_TIMEOUT_S, AuthError, SqlStore, StoreError, timed

log = get_logger("muse.server.store")

LEASE_S = 15.0          # a dead replica's holds stop counting, and its rows are settled, within this
POOL_SIZE = 8           # connections for reads and key operations (the ledger writer has its own)
CONNECT_TIMEOUT_S = 10
DEAD_KEPT_S = 86400.0   # a dead replica's row stays in the operator's view this long
AUTH_CACHE_S = 5.0      # a generation request's key is read from the database at most this often (module docstring)
AUTH_CACHE_MAX = 4096   # keys cached per replica; when full, the cache starts again from empty
_SWEEP_LOCK = 0x6D757366
_ADMIN_LOCK = 0x6D757367  # pg_advisory_xact_lock key of the bootstrap admin key's writes

_UPSERT = (f"INSERT INTO ledger ({', '.join(REC_FIELDS)}) VALUES ({', '.join(['%s'] * len(REC_FIELDS))}) "
           "ON CONFLICT (request_id) DO UPDATE SET "
           + ", ".join(f"{f} = excluded.{f}" for f in REC_FIELDS if f != "request_id")
           + " WHERE ledger.status = 'running' RETURNING request_id")
_LIVE = "SELECT name FROM replicas WHERE lease_until > muse_now()"

# A request's admission in one round trip: the key's row as it is now (revoked? expired? its quota and
# period changed?) and, only for an active key with a quota, muse_reserve() under that quota. A CASE
# evaluates a branch only when it is taken (the correlated subquery runs per row, on demand), so a
# revoked or expired key never takes a hold; test_store_contract.py checks that it leaves none.
_ADMIT = (
    "SELECT k.models, k.rpm, k.tpm, k.token_quota, k.period, k.expires_at, k.revoked_at, "
    "CASE WHEN k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > %(now)s) AND k.token_quota IS NOT NULL "
    "THEN (SELECT ARRAY[r.admitted::int, r.used, r.held] FROM muse_reserve(%(request)s, COALESCE(k.owner_id, k.key_id), "
    "%(replica)s, %(tokens)s, k.token_quota, "
    "CASE k.period WHEN 'day' THEN %(day)s WHEN 'month' THEN %(month_first)s ELSE 0 END, "
    "CASE k.period WHEN 'day' THEN %(day)s + 1 WHEN 'month' THEN %(month_end)s ELSE %(forever)s END) AS r) END "
    "FROM api_keys AS k WHERE k.key_id = %(key)s")


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"^([a-z]+://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _database_error(e: BaseException) -> bool:
    """True for a failure of the database or the connection (retry the rows), False for one of a row."""
    if isinstance(e, StoreError):
        return True
    return isinstance(e, psycopg.Error) and not isinstance(
        e, psycopg.DataError | psycopg.IntegrityError | psycopg.ProgrammingError)


def _q(sql: str) -> str:
    return sql.replace("?", "%s")  # the shared SQL's placeholders (no literal ? or % in it)


class _Txn:
    """A psycopg cursor that speaks the shared SQL: execute(sql with ?, params) -> the cursor."""

    for_update = " FOR UPDATE"  # sqlstore.SqlStore._locked_key: key edits take the row's lock

    def __init__(self, cur):
        self.cur = cur

    def execute(self, sql: str, params=()):
        self.cur.execute(_q(sql), list(params))
        return self.cur


class _WriterConn:
    """The ledger writer's connection, opened again when the server dropped it (a restart, a network
    cut): the writer keeps one object for its life, so it must heal itself."""

    def __init__(self, open_conn: Callable[[], psycopg.Connection]):
        self._open = open_conn
        self.conn: psycopg.Connection | None = None

    def get(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed or self.conn.broken:
            if self.conn is not None:
                self.conn.close()
            self.conn = self._open()
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class PgStore(SqlStore):
    """Keys, the ledger, replicas and quota holds in one PostgreSQL database. See the module docstring.

    `replica`: this server's name (`muse serve --replica-name`), needed by lock_for_server; the CLI
    opens the store without one. `lease_s`: how long this replica's holds outlive its last heartbeat.
    """

    kind = "postgresql"

    def __init__(self, url: str, *, create: bool = True, clock: Callable[[], float] = time.time,
                 replica: str | None = None, lease_s: float = LEASE_S, pool_size: int = POOL_SIZE):
        self.url = url
        self.where = safe_url(url)
        self._clock = clock
        self.replica = replica
        if not lease_s > 0:
            raise StoreError(f"the replica lease must be positive seconds, got {lease_s!r}")
        self.lease_s = float(lease_s)
        with self._open() as conn:
            self._init_schema(conn, create)
        # Pool sessions commit asynchronously (synchronous_commit off): what they write alone is a quota
        # hold, soft state bounded by a lease. A hold committed synchronously waits for the WAL's fsync
        # while muse_reserve's per-owner lock is held: measured on this project's 2-core VM, that capped
        # one owner's admissions at ~45/s and put the store's p50 at 40 ms (BENCHMARKS.md). What must
        # survive a crash of PostgreSQL commits synchronously: key and replica writes (_write_txn sets it
        # back on) and the ledger (its writer has its own connection). A PostgreSQL crash can then lose
        # the holds of the last few milliseconds: those requests run unreserved, never unbilled.
        self._pool = ConnectionPool(url, min_size=2, max_size=pool_size, open=True, timeout=CONNECT_TIMEOUT_S,
                                    kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S,
                                            "options": "-c synchronous_commit=off"},
                                    name="muse-store")
        self._writer_conn = _WriterConn(self._open)
        self._ledger = LedgerWriter(lambda: self._writer_conn, clock, commit=self._commit_rows,
                                    database_error=_database_error)
        self._registered = False
        self._state_fn: Callable[[], dict] | None = None
        self._live_count = 1
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._close_lock = threading.Lock()
        self._closed = False
        self.lost_lease = 0                      # times a heartbeat found this replica's lease gone
        self._auth_cache: dict[str, tuple[ApiKey, float]] = {}   # sha256 of a key -> (key, good until, monotonic)
        self._auth_lock = threading.Lock()

    # ---- opening -------------------------------------------------------------------------------------------
    def _open(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StoreError(f"cannot connect to the serving database {self.where}: {first}; check the URL "
                             f"(postgresql://USER[:PASSWORD]@HOST[:PORT]/DB) and that PostgreSQL is running") from None

    def _init_schema(self, conn: psycopg.Connection, create: bool) -> None:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (pgschema.SCHEMA_LOCK,))
            version = pgschema.db_version(cur)
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.where} was written by a newer Muse (schema {version}, this one reads "
                                 f"{SCHEMA_VERSION}); upgrade Muse")
            if version == 0 and not create:
                raise StoreError(f"no Muse serving tables in {self.where}; create a key first (`muse keys create "
                                 f"--partner NAME --db URL`) or pass the right --db")
            if version < SCHEMA_VERSION:
                pgschema.upgrade(cur, version)
                log.info("%s the serving database %s at schema %d", "upgraded" if version else "created",
                         self.where, SCHEMA_VERSION)

    def close(self, timeout: float | None = CLOSE_TIMEOUT_S) -> bool:
        """Stop the heartbeat, write the ledger's pending rows, give up the lease (this replica's holds
        go with it: every settled row is written by then), close the connections. Idempotent."""
        with self._close_lock:
            if self._closed:
                return True
            self._closed = True
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(10)
        ok = self._ledger.close(timeout)
        if self._registered:
            with contextlib.suppress(psycopg.Error, StoreError), self._write_txn() as c:
                c.execute("DELETE FROM quota_holds WHERE replica = ?", (self.replica,))
                c.execute("UPDATE replicas SET lease_until = muse_now(), heartbeat_at = muse_now() WHERE name = ? "
                          "AND pid = ? AND host = ?", (self.replica, os.getpid(), socket.gethostname()))
        self._writer_conn.close()
        self._pool.close()
        return ok

    # ---- primitives ------------------------------------------------------------------------------------------
    def _rows(self, sql, params=()):
        with timed("read"), self._pool.connection() as conn:
            return conn.execute(_q(sql), list(params)).fetchall()

    def _serialize_admin_writes(self, c) -> None:
        # Replicas starting at once each upsert the bootstrap admin row. Under read committed, ON CONFLICT
        # (admin_id) covers only its own index: the second insert could still fail on admin_keys_hash
        # (same key, same hash) before it saw the first one's row. One writer at a time.
        c.execute("SELECT pg_advisory_xact_lock(?)", (_ADMIN_LOCK,))

    @contextlib.contextmanager
    def _write_txn(self):
        with timed("write"), self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute("SET LOCAL synchronous_commit = on")  # keys, admins, replicas: durable (see __init__)
            yield _Txn(cur)

    @contextlib.contextmanager
    def _snapshot(self):
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield _Txn(cur)

    # ---- the ledger writer's transaction -----------------------------------------------------------------
    @staticmethod
    def _commit_rows(wconn: _WriterConn, rows: list[UsageRecord]) -> list[str]:
        """Upsert the rows and release the quota holds of the settled ones, in one transaction. Rows go
        in key order: two replicas' batches then lock quota_usage rows in (mostly) the same order; a
        deadlock left is detected by PostgreSQL and retried by the writer like any database error."""
        conn = wconn.get()
        rows = sorted(rows, key=lambda r: (r.key_id, r.request_id))
        written: set[str] = set()
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(_UPSERT, [[getattr(r, f) for f in REC_FIELDS] for r in rows], returning=True)
            while True:
                written.update(row[0] for row in cur.fetchall())
                if not cur.nextset():
                    break
            settled = [r.request_id for r in rows if r.status != "running"]
            if settled:
                cur.execute("DELETE FROM quota_holds WHERE request_id = ANY(%s)", (settled,))
        return [rid for rid in settled if rid not in written]

    # ---- replicas ------------------------------------------------------------------------------------------------
    def lock_for_server(self) -> None:
        """Register this replica under its name with a fresh lease, or StoreError when a live replica
        holds the name. A name whose lease expired is taken over: what its previous holder left running
        is settled as interrupted and its holds are deleted, in the same transaction. Starts the
        heartbeat. Idempotent."""
        if self._registered:
            return
        if not self.replica:
            raise StoreError("a server on the PostgreSQL store needs a replica name (muse serve --replica-name NAME)")
        me = (self.replica, os.getpid(), socket.gethostname())
        with self._write_txn() as c:
            c.execute("SELECT pg_advisory_xact_lock(?)", (_SWEEP_LOCK,))
            taken = c.execute(
                "INSERT INTO replicas (name, pid, host, started_at, heartbeat_at, lease_until) "
                "VALUES (?, ?, ?, muse_now(), muse_now(), muse_now() + ?) ON CONFLICT (name) DO UPDATE SET "
                "pid = excluded.pid, host = excluded.host, started_at = excluded.started_at, "
                "heartbeat_at = excluded.heartbeat_at, lease_until = excluded.lease_until, state = NULL "
                "WHERE replicas.lease_until <= muse_now() RETURNING name", (*me, self.lease_s)).fetchall()
            if not taken:
                pid, host = c.execute("SELECT pid, host FROM replicas WHERE name = ?", (self.replica,)).fetchone()
                raise StoreError(f"another muse serve (pid {pid} on {host}) is serving {self.where} as replica "
                                 f"{self.replica!r}; give this one another --replica-name, or stop that one")
            c.execute("UPDATE ledger SET status = 'interrupted' WHERE status = 'running' AND replica = ?",
                      (self.replica,))
            c.execute("DELETE FROM quota_holds WHERE replica = ?", (self.replica,))
        self._registered = True
        self._refresh_live()
        self._heartbeat = threading.Thread(target=self._beat_loop, name="muse-replica-heartbeat", daemon=True)
        self._heartbeat.start()

    def recover_interrupted(self) -> int:
        """Settle the "running" rows of every replica whose lease expired as "interrupted" (billed what
        their last committed write knew, as after an SQLite server's crash), and delete their holds;
        returns how many rows. Every replica runs this at start-up and with each heartbeat."""
        if not self._registered:
            raise RuntimeError("recover_interrupted() needs lock_for_server() first: the sweep runs as a "
                               "replica with a live lease")
        with self._write_txn() as c:
            c.execute("SELECT pg_advisory_xact_lock(?)", (_SWEEP_LOCK,))
            ids = c.execute(f"UPDATE ledger SET status = 'interrupted' WHERE status = 'running' AND "
                            f"(replica IS NULL OR replica NOT IN ({_LIVE})) RETURNING request_id").fetchall()
            c.execute(f"DELETE FROM quota_holds WHERE replica NOT IN ({_LIVE})")
            c.execute("DELETE FROM replicas WHERE lease_until < muse_now() - ?", (DEAD_KEPT_S,))
        if ids:
            log.warning("settled %d requests of dead replicas as 'interrupted' (docs/serving.md)", len(ids))
        return len(ids)

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.heartbeat()
                self.recover_interrupted()
            except Exception as e:  # noqa: BLE001 - the database may be down for a while: keep beating
                log.error("replica %s: heartbeat failed (%s); retrying in %.1f s", self.replica, e, self.lease_s / 3)

    def heartbeat(self) -> None:
        """Renew this replica's lease and publish its state. A lease found taken (this process stalled
        past it and the name was reused, or the row was deleted) is logged; the name is claimed again
        if it is free."""
        state = None
        if self._state_fn is not None:
            try:
                state = json.dumps(self._state_fn(), default=str)
            except Exception:  # noqa: BLE001 - a state snapshot must not stop the lease
                log.exception("replica %s: reading the engine state failed", self.replica)
        me = (self.replica, os.getpid(), socket.gethostname())
        with self._write_txn() as c:
            ok = c.execute("UPDATE replicas SET heartbeat_at = muse_now(), lease_until = muse_now() + ?, "
                           "state = COALESCE(?, state) WHERE name = ? AND pid = ? AND host = ? "
                           "AND lease_until > muse_now() RETURNING name", (self.lease_s, state, *me)).fetchall()
        if not ok:
            self.lost_lease += 1
            log.error("replica %s: its lease had expired (stalled longer than %.1f s?); its running requests may "
                      "have been settled as interrupted by another replica; claiming the name again",
                      self.replica, self.lease_s)
            self._registered = False
            with contextlib.suppress(StoreError):
                self._claim_again()
        self._refresh_live()

    def _claim_again(self) -> None:
        me = (self.replica, os.getpid(), socket.gethostname())
        with self._write_txn() as c:
            c.execute("INSERT INTO replicas (name, pid, host, started_at, heartbeat_at, lease_until) "
                      "VALUES (?, ?, ?, muse_now(), muse_now(), muse_now() + ?) ON CONFLICT (name) DO UPDATE SET "
                      "pid = excluded.pid, host = excluded.host, heartbeat_at = excluded.heartbeat_at, "
                      "lease_until = excluded.lease_until WHERE replicas.lease_until <= muse_now() "
                      "OR (replicas.pid = excluded.pid AND replicas.host = excluded.host)", (*me, self.lease_s))
        self._registered = True

    def _refresh_live(self) -> None:
        self._live_count = max(1, int(self._rows(f"SELECT COUNT(*) FROM ({_LIVE}) AS live")[0][0]))

    def live_replicas(self) -> int:
        """Replicas holding a live lease at the last heartbeat (at least 1): the rate limits' divisor."""
        return self._live_count

    def report_state(self, state: Callable[[], dict]) -> None:
        self._state_fn = state

    def replicas(self) -> list[dict]:
        rows = self._rows("SELECT name, pid, host, started_at, heartbeat_at, lease_until, state, muse_now() "
                          "FROM replicas ORDER BY name")
        return [{"name": n, "pid": pid, "host": host, "started_at": started, "heartbeat_at": beat,
                 "lease_until": until, "alive": until > now, "this": n == self.replica,
                 "state": json.loads(state) if state else None}
                for n, pid, host, started, beat, until, state, now in rows]

    # ---- quotas ----------------------------------------------------------------------------------------------------
    def make_quotas(self) -> SharedQuotas:
        return SharedQuotas(self)

    def make_limiter(self) -> RateLimiter:
        return RateLimiter(share=self.live_replicas)

    def admit(self, key: ApiKey, request_id: str, tokens: int, now: float) -> tuple[ApiKey, tuple[bool, int, int] | None]:
        """A request's admission, one round trip (_ADMIT): `key` as the database holds it at `now` and,
        when that key is active and has a quota, muse_reserve()'s (admitted, used this period, held by
        live requests before this one) for `tokens` under its current quota; None when no hold was
        asked for. The cached key of authenticate(cached=True) is refreshed from the row.
        AuthError("invalid") when the key is no longer in the database."""
        if not self._registered:
            raise RuntimeError("admit() needs lock_for_server() first: holds belong to a replica's lease")
        day, month_first, month_end = _calendar_days(now)
        with timed("admit"), self._pool.connection() as conn:
            row = conn.execute(_ADMIT, {"now": now, "request": request_id, "replica": self.replica, "tokens": tokens,
                                        "day": day, "month_first": month_first, "month_end": month_end,
                                        "forever": 2**62, "key": key.key_id}).fetchone()
        if row is None:
            self._cache_key(key.key_id, None)
            raise AuthError("invalid")
        models, rpm, tpm, quota, period, expires_at, revoked_at, outcome = row
        fresh = dataclasses.replace(key, models=None if models is None else tuple(json.loads(models)), rpm=rpm, tpm=tpm,
                                    token_quota=quota, period=period, expires_at=expires_at, revoked_at=revoked_at)
        if fresh != key:
            self._cache_key(key.key_id, fresh if fresh.status(now) == "active" else None)
        return fresh, None if outcome is None else (bool(outcome[0]), int(outcome[1]), int(outcome[2]))

    # ---- keys: a short-lived cache for generation requests -----------------------------------------------------
    def authenticate(self, key_text: str, *, now: float | None = None, cached: bool = False) -> ApiKey:
        """SqlStore.authenticate; with `cached`, a key read from the database less than AUTH_CACHE_S ago
        is taken from this replica's memory (its expiry still checked against `now`). Only for a request
        that then goes through admit(), which reads the key again in the same round trip as its quota
        hold: a key revoked or expired on any replica is refused there, before it generates anything."""
        if not cached:
            return super().authenticate(key_text, now=now)
        digest = hash_key(key_text)
        hit = self._auth_cache.get(digest)
        if hit is not None and hit[1] > time.monotonic():
            key = hit[0]
            status = key.status(self._now(now))
            if status != "active":
                raise AuthError(status, key.key_id)
            return key
        key = super().authenticate(key_text, now=now)
        with self._auth_lock:
            if len(self._auth_cache) >= AUTH_CACHE_MAX:
                self._auth_cache.clear()  # bounded memory; the keys in use come back on their next request
            self._auth_cache[digest] = (key, time.monotonic() + AUTH_CACHE_S)
        return key

    def _cache_key(self, key_id: str, fresh: ApiKey | None) -> None:
        """admit() found `key_id` changed in the database: cache its new version (None: forget it)."""
        with self._auth_lock:
            for digest, (k, until) in list(self._auth_cache.items()):
                if k.key_id == key_id:
                    if fresh is None:
                        del self._auth_cache[digest]
                    else:
                        self._auth_cache[digest] = (fresh, until)

    def settle_hold(self, request_id: str) -> None:
        """The request is over. Begun requests release their hold with their settled ledger row (the
        writer's transaction); a request that never began (refused while waiting for admission) has
        no row coming, so its hold is deleted now."""
        if request_id in self._ledger.active_ids():
            return
        with timed("release"), self._pool.connection() as conn:
            conn.execute("DELETE FROM quota_holds WHERE request_id = %s", (request_id,))

    def quota_state(self, owner: str, first_day: int, end_day: int) -> tuple[int, int]:
        """(used this period, held by live requests) for an owner, without reserving."""
        row = self._rows(f"SELECT (SELECT COALESCE(SUM(tokens), 0) FROM quota_usage WHERE owner_id = ? AND day >= ? "
                         f"AND day < ?), (SELECT COALESCE(SUM(tokens), 0) FROM quota_holds WHERE owner_id = ? AND "
                         f"replica IN ({_LIVE}))", (owner, first_day, end_day, owner))[0]
        return int(row[0]), int(row[1])


def _calendar_days(now: float) -> tuple[int, int, int]:
    """UTC day numbers at `now`: today, the first day of this month, the first day of the next (the
    bounds _ADMIT picks from by the key's period, as ApiKey.period_start/period_end draw them)."""
    d = datetime.fromtimestamp(now, UTC)
    first = datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()
    return int(now // 86400), int(first // 86400), int(period_end("month", first) // 86400)


def _days(key: ApiKey, now: float) -> tuple[int, int, float]:
    start, end = key.period_start(now), key.period_end(now)
    if start is None:  # a quota without a period (the store refuses one): all time
        return 0, 2**62, 0.0
    return int(start // 86400), int(end // 86400), start


class SharedReservation:
    """A request's hold on its owner's quota, in the database (limits.Reservation's interface)."""

    def __init__(self, store: PgStore, request_id: str, key_id: str, owner: str, tokens: int):
        self._store, self.request_id = store, request_id
        self.key_id, self.owner, self.tokens = key_id, owner, tokens
        self.settled = False

    def settle(self, actual_tokens: int) -> None:
        """The real tokens reach the quota through the ledger row (the trigger); this releases the hold.
        Idempotent; never raises (the hold then lapses with the lease, or when this replica closes)."""
        if self.settled:
            return
        self.settled = True
        if actual_tokens > self.tokens:
            log.warning("key %s used %d tokens but reserved only %d", self.key_id, actual_tokens, self.tokens)
        try:
            self._store.settle_hold(self.request_id)
        except Exception as e:  # noqa: BLE001 - accounting goes on; the hold lapses with the lease
            log.error("releasing the quota hold of %s failed (%s); it lapses when this replica closes",
                      self.request_id, e)


class SharedQuotas:
    """limits.QuotaManager's interface over PgStore: the check and the hold are one muse_reserve() call,
    so replicas admitting the same owner's requests at once can never overspend (module docstring)."""

    def __init__(self, store: PgStore, clock: Callable[[], float] = time.time):
        self._store, self._clock = store, clock

    def reserve(self, key: ApiKey, tokens: int, request_id: str | None = None) -> SharedReservation | None:
        """Admit a request on `key` (PgStore.admit: one round trip): AuthError when the key has been revoked
        or has expired meanwhile (on any replica), None when it has no quota, QuotaExceeded when the
        quota cannot hold `tokens`. The key's quota and period are the database's, not the caller's copy."""
        if tokens < 0:
            raise ValueError(f"a request reserves >= 0 tokens, got {tokens}")
        if not request_id:
            raise ValueError("a shared quota reservation needs the request's id (its hold's key)")
        now = self._clock()
        fresh, outcome = self._store.admit(key, request_id, tokens, now)
        status = fresh.status(now)
        if status != "active":
            raise AuthError(status, fresh.key_id)
        if fresh.token_quota is None:
            return None
        admitted, used, held = outcome
        if not admitted:
            state = _QuotaState(_days(fresh, now)[2], used)
            state.in_flight = held
            raise _quota_error(fresh, fresh.token_quota, state, tokens)
        return SharedReservation(self._store, request_id, fresh.key_id, self._store.quota_owner(fresh), tokens)

    def remaining(self, key: ApiKey) -> int | None:
        if key.token_quota is None:
            return None
        first, end, _ = _days(key, self._clock())
        used, held = self._store.quota_state(self._store.quota_owner(key), first, end)
        return max(0, key.token_quota - used - held)


__all__ = ["LEASE_S", "PgStore", "QuotaExceeded", "SharedQuotas", "safe_url"]
