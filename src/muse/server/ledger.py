"""The usage ledger's writer: one thread that owns the only ledger write connection and commits, in
batches, the rows that `Store.begin`, `Store.progress` and `Store.record` hand it. It knows SQLite and
UsageRecord; keys, quotas and HTTP are not its business (store.py reads the ledger, it only writes).
The PostgreSQL store hands it its own `commit` and `database_error` (pgstore.py); the batching,
retries and bounds below are the same for both.

Rows, versions, and what a crash costs
- A request's row is written when it is admitted (status "running": prompt tokens known, completion 0),
  again when its progress was noted, and a last time when it is settled (its final status). Every
  write is an upsert on request_id that only ever replaces a "running" row: the ledger holds exactly
  one row per request, and a settled row is never overwritten.
- Nobody waits on the disk. Callers change an in-memory map (`pending`: request_id -> the latest
  version not yet committed) and wake the writer; progress notes are coalesced there (the newest
  counts replace the row in memory: no transaction per token). begin/record/flush wake the writer at
  once; progress alone wakes it within PROGRESS_INTERVAL_S.
- So a SIGKILL (or power cut) loses only versions not committed yet. A request begun in the last
  batch interval (milliseconds) may have no row at all; every other request keeps its last committed
  version: settled, or "running" with progress at most PROGRESS_INTERVAL_S behind the caller's last
  note (a settlement not yet committed leaves the running row too). The next start turns running rows
  into "interrupted" ones billed prompt + the completion tokens last committed
  (Store.recover_interrupted). An interrupted request is billed its prompt even if the engine never
  ran it: nobody can tell any more, and the prompt was accepted.

Failures: the writer never blocks on one row and never retries anything forever
- A batch is one transaction. A database-level failure (sqlite3.OperationalError and kin: locked or
  busy past busy_timeout, disk full, I/O error, read-only file; also failing to connect) says nothing
  about the rows: they stay pending, so readers keep counting them (a quota never undercounts), and
  the batch is retried with exponential backoff, RETRY_BASE_S doubling up to RETRY_MAX_S. A row that
  took part in RETRY_ATTEMPTS failed tries (about five minutes of outage, plus whatever busy_timeout
  each try waited) is dropped from memory and logged at ERROR as one JSON line holding the whole row,
  so billing can be restored from the log. Why that bound: holding rows longer makes memory grow with
  the outage (every request adds a row), giving up sooner loses billing to a lock or a full disk that
  an operator can clear in minutes.
- Any other failure (a row SQLite refuses: a string it cannot encode, a constraint, a number out of
  range) is the row's fault: the batch is retried row by row, a row that fails alone is sanitised
  (UsageRecord.cleaned) and tried once more, then dropped with the same ERROR line.
- `close()` allows STOP_ATTEMPTS more failed rounds (with short backoff), then logs what is left the
  same way; `flush(timeout)` and `close(timeout)` return False instead of waiting past their timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator

from muse.common.logging import get_logger
from muse.server.records import UsageRecord, clean_label

log = get_logger("muse.server.ledger")

REC_FIELDS = [f.name for f in dataclasses.fields(UsageRecord)]
REC_COLS = ", ".join(REC_FIELDS)
# One row per request: a new request_id inserts; an existing row is replaced only while it is "running".
# rowcount is 0 when the WHERE refused the update (the request was already settled).
_UPSERT = (f"INSERT INTO ledger ({REC_COLS}) VALUES ({', '.join('?' * len(REC_FIELDS))}) "
           f"ON CONFLICT (request_id) DO UPDATE SET "
           + ", ".join(f"{f} = excluded.{f}" for f in REC_FIELDS if f != "request_id")
           + " WHERE ledger.status = 'running'")


@contextlib.contextmanager
def write_txn(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any error. IMMEDIATE takes the write lock up front, so a
    busy database waits in busy_timeout here instead of failing half-way through."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
            with contextlib.suppress(sqlite3.Error):  # never hide the error that got us here
                conn.execute("ROLLBACK")
        raise


def _sqlite_commit(conn: sqlite3.Connection, rows: list[UsageRecord]) -> list[str]:
    dup = []
    with write_txn(conn) as c:
        for r in rows:
            if c.execute(_UPSERT, [getattr(r, f) for f in REC_FIELDS]).rowcount == 0 and r.status != "running":
                dup.append(r.request_id)
    return dup


def _database_error(e: BaseException) -> bool:
    """True for a failure of the database (retry the same rows later), False for one of a row."""
    from muse.server.store import StoreError  # connecting failed; store.py imports this module

    if isinstance(e, StoreError):
        return True
    return isinstance(e, sqlite3.DatabaseError) and not isinstance(
        e, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.ProgrammingError)


def _row_json(rec: UsageRecord) -> str:
    return json.dumps(dataclasses.asdict(rec), sort_keys=True)  # ensure_ascii: escapes any control char


class _Entry:
    """A request's latest unwritten row. `seq` is the put() count when the oldest version still
    unwritten arrived (flush waits for entries with seq <= its target); `attempts` counts failed tries."""

    __slots__ = ("rec", "seq", "attempts")

    def __init__(self, rec: UsageRecord, seq: int):
        self.rec, self.seq, self.attempts = rec, seq, 0


class LedgerWriter:
    """The rows not yet committed and the thread that commits them. Thread-safe (one Condition).

    `connect()` opens the writer's own connection (in the writer thread); `clock` gives wall-clock
    epoch seconds for the latency of a progress note. Tuning knobs are class attributes (tests shrink
    them); the module docstring says why they are what they are.
    """

    PROGRESS_INTERVAL_S = 1.0
    MAX_BATCH = 1024                 # rows per transaction at most
    RETRY_BASE_S = 0.05
    RETRY_MAX_S = 5.0
    RETRY_ATTEMPTS = 64              # 0.05 s doubling to 5 s: ~6 s for the first 7 tries, then 5 s each
    STOP_ATTEMPTS = 3

    def __init__(self, connect: Callable[[], sqlite3.Connection], clock: Callable[[], float] = time.time, *,
                 commit: Callable[[object, list[UsageRecord]], list[str]] | None = None,
                 database_error: Callable[[BaseException], bool] | None = None):
        """`commit(conn, rows)` writes rows in one transaction and returns the request ids of settled rows
        it refused (already settled); `database_error(e)` says whether a failure is the database's (retry
        the rows) or a row's. Both default to SQLite's."""
        self._connect = connect
        self._clock = clock
        self._commit_rows = commit or _sqlite_commit
        self._database_error = database_error or _database_error
        self._cv = threading.Condition()
        self._pending: dict[str, _Entry] = {}
        self._running: dict[str, UsageRecord] = {}  # this process's unsettled rows, latest version
        self._seq = 0
        self._urgent = False
        self._progress_at: float | None = None      # monotonic time of the oldest unwritten progress note
        self._retry_at: float | None = None         # backoff after a database failure
        self._delay = self.RETRY_BASE_S
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stop_failures = 0
        self._closed = False
        self.commits = 0                            # transactions committed so far (tests, logs)
        self.failures = 0                           # failed ones

    # ----------------------------------------------------------------------------------- callers

    def put(self, rec: UsageRecord) -> None:
        """Queue a row: a "running" one (begin) or a settled one (record). Never waits on the disk."""
        with self._cv:
            if self._stopping:
                raise RuntimeError(f"Store.record()/begin() after close(); the row for request {rec.request_id} is lost")
            entry = self._pending.get(rec.request_id)
            if entry is not None and entry.rec.status != "running":
                log.error("ledger: a second row for request %s was ignored (a bug: one row per request)",
                          rec.request_id)
                return
            if rec.status == "running":
                if rec.request_id in self._running:
                    log.error("ledger: request %s was begun twice (a bug); the second begin is ignored",
                              rec.request_id)
                    return
                self._running[rec.request_id] = rec
            else:
                self._running.pop(rec.request_id, None)
            self._set(rec)
            self._urgent = True
            if self._thread is None or not self._thread.is_alive():
                if self._thread is not None:
                    log.error("ledger: the writer thread had died; starting a new one")
                self._thread = threading.Thread(target=self._run, name="muse-ledger-writer", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def progress(self, request_id: str, completion_tokens: int, cached_tokens: int) -> None:
        """Note a running request's counts so far: replaces its row in memory, written with the next
        batch (within PROGRESS_INTERVAL_S). A request not begun here, or already settled, is ignored."""
        with self._cv:
            base = self._running.get(request_id)
            if base is None or self._stopping:
                return
            if base.completion_tokens == completion_tokens and base.cached_tokens == cached_tokens:
                return
            rec = dataclasses.replace(base, completion_tokens=completion_tokens, cached_tokens=cached_tokens,
                                      latency_s=max(0.0, self._clock() - base.created_at))
            self._running[request_id] = rec
            self._set(rec)
            if self._progress_at is None:
                self._progress_at = time.monotonic()
                self._cv.notify_all()  # an idle writer starts its PROGRESS_INTERVAL_S timer

    def _set(self, rec: UsageRecord) -> None:
        self._seq += 1
        entry = self._pending.get(rec.request_id)
        if entry is None:
            self._pending[rec.request_id] = _Entry(rec, self._seq)
        else:
            entry.rec = rec  # keeps its seq: the oldest unwritten version is what a flush waits for

    def pending(self) -> dict[str, UsageRecord]:
        """request_id -> the latest version not known to be committed (a snapshot)."""
        with self._cv:
            return {rid: e.rec for rid, e in self._pending.items()}

    def active_ids(self) -> set[str]:
        """Requests this process has begun and not settled, or whose rows are not committed yet."""
        with self._cv:
            return set(self._running) | set(self._pending)

    def flush(self, timeout: float | None) -> bool:
        """Wait until every row put before this call is committed (or dropped and logged). False if
        that takes over `timeout` seconds (None: no limit) or the writer is gone."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            target = self._seq
            while any(e.seq <= target for e in self._pending.values()):
                self._urgent = True  # set only while rows wait: a stale flag would cut the progress timer
                self._cv.notify_all()
                if self._thread is None or not self._thread.is_alive():
                    log.error("ledger: flush found no writer thread; %d rows are not committed", len(self._pending))
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(1.0 if left is None else min(left, 1.0))  # also re-checks the thread
        return True

    def close(self, timeout: float | None) -> bool:
        """Write what is pending (bounded tries), stop the thread. False if it did not finish in time:
        the rows still pending are then logged in full, since they may never reach the disk."""
        with self._cv:
            if self._closed:
                return True
            self._stopping = True
            self._retry_at = None  # no long backoff now: STOP_ATTEMPTS quick tries, then give up
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                rows = self.pending()
                log.error("ledger: the writer did not finish within %s s; %d rows may be lost, logged below",
                          timeout, len(rows))
                for rec in rows.values():
                    log.error("ledger: unwritten row: %s", _row_json(rec))
                self._closed = True
                return False
        self._closed = True
        return True

    # ------------------------------------------------------------------------------------ writer

    def _wait_s(self, now: float) -> float | None:
        """0: write now; a number: wait that long; None: wait for a put."""
        if not self._pending:
            return None
        if self._retry_at is not None:
            return max(0.0, self._retry_at - now)
        if self._urgent or self._stopping:
            return 0.0
        if self._progress_at is not None:
            return max(0.0, self._progress_at + self.PROGRESS_INTERVAL_S - now)
        return None

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                with self._cv:
                    while True:
                        if not self._pending:
                            if self._stopping:
                                return
                            self._urgent = False  # nothing to hurry: the next put or progress decides
                        wait = self._wait_s(time.monotonic())
                        if wait == 0:
                            break
                        self._cv.wait(wait)
                    self._progress_at = self._retry_at = None
                    self._urgent = len(self._pending) > self.MAX_BATCH  # the rest goes next, at once
                    batch = [(e, e.rec) for e in itertools.islice(self._pending.values(), self.MAX_BATCH)]
                    taken_seq = self._seq
                try:
                    conn, outcome = self._write(conn, [rec for _, rec in batch])
                except Exception as e:  # noqa: BLE001 - a bug here must not stop the ledger: back off, retry
                    log.exception("ledger: the writer failed unexpectedly")
                    outcome = [("held", e)] * len(batch)
                with self._cv:
                    self._settle(batch, outcome, taken_seq)
                    self._cv.notify_all()
        finally:
            if conn is not None:
                conn.close()
            with self._cv:
                self._cv.notify_all()

    def _write(self, conn: sqlite3.Connection | None, rows: list[UsageRecord]):
        """(connection, one (outcome, error) per row); outcome is "written", "held" or "dropped"."""
        try:
            if conn is None:
                conn = self._connect()
            self._commit(conn, rows)
            return conn, [("written", None)] * len(rows)
        except Exception as e:  # noqa: BLE001 - sorted below: the database's fault or a row's
            self.failures += 1
            if conn is None or self._database_error(e):
                log.error("ledger: committing %d rows failed (%s); keeping them to retry", len(rows), e)
                return conn, [("held", e)] * len(rows)
            if len(rows) > 1:
                log.error("ledger: a batch of %d rows failed (%s); writing them one by one", len(rows), e)
            first_error = e
        outcome: list[tuple[str, Exception | None]] = []
        for i, rec in enumerate(rows):
            error = first_error if len(rows) == 1 else self._try(conn, rec)
            if error is not None and not self._database_error(error):
                error = self._try(conn, rec.cleaned())
                if error is None:
                    log.warning("ledger: the row of request %s was refused and written sanitised", rec.request_id)
            if error is None:
                outcome.append(("written", None))
            elif self._database_error(error):  # the database failed meanwhile: keep this row and the rest
                return conn, outcome + [("held", error)] * (len(rows) - i)
            else:
                outcome.append(("dropped", error))
        return conn, outcome

    def _try(self, conn: sqlite3.Connection, rec: UsageRecord) -> Exception | None:
        try:
            self._commit(conn, [rec])
        except Exception as e:  # noqa: BLE001 - the caller sorts it
            self.failures += 1
            return e
        return None

    def _commit(self, conn, rows: list[UsageRecord]) -> None:
        dup = self._commit_rows(conn, rows)
        self.commits += 1
        if dup:
            log.error("ledger: rows for %d request(s) already settled were ignored (a bug: one row per request): %s",
                      len(dup), ", ".join(dup[:10]))

    def _settle(self, batch: list[tuple[_Entry, UsageRecord]], outcome: list, taken_seq: int) -> None:
        """Apply a write's outcome to the pending map (under the lock)."""
        held = any(what == "held" for what, _ in outcome)
        if held and self._stopping:
            self._stop_failures += 1
        give_up = self._stopping and self._stop_failures >= self.STOP_ATTEMPTS
        for (entry, rec), (what, error) in zip(batch, outcome, strict=True):
            if what == "held":
                entry.attempts += 1
                if entry.attempts < self.RETRY_ATTEMPTS and not give_up:
                    continue
                what = "dropped"
            if what == "dropped":
                log.error("ledger: dropped the row of request %s after %d tries (%s); the row, to restore it "
                          "by hand: %s", rec.request_id, max(1, entry.attempts), clean_label(error, 300),
                          _row_json(rec))
            if self._pending.get(rec.request_id) is not entry:
                continue
            if entry.rec is rec:
                del self._pending[rec.request_id]
            else:  # a newer version arrived while this one was written: it goes with the next batch
                entry.seq, entry.attempts = taken_seq + 1, 0
        if held and not give_up:
            if self._stopping:
                self._delay = min(self._delay, 0.5)  # close() is waiting: a few quick tries, not minutes
            self._retry_at = time.monotonic() + self._delay
            self._delay = min(self._delay * 2, self.RETRY_MAX_S)
        elif any(what == "written" for what, _ in outcome):
            self._delay = self.RETRY_BASE_S
