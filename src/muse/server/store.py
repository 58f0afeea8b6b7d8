"""The serving database (SQLite): API keys and the usage ledger, one file shared by the server and the CLI.

Keys: `muse keys create|revoke|rotate` write them from the CLI process, usually while the server runs;
the server only reads them, and reads them on every request, so a revocation takes effect at once.
Only the sha256 of a key's text is stored (server/keys.py says why that is enough); the public
`key_id` is what every list, ledger row and log line shows.

Ledger: exactly one row per request (request_id is the primary key). The server never waits on the
disk for it: `record()` puts the row on a queue and one writer thread, which owns the only ledger
write connection, commits whatever has queued up in one transaction. A crash loses at most the rows
queued and not yet committed. `flush()` waits for the queue; `close()` flushes and stops the thread.
Rows still queued count everywhere (`tokens_used`, `usage`, `usage_summary`), so a token quota can never
be undercounted because of the queue.

SQLite settings, and why:
- WAL journal: readers (authenticate, quota look-ups, `muse usage`) never wait for the ledger writer,
  and the writer never waits for them; only two writers (ledger batch, key admin) take turns.
- busy_timeout: the CLI's short key transactions and the writer's batches wait for each other instead
  of failing with "database is locked".
- synchronous=FULL: the ledger is a billing record; a commit survives a power cut. Batching keeps the
  cost to one fsync per batch, not per request.
- The file is created with mode 0600 (SQLite gives the -wal/-shm files the same mode): hashes are not
  keys, but the ledger is partner data.
- A `schema_version` table: a newer file opened by an older Muse is refused instead of misread.

Times are UTC epoch seconds (floats) everywhere; `parse_utc`/`utc_iso` (records.py) convert at the edges.
Torch-free, stdlib + muse.common only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from muse.common.errors import MuseError, UsageError, closest
from muse.common.logging import get_logger
from muse.server.keys import check_format, generate_key, hash_key, new_key_id
from muse.server.records import PERIODS, ApiKey, UsageRecord, utc_iso

log = get_logger("muse.server.store")

SCHEMA_VERSION = 1
_MAX_BATCH = 1024                          # ledger rows per transaction at most
_STOP_RETRIES = 3                          # failed commits tolerated during close() before rows are dropped

_SCHEMA = (
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


class StoreError(MuseError):
    """The serving database cannot be opened or used (missing, not SQLite, written by a newer Muse)."""


class AuthError(Exception):
    """A request's API key is not accepted. `reason` is "invalid", "revoked" or "expired".

    The message never contains any part of the key text; `key_id` is set for revoked and expired keys
    (it is public) so the server can log which key was refused.
    """

    REASONS = ("invalid", "revoked", "expired")

    def __init__(self, reason: str, key_id: str | None = None):
        assert reason in self.REASONS, reason
        self.reason, self.key_id = reason, key_id
        super().__init__({"invalid": "invalid API key",
                          "revoked": "this API key has been revoked",
                          "expired": "this API key has expired"}[reason])


_KEY_COLS = ", ".join(f.name for f in dataclasses.fields(ApiKey))
_KEY_INSERT = f"INSERT INTO api_keys (key_hash, {_KEY_COLS}) VALUES (?{', ?' * len(dataclasses.fields(ApiKey))})"
_REC_FIELDS = [f.name for f in dataclasses.fields(UsageRecord)]
_REC_COLS = ", ".join(_REC_FIELDS)
_REC_INSERT = f"INSERT OR IGNORE INTO ledger ({_REC_COLS}) VALUES ({', '.join('?' * len(_REC_FIELDS))})"


def _key_from_row(row: Sequence) -> ApiKey:
    k = ApiKey(*row)
    return dataclasses.replace(k, models=None if k.models is None else tuple(json.loads(k.models)))


def _key_params(key: ApiKey) -> list:
    vals = [getattr(key, f.name) for f in dataclasses.fields(ApiKey)]
    vals[2] = None if key.models is None else json.dumps(list(key.models))
    return vals


def default_db_path() -> Path:
    """$MUSE_SERVE_DB, else $MUSE_HOME/serve.sqlite3 with MUSE_HOME defaulting to ~/.muse."""
    if os.environ.get("MUSE_SERVE_DB"):
        return Path(os.environ["MUSE_SERVE_DB"]).expanduser()
    return Path(os.environ.get("MUSE_HOME") or "~/.muse").expanduser() / "serve.sqlite3"


# --------------------------------------------------------------------------------------------- store

class _Flush:
    """A queue marker: the writer sets it once every row queued before it is committed."""

    def __init__(self):
        self.done = threading.Event()


_STOP = object()


class Store:
    """API keys and the usage ledger in one SQLite file. See the module docstring for the design.

    `create=False` refuses to create a missing file (the CLI's read verbs: a mistyped --db should not
    silently report "no usage"). `clock` gives the default `now` (epoch seconds) for key operations.
    """

    def __init__(self, path: str | os.PathLike, *, busy_timeout_ms: int = 5000, create: bool = True,
                 clock: Callable[[], float] = time.time):
        self.path = Path(path).expanduser()
        self.busy_timeout_ms = int(busy_timeout_ms)
        self._clock = clock
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory; pass the database file, e.g. {self.path / 'serve.sqlite3'}")
        if not self.path.exists():
            if not create:
                raise StoreError(f"no serving database at {self.path}; create a key first (`muse keys create "
                                 f"--partner NAME --db {self.path}`) or pass the right --db")
            self._create_file()
        # Reads and key admin writes share one connection guarded by a lock rather than one connection
        # per thread: every read is an indexed look-up of microseconds, so serializing them costs less
        # than it saves; a per-thread connection would leak one open file per short-lived thread; and
        # close() can close a shared connection from any thread. (check_same_thread=False is safe
        # because the lock ensures one thread at a time.) The ledger writer has its own connection in
        # its own thread, so reads never wait behind a batch commit (WAL).
        self._read_lock = threading.Lock()
        self._conn = self._connect(check_same_thread=False)
        try:
            self._init_schema()
        except BaseException:
            self._conn.close()
            raise
        # Ledger writer state: rows queued but not committed yet, keyed by request_id (readers merge them).
        self._queue: queue.Queue = queue.Queue()
        self._pending: dict[str, UsageRecord] = {}
        self._pending_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._stopping = False
        self._closed = False

    # ------------------------------------------------------------------------------------ opening

    def _create_file(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return  # another process created it a moment ago
        except OSError as e:
            raise StoreError(f"cannot create the serving database {self.path}: {e.strerror or e}; "
                             f"pass another --db or set MUSE_SERVE_DB") from None
        os.close(fd)
        os.chmod(self.path, 0o600)  # exact, whatever the umask

    def _connect(self, *, check_same_thread: bool = True) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None,
                                   check_same_thread=check_same_thread)
            conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":  # e.g. a file system without shared memory
                log.warning("the serving database %s is in journal mode %r, not WAL; readers and the "
                            "ledger writer will block each other", self.path, mode)
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open the serving database {self.path}: {e}; is it a Muse serving "
                             f"database (an SQLite file)? Pass the right --db") from None
        return conn

    def _init_schema(self) -> None:
        with self._read_lock, self._write_txn() as c:
            for stmt in _SCHEMA:
                c.execute(stmt)
            rows = c.execute("SELECT version FROM schema_version").fetchall()
            if not rows:
                c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif max(r[0] for r in rows) > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer Muse (schema {max(r[0] for r in rows)}, "
                                 f"this one reads {SCHEMA_VERSION}); upgrade Muse")

    @contextlib.contextmanager
    def _write_txn(self, conn: sqlite3.Connection | None = None):
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error). IMMEDIATE takes the write lock up front, so a
        busy database waits in busy_timeout here instead of failing half-way through."""
        c = self._conn if conn is None else conn
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreError(f"the serving database {self.path} is busy ({e}); try again") from None
        try:
            yield c
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                c.execute("ROLLBACK")
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------------------------------- keys

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else float(now)

    def create_key(self, partner: str, *, models: Iterable[str] | None = None, rpm: int | None = None,
                   tpm: int | None = None, token_quota: int | None = None, period: str | None = None,
                   expires_at: float | None = None, now: float | None = None) -> tuple[str, ApiKey]:
        """A new key: (its text, to show once and forget; its record). UsageError for bad settings."""
        now = self._now(now)
        key = ApiKey(key_id=new_key_id(), partner=_check_partner(partner), models=_check_models(models),
                     rpm=_check_positive("rpm", rpm), tpm=_check_positive("tpm", tpm),
                     token_quota=_check_positive("token_quota", token_quota), period=period,
                     expires_at=None if expires_at is None else float(expires_at), created_at=now)
        _check_quota(key)
        if key.expires_at is not None and key.expires_at <= now:
            raise UsageError(f"the expiry {utc_iso(key.expires_at)} is not in the future; pass a later date")
        text = generate_key()
        with self._read_lock, self._write_txn() as c:
            c.execute(_KEY_INSERT, [hash_key(text), *_key_params(key)])
        return text, key

    def list_keys(self, *, include_revoked: bool = False, partner: str | None = None) -> list[ApiKey]:
        sql, params = f"SELECT {_KEY_COLS} FROM api_keys WHERE 1=1", []
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        if partner is not None:
            sql += " AND partner = ?"
            params.append(partner)
        with self._read_lock:
            rows = self._conn.execute(sql + " ORDER BY created_at, key_id", params).fetchall()
        return [_key_from_row(r) for r in rows]

    def get_key(self, key_id: str) -> ApiKey | None:
        with self._read_lock:
            row = self._conn.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else _key_from_row(row)

    def _unknown_key(self, key_id: str) -> UsageError:
        ids = [r[0] for r in self._conn.execute("SELECT key_id FROM api_keys").fetchall()]
        return UsageError(f"no key with id {key_id!r}.{closest(key_id, ids)} `muse keys list --all` shows the ids")

    def revoke(self, key_id: str, *, now: float | None = None) -> ApiKey:
        """Revoke a key (it stops working at once, also in a running server). Revoking a revoked key
        returns it unchanged. UsageError for an unknown id."""
        now = self._now(now)
        with self._read_lock, self._write_txn() as c:
            row = c.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                raise self._unknown_key(key_id)
            key = _key_from_row(row)
            if key.revoked_at is not None:
                return key
            c.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?", (now, key_id))
        return dataclasses.replace(key, revoked_at=now)

    def rotate(self, key_id: str, *, now: float | None = None) -> tuple[str, ApiKey]:
        """Replace a key: a new key with the same settings (rotated_from = the old id), and the old key
        revoked, in one transaction. UsageError for an unknown, revoked or expired key."""
        now = self._now(now)
        text = generate_key()
        with self._read_lock, self._write_txn() as c:
            row = c.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                raise self._unknown_key(key_id)
            old = _key_from_row(row)
            status = old.status(now)
            if status != "active":
                when = old.revoked_at if status == "revoked" else old.expires_at
                raise UsageError(f"key {key_id} is {status} (since {utc_iso(when)}); rotate only works on an "
                                 f"active key: create a new one with `muse keys create --partner {old.partner}`")
            new = dataclasses.replace(old, key_id=new_key_id(), created_at=now, revoked_at=None, rotated_from=key_id)
            c.execute(_KEY_INSERT, [hash_key(text), *_key_params(new)])
            c.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?", (now, key_id))
        return text, new

    def authenticate(self, key_text: str, *, now: float | None = None) -> ApiKey:
        """The active key whose text this is; AuthError("invalid" | "revoked" | "expired") otherwise.

        Reads the database on every call, so revocations by the CLI apply at once (an indexed look-up).
        Malformed text (wrong prefix, length, alphabet or checksum) is refused without a look-up.
        """
        if not check_format(key_text):
            raise AuthError("invalid")
        digest = hash_key(key_text)
        with self._read_lock:
            row = self._conn.execute(f"SELECT key_hash, {_KEY_COLS} FROM api_keys WHERE key_hash = ?",
                                     (digest,)).fetchone()
        # The index look-up above is not constant-time, but it only ever sees the sha256 of the text,
        # which tells an attacker nothing about any stored key; the comparison of the hashes is.
        if row is None or not hmac.compare_digest(row[0], digest):
            raise AuthError("invalid")
        key = _key_from_row(row[1:])
        status = key.status(self._now(now))
        if status != "active":
            raise AuthError(status, key.key_id)
        return key

    # ------------------------------------------------------------------------------------- ledger

    def record(self, rec: UsageRecord) -> None:
        """Queue one request's ledger row; never waits on the disk. A second row for a request_id is a
        bug in the caller: it is logged and ignored (the first row stays)."""
        if not isinstance(rec, UsageRecord):
            raise TypeError(f"record() takes a UsageRecord, got {type(rec).__name__}")
        # Under the writer lock, so no row can slip in behind close()'s stop marker and be left unwritten.
        with self._writer_lock:
            if self._closed or self._stopping:
                raise RuntimeError("Store.record() after close(); the row for request "
                                   f"{rec.request_id} is lost")
            if self._writer is None:
                self._writer = threading.Thread(target=self._writer_loop, name="muse-ledger-writer", daemon=True)
                self._writer.start()
            with self._pending_lock:
                if rec.request_id in self._pending:
                    log.error("ledger: a second row for request %s was ignored (a bug: one row per request)",
                              rec.request_id)
                    return
                self._pending[rec.request_id] = rec
            self._queue.put(rec)  # unbounded: never blocks

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every row queued so far is committed. TimeoutError if that takes over `timeout` s."""
        with self._writer_lock:
            writer = self._writer
            if writer is None or not writer.is_alive():
                return
            marker = _Flush()
            self._queue.put(marker)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not marker.done.wait(0.05):
            if not writer.is_alive():
                if self._stopping:
                    return  # close() stopped the writer after committing what it could
                raise RuntimeError("the ledger writer thread died; see the log for its error")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"the ledger did not flush within {timeout} s "
                                   f"({self._queue.qsize()} rows still queued)")

    def close(self, timeout: float | None = None) -> None:
        """Flush the ledger, stop the writer thread and close the connections. Idempotent."""
        with self._writer_lock:
            if self._closed:
                return
            self._stopping = True
            writer = self._writer
            if writer is not None:
                self._queue.put(_STOP)
        try:
            if writer is not None:
                writer.join(timeout)
                if writer.is_alive():
                    log.error("ledger: the writer did not finish within %s s; %d rows may be lost",
                              timeout, len(self._pending))
        finally:
            with self._writer_lock:
                self._closed = True
            with self._read_lock:
                self._conn.close()

    def _writer_loop(self) -> None:
        conn = self._connect()
        try:
            stop = False
            while not stop:
                items = [self._queue.get()]
                while len(items) < _MAX_BATCH:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                rows = [it for it in items if isinstance(it, UsageRecord)]
                stop = any(it is _STOP for it in items)
                if rows:
                    self._commit(conn, rows)
                for it in items:
                    if isinstance(it, _Flush):
                        it.done.set()
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, rows: list[UsageRecord]) -> None:
        """Insert `rows` in one transaction, retrying while the database is busy or failing; only then
        drop them from the pending set (so readers count each row exactly once: pending or committed)."""
        delay, failures = 0.05, 0
        while True:
            try:
                with self._write_txn(conn) as c:
                    dup = [r.request_id for r in rows
                           if c.execute(_REC_INSERT, [getattr(r, f) for f in _REC_FIELDS]).rowcount == 0]
                if dup:
                    log.error("ledger: rows for %d request(s) already recorded were ignored (a bug: one row "
                              "per request): %s", len(dup), ", ".join(dup[:10]))
                break
            except Exception as e:  # noqa: BLE001 - the writer must outlive any one failure
                failures += 1
                log.error("ledger: committing %d rows failed (%s); retrying", len(rows), e)
                if self._stopping and failures >= _STOP_RETRIES:
                    log.error("ledger: giving up on %d rows at shutdown: %s", len(rows),
                              ", ".join(r.request_id for r in rows[:10]))
                    break
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        with self._pending_lock:
            for r in rows:
                if self._pending.get(r.request_id) is r:
                    del self._pending[r.request_id]

    def _pending_rows(self, *, key_id=None, partner=None, since=None, until=None) -> list[UsageRecord]:
        with self._pending_lock:
            rows = list(self._pending.values())
        return [r for r in rows if (key_id is None or r.key_id == key_id) and (partner is None or r.partner == partner)
                and (since is None or r.created_at >= since) and (until is None or r.created_at < until)]

    @staticmethod
    def _where(*, key_id=None, partner=None, since=None, until=None) -> tuple[str, list]:
        sql, params = " WHERE 1=1", []
        for col, op, val in (("key_id", "=", key_id), ("partner", "=", partner),
                             ("created_at", ">=", since), ("created_at", "<", until)):
            if val is not None:
                sql += f" AND {col} {op} ?"
                params.append(val)
        return sql, params

    def _read_merged(self, query: Callable[[sqlite3.Connection, str, list], object], **filters):
        """(query result over committed rows, the queued rows matching `filters` that are not committed).

        The pending snapshot is taken first: a row missing from it was committed before it (the writer
        commits, then un-pends), so the query sees it. A row in the snapshot that commits meanwhile is
        found by request_id in the same read transaction and counted once, from the database.
        """
        pending = self._pending_rows(**filters)
        where, params = self._where(**filters)
        with self._read_lock:
            c = self._conn
            c.execute("BEGIN")  # one read snapshot for both queries
            try:
                result = query(c, where, params)
                committed: set[str] = set()
                ids = [r.request_id for r in pending]
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    committed.update(row[0] for row in c.execute(
                        f"SELECT request_id FROM ledger WHERE request_id IN ({', '.join('?' * len(chunk))})", chunk))
            finally:
                c.execute("COMMIT")
        return result, [r for r in pending if r.request_id not in committed]

    def tokens_used(self, key_id: str, since: float) -> int:
        """prompt + completion tokens of `key_id`'s requests created at or after `since`, including rows
        still queued for the writer (so a quota check can never undercount)."""
        total, pending = self._read_merged(
            lambda c, where, params: c.execute(
                f"SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM ledger{where}", params).fetchone()[0],
            key_id=key_id, since=since)
        return int(total) + sum(r.total_tokens for r in pending)

    def usage(self, *, partner: str | None = None, since: float | None = None, key_id: str | None = None,
              until: float | None = None) -> list[UsageRecord]:
        """Ledger rows (committed and queued) matching the filters, oldest first; `since` inclusive,
        `until` exclusive."""
        rows, pending = self._read_merged(
            lambda c, where, params: c.execute(f"SELECT {_REC_COLS} FROM ledger{where}", params).fetchall(),
            partner=partner, since=since, key_id=key_id, until=until)
        recs = [UsageRecord(*r) for r in rows] + pending
        recs.sort(key=lambda r: (r.created_at, r.request_id))
        return recs

    def usage_summary(self, *, partner: str | None = None, since: float | None = None,
                      until: float | None = None) -> list[dict]:
        """One dict per (partner, key_id, model): requests, prompt/completion/cached/total tokens,
        statuses ({"ok": n, ...}), first and last request time. Sorted by partner, key, model."""
        rows, pending = self._read_merged(
            lambda c, where, params: c.execute(
                "SELECT partner, key_id, model, status, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
                f"SUM(cached_tokens), MIN(created_at), MAX(created_at) FROM ledger{where} "
                "GROUP BY partner, key_id, model, status", params).fetchall(),
            partner=partner, since=since, until=until)
        rows = list(rows) + [(r.partner, r.key_id, r.model, r.status, 1, r.prompt_tokens, r.completion_tokens,
                              r.cached_tokens, r.created_at, r.created_at) for r in pending]
        groups: dict[tuple, dict] = {}
        for p, k, m, status, n, pt, ct, cached, first, last in rows:
            g = groups.setdefault((p, k, m), {
                "partner": p, "key_id": k, "model": m, "requests": 0, "prompt_tokens": 0,
                "completion_tokens": 0, "cached_tokens": 0, "total_tokens": 0, "statuses": {},
                "first_at": first, "last_at": last})
            g["requests"] += n
            g["prompt_tokens"] += pt
            g["completion_tokens"] += ct
            g["cached_tokens"] += cached
            g["total_tokens"] += pt + ct
            g["statuses"][status] = g["statuses"].get(status, 0) + n
            g["first_at"], g["last_at"] = min(g["first_at"], first), max(g["last_at"], last)
        for g in groups.values():
            g["statuses"] = dict(sorted(g["statuses"].items()))
        return [groups[k] for k in sorted(groups)]


# ------------------------------------------------------------------------------------- validation

def _check_partner(partner: str) -> str:
    if not isinstance(partner, str) or not partner.strip():
        raise UsageError("a key needs a partner name (--partner NAME)")
    partner = partner.strip()
    if len(partner) > 200 or any(ch.isspace() and ch != " " or not ch.isprintable() for ch in partner):
        raise UsageError(f"partner name {partner!r} has control characters or is over 200 characters; "
                         f"use a short plain name")
    return partner


def _check_models(models: Iterable[str] | None) -> tuple[str, ...] | None:
    if models is None:
        return None
    if isinstance(models, str):
        models = [models]
    out: list[str] = []
    for m in models:
        m = m.strip() if isinstance(m, str) else m
        if not isinstance(m, str) or not m:
            raise UsageError("model names must be non-empty (e.g. --models small,large); "
                             "leave --models out to allow every served model")
        if m not in out:
            out.append(m)
    if not out:
        raise UsageError("an empty model list would allow nothing; leave --models out to allow every served model")
    return tuple(out)


def _check_positive(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{name} must be a positive integer (leave it out for no limit), got {value!r}")
    return value


def _check_quota(key: ApiKey) -> None:
    if (key.token_quota is None) != (key.period is None):
        raise UsageError("a token quota needs a period and a period needs a quota: pass both "
                         "--token-quota N and --period day|month, or neither")
    if key.period is not None and key.period not in PERIODS:
        raise UsageError(f"period must be one of {', '.join(PERIODS)}, got {key.period!r}")
