"""The serving database (SQLite): API keys and the usage ledger, one file shared by the server and the CLI.

Keys: `muse keys create|revoke|rotate` write them from the CLI process, usually while the server runs;
the server only reads them, and reads them on every request, so a revocation takes effect at once.
Only the sha256 of a key's text is stored (server/keys.py says why that is enough); the public
`key_id` is what every list, ledger row and log line shows. A rotated key keeps the `owner_id` of the
key it replaced (the first of the chain): quotas belong to the owner, so rotating a key while its
requests run cannot spend the quota twice (`quota_owner`, `chain_tokens_used`).

Ledger: exactly one row per request (request_id is the primary key), written by one writer thread
(ledger.py: batching, retries, and exactly what a crash costs). A request is recorded when admitted
(`begin`, status "running"), its progress noted cheaply (`progress`), and it is settled when it ends
(`record`). At start-up the server takes the server lock (`lock_for_server`) and then turns the rows
a dead server left "running" into "interrupted" ones (`recover_interrupted`). Text fields are cleaned
when a row is handed in (records.clean_label: at most LABEL_LIMIT = 128 characters, control
characters escaped, lone surrogates replaced), so a client's model name cannot bloat the ledger, stop
the writer, or put a terminal escape into `muse usage`. Rows not yet committed count everywhere
(`tokens_used`, `usage`, `usage_summary`): a quota can never be undercounted because of the queue.

One server per database: each `muse serve` admits its keys' whole quota, so two on one file would
spend it twice. `lock_for_server` takes an exclusive flock on `<db>.serve.lock` (the file stays; a
lock dies with its process, even on SIGKILL). Several replicas need a shared store (PostgreSQL) that
does not exist yet, which is also why a URL passed as the database is refused.

SQLite settings, and why:
- WAL journal: readers (authenticate, quota look-ups, `muse usage`) never wait for the ledger writer,
  and the writer never waits for them; only two writers (ledger batch, key admin) take turns.
- busy_timeout: the CLI's short key transactions and the writer's batches wait for each other instead
  of failing with "database is locked".
- synchronous=FULL: the ledger is a billing record; a commit survives a power cut. Batching keeps the
  cost to one fsync per batch, not per request (or per token: progress notes are coalesced).
- The file is created with mode 0600 (SQLite gives the -wal/-shm files the same mode): hashes are not
  keys, but the ledger is partner data.
- Operator credentials (admin_keys) are stored like keys, as hashes; the server writes its admin key
  there at start (`set_bootstrap_admin`) and admin routes check `is_admin`.
- A `schema_version` table: an older file is upgraded in place in one transaction (schema.py); a newer
  file opened by an older Muse is refused instead of misread.

Times are UTC epoch seconds (floats) everywhere; `parse_utc`/`utc_iso` (records.py) convert at the edges.
Torch-free, stdlib + muse.common only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from muse.common.errors import MuseError, UsageError, closest
from muse.common.logging import get_logger
from muse.server import schema
from muse.server.keys import check_format, generate_key, hash_key, new_key_id
from muse.server.ledger import REC_COLS, LedgerWriter
from muse.server.records import FINAL_STATUSES, PERIODS, ApiKey, UsageRecord, utc_iso

log = get_logger("muse.server.store")

SCHEMA_VERSION = schema.SCHEMA_VERSION
FLUSH_TIMEOUT_S = 10.0     # flush() waits at most this long by default: a stuck disk must not hang a caller
BOOTSTRAP_ADMIN = "admin_bootstrap"  # the admin_keys row that mirrors the server's admin key
_EDITABLE = {"models", "rpm", "tpm", "token_quota", "period", "expires_at"}   # update_key
CLOSE_TIMEOUT_S = 30.0     # close(): the writer's last tries (ledger.py STOP_ATTEMPTS) fit in it


class StoreError(MuseError):
    """The serving database cannot be opened or used (missing, not SQLite, written by a newer Muse,
    a URL, or already served by another `muse serve`)."""


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


def _check_not_url(path: str | os.PathLike) -> None:
    raw = os.fsdecode(os.fspath(path))
    if "://" in raw:  # checked on the raw text: Path("postgresql://h/db") collapses to "postgresql:/h/db"
        scheme = raw.split("://", 1)[0]
        # Only the scheme is echoed: the rest of a URL may hold a password.
        raise StoreError(f"the database {scheme}://... is a URL, but the PostgreSQL store does not exist yet "
                         f"(Muse has only the SQLite one); pass a file path, e.g. --db ~/.muse/serve.sqlite3")


def _matches(r: UsageRecord, *, key_id=None, key_ids=None, partner=None, since=None, until=None) -> bool:
    return ((key_id is None or r.key_id == key_id) and (key_ids is None or r.key_id in key_ids)
            and (partner is None or r.partner == partner) and (since is None or r.created_at >= since)
            and (until is None or r.created_at < until))


def _where(*, key_id=None, key_ids=None, partner=None, since=None, until=None) -> tuple[str, list]:
    sql, params = " WHERE 1=1", []
    for col, op, val in (("key_id", "=", key_id), ("partner", "=", partner),
                         ("created_at", ">=", since), ("created_at", "<", until)):
        if val is not None:
            sql += f" AND {col} {op} ?"
            params.append(val)
    if key_ids is not None:
        sql += f" AND key_id IN ({', '.join('?' * len(key_ids))})"
        params.extend(key_ids)
    return sql, params


# --------------------------------------------------------------------------------------------- store

class Store:
    """API keys and the usage ledger in one SQLite file. See the module docstring for the design.

    `create=False` refuses to create a missing file (the CLI's read verbs: a mistyped --db should not
    silently report "no usage"). `clock` gives the default `now` (epoch seconds) for key operations
    and the latency of progress notes.
    """

    def __init__(self, path: str | os.PathLike, *, busy_timeout_ms: int = 5000, create: bool = True,
                 clock: Callable[[], float] = time.time):
        _check_not_url(path)
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
        self._ledger = LedgerWriter(self._connect, clock)
        self._lock_fd: int | None = None
        self._close_lock = threading.Lock()
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
            version = schema.file_version(c)
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer Muse (schema {version}, this one reads "
                                 f"{SCHEMA_VERSION}); upgrade Muse")
            if version < SCHEMA_VERSION:
                schema.upgrade(c, version)
                if version:
                    log.info("upgraded the serving database %s from schema %d to %d", self.path, version,
                             SCHEMA_VERSION)

    @contextlib.contextmanager
    def _write_txn(self):
        """BEGIN IMMEDIATE ... COMMIT on the read connection (ROLLBACK on error), as ledger.write_txn, but
        a database still busy after busy_timeout is a StoreError the CLI can print."""
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreError(f"the serving database {self.path} is busy ({e}); try again") from None
        try:
            yield c
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                with contextlib.suppress(sqlite3.Error):
                    c.execute("ROLLBACK")
            raise

    def lock_for_server(self) -> None:
        """Claim the database for this process's `muse serve`, until close(); StoreError if another
        process holds it. An exclusive flock on `<db>.serve.lock`, which records the holder's pid.

        flock, not fcntl record locks: an flock belongs to the open file description, so two Stores
        conflict even inside one process, and the kernel drops it when the process dies (SIGKILL too);
        the file is never deleted (deleting it would let two servers lock two different files).
        Idempotent.
        """
        import fcntl  # POSIX only; imported here so the rest of the store works without it

        if self._lock_fd is not None:
            return
        lock_path = self.path.with_name(self.path.name + ".serve.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"cannot create the server lock {lock_path}: {e.strerror or e}; "
                             f"pass a --db in a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if isinstance(e, BlockingIOError):
                pid = holder if holder.isdigit() else "unknown"
                raise StoreError(f"another muse serve (pid {pid}) is using DB {self.path}; stop it first or "
                                 f"pass another --db (several replicas on one ledger need the PostgreSQL store, "
                                 f"which does not exist yet)") from None
            raise StoreError(f"cannot lock {lock_path}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self, timeout: float | None = CLOSE_TIMEOUT_S) -> bool:
        """Write the ledger's pending rows, stop the writer, close the connection, release the server
        lock. Never waits past `timeout` s: False then (the unwritten rows are logged in full, ledger.py).
        Idempotent."""
        with self._close_lock:
            if self._closed:
                return True
            self._closed = True
        ok = self._ledger.close(timeout)
        with self._read_lock:
            self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        return ok

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
        key_id = new_key_id()
        key = ApiKey(key_id=key_id, partner=_check_partner(partner), models=_check_models(models),
                     rpm=_check_positive("rpm", rpm), tpm=_check_positive("tpm", tpm),
                     token_quota=_check_positive("token_quota", token_quota), period=period,
                     expires_at=None if expires_at is None else float(expires_at), created_at=now,
                     owner_id=key_id)
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
        """Replace a key: a new key with the same settings and owner (rotated_from = the old id), and
        the old key revoked, in one transaction. UsageError for an unknown, revoked or expired key."""
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
            new = dataclasses.replace(old, key_id=new_key_id(), created_at=now, revoked_at=None, rotated_from=key_id,
                                      owner_id=old.owner_id or key_id)
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

    def quota_owner(self, key: ApiKey) -> str:
        """Whose quota a request on `key` spends: the first key of its rotation chain (for
        QuotaManager(owner=...)). A key the store has not heard of owns itself."""
        owner = getattr(key, "owner_id", None)
        if owner:
            return owner
        with self._read_lock:
            row = self._conn.execute("SELECT owner_id FROM api_keys WHERE key_id = ?", (key.key_id,)).fetchone()
        return row[0] if row is not None and row[0] else key.key_id

    def update_key(self, key_id: str, **changes) -> ApiKey:
        """Change an active key's models, rpm, tpm, token_quota, period or expires_at in place (a field
        not given stays; None clears it). A running server applies it to the key's next request (it
        reads keys on every request). UsageError for an unknown or revoked key, or a bad value."""
        unknown = sorted(set(changes) - _EDITABLE)
        if unknown:
            raise UsageError(f"cannot change {', '.join(unknown)}; a key's editable fields are "
                             f"{', '.join(sorted(_EDITABLE))}")
        checked = {"models": _check_models, "rpm": lambda v: _check_positive("rpm", v),
                   "tpm": lambda v: _check_positive("tpm", v),
                   "token_quota": lambda v: _check_positive("token_quota", v),
                   "period": lambda v: v, "expires_at": lambda v: None if v is None else float(v)}
        values = {name: checked[name](v) for name, v in changes.items()}
        with self._read_lock, self._write_txn() as c:
            row = c.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                raise self._unknown_key(key_id)
            new = dataclasses.replace(_key_from_row(row), **values)
            if new.revoked_at is not None:
                raise UsageError(f"key {key_id} is revoked; create a new key instead of changing this one")
            _check_quota(new)
            params = _key_params(new)
            cols = [f.name for f in dataclasses.fields(ApiKey)]
            c.execute(f"UPDATE api_keys SET {', '.join(f'{n} = ?' for n in sorted(_EDITABLE))} WHERE key_id = ?",
                      [params[cols.index(n)] for n in sorted(_EDITABLE)] + [key_id])
        return new

    # ------------------------------------------------------------------------------ admin credentials

    def set_bootstrap_admin(self, text: str | None, *, now: float | None = None) -> None:
        """Store the server's admin key (MUSE_ADMIN_KEY / --admin-key-file) as the operator credential
        BOOTSTRAP_ADMIN, hashed, replacing what an earlier start stored; None removes it (no admin)."""
        now = self._now(now)
        with self._read_lock, self._write_txn() as c:
            c.execute("DELETE FROM admin_keys WHERE admin_id = ?", (BOOTSTRAP_ADMIN,))
            if text is not None:
                c.execute("DELETE FROM admin_keys WHERE key_hash = ?", (hash_key(text),))  # one hash, one row
                c.execute("INSERT INTO admin_keys (admin_id, key_hash, label, created_at) VALUES (?, ?, ?, ?)",
                          (BOOTSTRAP_ADMIN, hash_key(text), "the server's admin key", now))

    def is_admin(self, text: str) -> bool:
        """True if `text` is an operator credential that is not revoked (an indexed look-up by hash)."""
        digest = hash_key(text)
        with self._read_lock:
            row = self._conn.execute("SELECT key_hash FROM admin_keys WHERE key_hash = ? AND revoked_at IS NULL",
                                     (digest,)).fetchone()
        return row is not None and hmac.compare_digest(row[0], digest)

    # ------------------------------------------------------------------------------------- ledger

    def begin(self, rec: UsageRecord) -> None:
        """Record an admitted request now, as a "running" row (prompt tokens known, completion 0 or
        what is known), so a crash still bills it. Settle it with record(); never waits on the disk."""
        if not isinstance(rec, UsageRecord) or rec.status != "running":
            raise ValueError(f"begin() takes a UsageRecord with status 'running', got {rec!r:.200}")
        self._ledger.put(rec.cleaned())

    def progress(self, request_id: str, completion_tokens: int, cached_tokens: int = 0) -> None:
        """Note a begun request's tokens so far. Coalesced in memory and committed with the next batch
        (within a second, ledger.py): call it as often as convenient, no transaction per call. Ignored
        for a request not begun in this Store or already settled."""
        self._ledger.progress(request_id, completion_tokens, cached_tokens)

    def record(self, rec: UsageRecord) -> None:
        """Settle one request's ledger row (status ok/aborted/error): it replaces the request's running
        row, or is its only row when begin() was not called. Never waits on the disk. A second settled
        row for a request_id is a bug in the caller: it is logged and ignored (the first row stays)."""
        if not isinstance(rec, UsageRecord):
            raise TypeError(f"record() takes a UsageRecord, got {type(rec).__name__}")
        if rec.status not in FINAL_STATUSES:
            raise ValueError(f"record() settles a request: status must be one of {FINAL_STATUSES}, got "
                             f"{rec.status!r} (a running row goes to begin())")
        self._ledger.put(rec.cleaned())

    def flush(self, timeout: float | None = FLUSH_TIMEOUT_S) -> bool:
        """Wait until every row handed in so far is committed (or dropped and logged, ledger.py).
        False, never a hang, when that takes over `timeout` s (None: no limit) or the writer is gone."""
        ok = self._ledger.flush(timeout)
        if not ok:
            log.warning("ledger: flush did not finish within %s s; rows are still pending (they count in "
                        "every read)", timeout)
        return ok

    def recover_interrupted(self) -> int:
        """Turn the "running" rows a dead server left behind into "interrupted" ones; returns how many.
        Each keeps what its last committed write knew: prompt tokens plus the completion tokens of its
        last progress note (ledger.py says how much a crash can miss). Call it at start-up, after
        lock_for_server(): without the lock it could settle the rows of a server still running."""
        if self._lock_fd is None:
            raise RuntimeError("recover_interrupted() needs lock_for_server() first: without the lock, the "
                               "running rows may belong to a live server")
        mine = self._ledger.active_ids()
        with self._read_lock, self._write_txn() as c:
            ids = [rid for (rid,) in c.execute("SELECT request_id FROM ledger WHERE status = 'running'")
                   if rid not in mine]
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                c.execute("UPDATE ledger SET status = 'interrupted' WHERE status = 'running' AND request_id IN "
                          f"({', '.join('?' * len(chunk))})", chunk)
        return len(ids)

    # -------------------------------------------------------------------------------------- reads

    def _read_merged(self, query: Callable[[sqlite3.Connection, str, list], object], **filters):
        """(query result over committed rows, committed rows that a pending version supersedes (to
        take away), pending rows matching `filters` (to add)).

        The pending snapshot is taken first: a version missing from it was committed before it (the
        writer commits, then un-pends), so the query sees it. A request with a pending version counts
        once, from that version: its committed row (an older "running" one, or the same row committed
        meanwhile) is fetched in the same read transaction and taken away.
        """
        pending = self._ledger.pending()
        where, params = _where(**filters)
        shadowed: list[UsageRecord] = []
        with self._read_lock:
            c = self._conn
            c.execute("BEGIN")  # one read snapshot for every query
            try:
                result = query(c, where, params)
                ids = list(pending)
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    shadowed += [UsageRecord(*row) for row in c.execute(
                        f"SELECT {REC_COLS} FROM ledger{where} AND request_id IN ({', '.join('?' * len(chunk))})",
                        params + chunk)]
            finally:
                c.execute("COMMIT")
        return result, shadowed, [r for r in pending.values() if _matches(r, **filters)]

    def _tokens(self, **filters) -> int:
        total, shadowed, pending = self._read_merged(
            lambda c, where, params: c.execute(
                f"SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM ledger{where}", params).fetchone()[0],
            **filters)
        return int(total) - sum(r.total_tokens for r in shadowed) + sum(r.total_tokens for r in pending)

    def tokens_used(self, key_id: str, since: float) -> int:
        """prompt + completion tokens of `key_id`'s requests created at or after `since`, whatever their
        status (running rows with what they know so far), including rows not committed yet (so a quota
        check can never undercount)."""
        return self._tokens(key_id=key_id, since=since)

    def chain_tokens_used(self, owner_id: str, since: float) -> int:
        """tokens_used summed over every key that `owner_id` owns (itself and the keys that replaced it,
        see quota_owner): the `used` of QuotaManager(store.chain_tokens_used, owner=store.quota_owner)."""
        with self._read_lock:
            ids = {r[0] for r in self._conn.execute("SELECT key_id FROM api_keys WHERE owner_id = ?", (owner_id,))}
        return self._tokens(key_ids=sorted(ids | {owner_id}), since=since)

    def usage(self, *, partner: str | None = None, since: float | None = None, key_id: str | None = None,
              until: float | None = None) -> list[UsageRecord]:
        """Ledger rows (committed and not yet) matching the filters, oldest first; `since` inclusive,
        `until` exclusive. Running rows show what they know so far."""
        rows, shadowed, pending = self._read_merged(
            lambda c, where, params: c.execute(f"SELECT {REC_COLS} FROM ledger{where}", params).fetchall(),
            partner=partner, since=since, key_id=key_id, until=until)
        recs = {r.request_id: r for r in map(lambda row: UsageRecord(*row), rows)}
        for r in shadowed:
            recs.pop(r.request_id, None)
        recs.update((r.request_id, r) for r in pending)
        return sorted(recs.values(), key=lambda r: (r.created_at, r.request_id))

    def usage_summary(self, *, partner: str | None = None, since: float | None = None,
                      until: float | None = None) -> list[dict]:
        """One dict per (partner, key_id, model): requests, prompt/completion/cached/total tokens,
        statuses ({"ok": n, ...}), first and last request time. Sorted by partner, key, model."""
        rows, shadowed, pending = self._read_merged(
            lambda c, where, params: c.execute(
                "SELECT partner, key_id, model, status, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
                f"SUM(cached_tokens), MIN(created_at), MAX(created_at) FROM ledger{where} "
                "GROUP BY partner, key_id, model, status", params).fetchall(),
            partner=partner, since=since, until=until)
        # Superseded committed rows count -1, pending versions +1 (first/last times are min/max, which
        # cannot be taken away; a request's versions share created_at, so they do not move them).
        rows = [(*row, 1) for row in rows] + [
            (r.partner, r.key_id, r.model, r.status, 1, r.prompt_tokens, r.completion_tokens, r.cached_tokens,
             r.created_at, r.created_at, sign) for sign, recs in ((-1, shadowed), (1, pending)) for r in recs]
        groups: dict[tuple, dict] = {}
        for p, k, m, status, n, pt, ct, cached, first, last, sign in rows:
            g = groups.setdefault((p, k, m), {
                "partner": p, "key_id": k, "model": m, "requests": 0, "prompt_tokens": 0,
                "completion_tokens": 0, "cached_tokens": 0, "total_tokens": 0, "statuses": {},
                "first_at": first, "last_at": last})
            g["requests"] += sign * n
            g["prompt_tokens"] += sign * pt
            g["completion_tokens"] += sign * ct
            g["cached_tokens"] += sign * cached
            g["total_tokens"] += sign * (pt + ct)
            g["statuses"][status] = g["statuses"].get(status, 0) + sign * n
            g["first_at"], g["last_at"] = min(g["first_at"], first), max(g["last_at"], last)
        out = []
        for key in sorted(groups):
            g = groups[key]
            if g["requests"] > 0:
                g["statuses"] = {s: n for s, n in sorted(g["statuses"].items()) if n}
                out.append(g)
        return out


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
