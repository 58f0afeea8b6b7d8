"""The serving database: `open_store` picks the store a --db names, and the SQLite store, the embedded
default (API keys and the usage ledger in one file shared by one server and the CLI). The Store
interface and the SQL both stores share are in sqlstore.py; the PostgreSQL store, for several
replicas, in pgstore.py.

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

One server per SQLite file: each `muse serve` keeps its keys' quota reservations and rate-limit
buckets in its own memory (limits.py), so two on one file would spend a quota twice.
`lock_for_server` takes an exclusive flock on `<db>.serve.lock` (the file stays; a lock dies with its
process, even on SIGKILL). Several replicas share a PostgreSQL database instead (`--db
postgresql://...`, pgstore.py), where reservations are rows and replicas hold leases.

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
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from muse.common.logging import get_logger
from muse.server import schema
from muse.server.ledger import LedgerWriter
from muse.server.sqlstore import (
    BOOTSTRAP_ADMIN,
    CLOSE_TIMEOUT_S,
    FLUSH_TIMEOUT_S,
    AuthError,
    SqlStore,
    StoreError,
    timed,
)

log = get_logger("muse.server.store")

SCHEMA_VERSION = schema.SCHEMA_VERSION
URL_SCHEMES = ("postgresql", "postgres")   # what open_store sends to the PostgreSQL store

__all__ = ["AuthError", "BOOTSTRAP_ADMIN", "CLOSE_TIMEOUT_S", "FLUSH_TIMEOUT_S", "SCHEMA_VERSION", "Store",
           "StoreError", "default_db_path", "open_store"]


def default_db_path() -> str | Path:
    """$MUSE_SERVE_DB (a path, or a postgresql:// URL kept as text), else $MUSE_HOME/serve.sqlite3 with
    MUSE_HOME defaulting to ~/.muse."""
    env = os.environ.get("MUSE_SERVE_DB")
    if env:
        return env if "://" in env else Path(env).expanduser()
    return Path(os.environ.get("MUSE_HOME") or "~/.muse").expanduser() / "serve.sqlite3"


def url_scheme(db: str | os.PathLike) -> str | None:
    """The scheme of a URL given as the database ("postgresql"), None for a file path. Checked on the raw
    text: Path("postgresql://h/db") would collapse to "postgresql:/h/db"."""
    raw = os.fsdecode(os.fspath(db))
    return raw.split("://", 1)[0].lower() if "://" in raw else None


def open_store(db: str | os.PathLike | None = None, **kw) -> SqlStore:
    """The store `db` names (None: default_db_path()): a postgresql:// URL opens the PostgreSQL store
    (pgstore.py, for several replicas), a file path the SQLite one. Keyword arguments go to the store
    (create, clock; replica and lease_s for PostgreSQL)."""
    db = default_db_path() if db is None else db
    scheme = url_scheme(db)
    if scheme is None:
        kw.pop("replica", None)
        kw.pop("lease_s", None)
        return Store(db, **kw)
    if scheme not in URL_SCHEMES:
        # Only the scheme is echoed: the rest of a URL may hold a password.
        raise StoreError(f"the database {scheme}://... is a URL Muse cannot open: pass a postgresql://USER@HOST/DB "
                         f"URL (several replicas) or a file path (one server, SQLite), e.g. --db ~/.muse/serve.sqlite3")
    try:
        from muse.server.pgstore import PgStore
    except ImportError as e:
        raise StoreError(f"the PostgreSQL store needs psycopg 3 ({e}); install it with "
                         f"`pip install 'muse-lm[postgres]'` (psycopg[binary,pool])") from None
    return PgStore(os.fsdecode(os.fspath(db)), **kw)


# --------------------------------------------------------------------------------------------- store

class _SqliteTxn:
    """The write transaction's view of the connection: execute(sql, params) -> cursor."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def execute(self, sql: str, params=()):
        return self.conn.execute(sql, params)


class Store(SqlStore):
    """API keys and the usage ledger in one SQLite file. See the module docstring for the design.

    `create=False` refuses to create a missing file (the CLI's read verbs: a mistyped --db should not
    silently report "no usage"). `clock` gives the default `now` (epoch seconds) for key operations
    and the latency of progress notes.
    """

    kind = "sqlite"

    def __init__(self, path: str | os.PathLike, *, busy_timeout_ms: int = 5000, create: bool = True,
                 clock: Callable[[], float] = time.time):
        if url_scheme(path) is not None:
            raise StoreError(f"the database {url_scheme(path)}://... is a URL, but this is the SQLite store, which "
                             f"takes a file path; open_store() (what `muse serve --db` uses) opens "
                             f"postgresql:// URLs with the PostgreSQL store")
        self.path = Path(path).expanduser()
        self.where = str(self.path)
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
        with self._write_txn() as t:
            c = t.conn
            version = schema.file_version(c)
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer Muse (schema {version}, this one reads "
                                 f"{SCHEMA_VERSION}); upgrade Muse")
            if version < SCHEMA_VERSION:
                schema.upgrade(c, version)
                if version:
                    log.info("upgraded the serving database %s from schema %d to %d", self.path, version,
                             SCHEMA_VERSION)

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
                                 f"pass another --db (several replicas share one ledger through the "
                                 f"PostgreSQL store: --db postgresql://...)") from None
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

    # ------------------------------------------------------------------------------------ primitives

    def _rows(self, sql, params=()):
        with timed("read"), self._read_lock:
            return self._conn.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _write_txn(self):
        """BEGIN IMMEDIATE ... COMMIT on the read connection (ROLLBACK on error), as ledger.write_txn, but
        a database still busy after busy_timeout is a StoreError the CLI can print."""
        with timed("write"), self._read_lock:
            c = self._conn
            try:
                c.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise StoreError(f"the serving database {self.path} is busy ({e}); try again") from None
            try:
                yield _SqliteTxn(c)
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                    with contextlib.suppress(sqlite3.Error):
                        c.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _snapshot(self):
        with self._read_lock:
            c = self._conn
            c.execute("BEGIN")  # one read snapshot for every query
            try:
                yield c
            finally:
                c.execute("COMMIT")

    def recover_interrupted(self) -> int:
        """Turn the "running" rows a dead server left behind into "interrupted" ones; returns how many.
        Each keeps what its last committed write knew: prompt tokens plus the completion tokens of its
        last progress note (ledger.py says how much a crash can miss). Call it at start-up, after
        lock_for_server(): without the lock it could settle the rows of a server still running."""
        if self._lock_fd is None:
            raise RuntimeError("recover_interrupted() needs lock_for_server() first: without the lock, the "
                               "running rows may belong to a live server")
        mine = self._ledger.active_ids()
        with self._write_txn() as c:
            ids = [rid for (rid,) in c.execute("SELECT request_id FROM ledger WHERE status = 'running'").fetchall()
                   if rid not in mine]
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                c.execute("UPDATE ledger SET status = 'interrupted' WHERE status = 'running' AND request_id IN "
                          f"({', '.join('?' * len(chunk))})", chunk)
        return len(ids)
