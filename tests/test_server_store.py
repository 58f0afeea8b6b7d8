"""server/keys.py and server/store.py: key text, the key table and the usage ledger (SQLite)."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import stat
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from muse.common.errors import UsageError
from muse.server import keys as K
from muse.server.records import ApiKey, UsageRecord, parse_duration, parse_utc, utc_iso
from muse.server.store import SCHEMA_VERSION, AuthError, Store, StoreError, default_db_path

NOW = 1_750_000_000.0  # 2025-06-15T15:06:40Z
BODY = "A" * 20 + "b-_9" * 5 + "xyz"  # a fixed 43-char body: deterministic typo tests


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def rec(i, key: ApiKey | str = "key_000000000000", *, partner="acme", model="small", prompt=10, completion=5,
        cached=0, status="ok", at=NOW, rid=None) -> UsageRecord:
    key_id = key if isinstance(key, str) else key.key_id
    return UsageRecord(request_id=rid or f"req-{i}", key_id=key_id, partner=partner, model=model,
                       endpoint="completions", prompt_tokens=prompt, completion_tokens=completion,
                       cached_tokens=cached, status=status, http_status=200, finish_reason="stop",
                       created_at=at, latency_s=0.25, ttft_s=0.01)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "serve.sqlite3", clock=lambda: NOW)
    yield s
    s.close()


# ------------------------------------------------------------------------------------------ key text

def test_key_format_and_checksum():
    key = K.generate_key()
    assert key.startswith("muse-sk-") and len(key) == K.KEY_LENGTH == 58 and K.check_format(key)
    assert K.generate_key() != key
    fixed = K.format_key(BODY)
    assert K.check_format(fixed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
    for i in range(len(K.KEY_PREFIX), len(fixed)):  # every one-character typo in body, separator or checksum
        for ch in alphabet[::7] + fixed[i].swapcase():
            typo = fixed[:i] + ch + fixed[i + 1:]
            if typo != fixed:
                assert not K.check_format(typo), (i, ch)
    for bad in (fixed[:-1], fixed + "0", "sk-" + fixed[8:], fixed.replace("muse-sk-", "muse_sk-"), "", None, 42,
                fixed[:20] + " " + fixed[21:]):
        assert not K.check_format(bad)
    h = K.hash_key(fixed)
    assert len(h) == 64 and h == K.hash_key(fixed) and h != K.hash_key(key)
    ids = {K.new_key_id() for _ in range(50)}
    assert len(ids) == 50 and all(K.is_key_id(i) for i in ids) and not K.is_key_id("key_xyz")
    with pytest.raises(ValueError):
        K.format_key("short")


# ------------------------------------------------------------------------------------------ the file

def _db_bytes(path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def test_only_the_hash_reaches_the_disk_and_the_file_is_private(tmp_path):
    path = tmp_path / "db" / "serve.sqlite3"
    s = Store(path)
    text, key = s.create_key("acme")
    s.record(rec(1, key))
    s.flush()
    # the store is still open, so the -wal file holds the recent pages: scan every file of the database
    data = _db_bytes(path)
    assert K.hash_key(text).encode() in data and key.key_id.encode() in data  # the scan can find things
    assert text.encode() not in data and text[8:51].encode() not in data
    for p in path.parent.glob(path.name + "*"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    s.close()
    assert text.encode() not in _db_bytes(path)


def test_wal_schema_version_and_indexes(store):
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    cols = {name: [r[2] for r in conn.execute(f"PRAGMA index_info({name})")]
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
    assert ["key_hash"] in cols.values()
    assert ["key_id", "created_at"] in cols.values() and ["partner", "created_at"] in cols.values()
    assert store._conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    conn.close()


def test_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(StoreError, match="no serving database"):
        Store(tmp_path / "missing.sqlite3", create=False)
    assert not (tmp_path / "missing.sqlite3").exists()
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        Store(junk)
    with pytest.raises(StoreError, match="directory"):
        Store(tmp_path)
    newer = tmp_path / "newer.sqlite3"
    Store(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer Muse"):
        Store(newer)


def test_default_db_path(monkeypatch, tmp_path):
    monkeypatch.delenv("MUSE_SERVE_DB", raising=False)
    monkeypatch.setenv("MUSE_HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / "serve.sqlite3"
    monkeypatch.setenv("MUSE_SERVE_DB", str(tmp_path / "x.db"))
    assert default_db_path() == tmp_path / "x.db"


# ------------------------------------------------------------------------------------------ keys

def test_create_key_settings_and_validation(store):
    text, key = store.create_key(" acme ", models=["small", "large", "small"], rpm=60, tpm=1000,
                                 token_quota=5000, period="month", expires_at=NOW + 3600)
    assert key.partner == "acme" and key.models == ("small", "large") and key.created_at == NOW
    assert store.get_key(key.key_id) == key and store.get_key("key_nope") is None
    assert key.allows_model("large") and not key.allows_model("medium")
    assert store.create_key("b")[1].allows_model("anything")
    for kwargs in ({"rpm": 0}, {"tpm": -5}, {"rpm": 1.5}, {"token_quota": 10}, {"period": "day"},
                   {"token_quota": 10, "period": "week"}, {"models": []}, {"models": ["a", ""]},
                   {"expires_at": NOW - 1}, {"rpm": True}):
        with pytest.raises(UsageError):
            store.create_key("acme", **kwargs)
    for partner in ("", "  ", "a\nb", "x" * 201):
        with pytest.raises(UsageError):
            store.create_key(partner)
    assert len(store.list_keys()) == 2


def test_authenticate_ok_invalid_revoked_expired(store):
    text, key = store.create_key("acme", expires_at=NOW + 100)
    assert store.authenticate(text) == key
    assert store.authenticate(text, now=NOW + 99.9) == key

    def refused(key_text, reason, **kw):
        with pytest.raises(AuthError) as e:
            store.authenticate(key_text, **kw)
        assert e.value.reason == reason
        assert not key_text or key_text[8:] not in str(e.value)  # never echo the key
        return e.value

    assert refused(text, "expired", now=NOW + 100).key_id == key.key_id
    refused(K.format_key(BODY), "invalid")            # well-formed, unknown
    refused(text[:-1] + ("0" if text[-1] != "0" else "1"), "invalid")  # a typo in the checksum
    refused("", "invalid")
    refused(None, "invalid")
    refused("Bearer " + text, "invalid")
    store.revoke(key.key_id, now=NOW + 1)
    assert refused(text, "revoked").key_id == key.key_id
    assert store.get_key(key.key_id).revoked_at == NOW + 1


def test_revoke_and_list(store):
    _, a = store.create_key("acme")
    _, b = store.create_key("lab2", expires_at=NOW + 10)
    first = store.revoke(a.key_id)
    assert store.revoke(a.key_id, now=NOW + 50).revoked_at == first.revoked_at  # idempotent
    assert [k.key_id for k in store.list_keys()] == [b.key_id]
    assert {k.key_id for k in store.list_keys(include_revoked=True)} == {a.key_id, b.key_id}
    assert store.list_keys(partner="acme") == [] and len(store.list_keys(partner="acme", include_revoked=True)) == 1
    assert b.status(NOW) == "active" and b.status(NOW + 10) == "expired" and first.status(NOW) == "revoked"
    with pytest.raises(UsageError, match="Did you mean") as e:
        store.revoke(a.key_id[:-1] + "z")
    assert a.key_id in str(e.value)


def test_rotate_keeps_settings_and_revokes_the_old_key(store):
    old_text, old = store.create_key("acme", models=["small"], rpm=5, tpm=50, token_quota=100, period="day",
                                     expires_at=NOW + 1000)
    new_text, new = store.rotate(old.key_id, now=NOW + 1)
    assert new_text != old_text and new.key_id != old.key_id and new.rotated_from == old.key_id
    same = ("partner", "models", "rpm", "tpm", "token_quota", "period", "expires_at")
    assert all(getattr(new, f) == getattr(old, f) for f in same)
    assert store.authenticate(new_text) == new
    with pytest.raises(AuthError, match="revoked"):
        store.authenticate(old_text)
    with pytest.raises(UsageError, match="revoked"):
        store.rotate(old.key_id)
    with pytest.raises(UsageError, match="expired"):
        store.rotate(new.key_id, now=NOW + 1000)
    with pytest.raises(UsageError, match="no key"):
        store.rotate("key_000000000000")


def test_quota_periods_are_utc_calendar_periods():
    key = ApiKey("key_1", "p", None, None, None, 10, "month", None, NOW)
    t = ts("2024-02-29T23:59:59")
    assert key.period_start(t) == ts("2024-02-01T00:00:00") and key.period_end(t) == ts("2024-03-01T00:00:00")
    day = ApiKey("key_1", "p", None, None, None, 10, "day", None, NOW)
    assert day.period_start(t) == ts("2024-02-29T00:00:00") and day.period_end(t) == ts("2024-03-01T00:00:00")
    assert day.period_start(ts("2024-03-01T00:00:00")) == ts("2024-03-01T00:00:00")
    none = ApiKey("key_1", "p", None, None, None, None, None, None, NOW)
    assert none.period_start(t) is None and none.period_end(t) is None


def test_time_parsing():
    assert parse_utc("2025-06-30") == ts("2025-06-30T00:00:00")
    assert parse_utc("2025-06-30T12:00:00Z") == parse_utc("2025-06-30T14:00:00+02:00") == parse_utc("2025-06-30T12:00")
    for bad in ("tomorrow", "2025-13-01", "30/06/2025", ""):
        with pytest.raises(UsageError, match="YYYY-MM-DD"):
            parse_utc(bad)
    assert parse_duration("7d") == 7 * 86400 and parse_duration("24h") == 86400 and parse_duration("2025-01-01") is None
    assert utc_iso(ts("2025-06-30T12:00:00")) == "2025-06-30T12:00:00Z" and utc_iso(None) is None


# ------------------------------------------------------------------------------------------ ledger

def test_exactly_one_row_per_request(store, caplog):
    store.record(rec(1, prompt=10))
    store.record(rec(1, prompt=999))          # queued twice: the second is a bug, ignored
    store.flush()
    store.record(rec(1, prompt=555))          # already committed: ignored by the primary key
    store.record(rec(2))
    store.flush()
    rows = store.usage()
    assert [r.request_id for r in rows] == ["req-1", "req-2"] and rows[0].prompt_tokens == 10
    assert rows[0] == rec(1, prompt=10)       # every field survives the round trip
    with pytest.raises(ValueError):
        rec(3, status="weird")
    with pytest.raises(ValueError):
        rec(3, prompt=-1)


def test_tokens_used_counts_rows_still_queued(store):
    _, key = store.create_key("acme")
    store.record(rec(0, key, prompt=100, completion=1, at=NOW - 86400))   # before `since`: not counted
    store.flush()
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # hold the write lock: the writer cannot commit what follows
    try:
        for i in range(1, 6):
            store.record(rec(i, key, prompt=10, completion=5))
        assert store.tokens_used(key.key_id, NOW - 1) == 75
        assert len(store.usage(key_id=key.key_id)) == 6
        assert store.usage_summary()[0]["requests"] == 6
        committed = sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
        assert committed == 1  # the five really were still queued
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    store.flush()
    assert store.tokens_used(key.key_id, NOW - 1) == 75 and store.tokens_used(key.key_id, 0) == 176
    # the window between the writer's commit and its un-pending: a row in both places counts once
    store._ledger._set(rec(3, key, prompt=10, completion=5))
    assert store.tokens_used(key.key_id, NOW - 1) == 75 and len(store.usage()) == 6
    assert store.usage_summary()[0]["requests"] == 6
    store._ledger._pending.clear()


def test_usage_filters_and_summary(store):
    _, a = store.create_key("acme")
    _, b = store.create_key("lab2")
    store.record(rec(1, a, model="small", at=NOW - 7200, cached=4))
    store.record(rec(2, a, model="large", at=NOW - 60, status="aborted", completion=2))
    store.record(rec(3, a, model="small", at=NOW, status="error", prompt=0, completion=0))
    store.record(rec(4, b, partner="lab2", at=NOW))
    store.flush()
    assert [r.request_id for r in store.usage(partner="acme")] == ["req-1", "req-2", "req-3"]
    assert [r.request_id for r in store.usage(since=NOW - 60)] == ["req-2", "req-3", "req-4"]
    assert [r.request_id for r in store.usage(until=NOW - 60)] == ["req-1"]
    assert [r.request_id for r in store.usage(key_id=b.key_id)] == ["req-4"]
    assert store.usage(partner="nobody") == []
    summary = store.usage_summary(partner="acme")
    assert [(g["model"], g["requests"]) for g in summary] == [("large", 1), ("small", 2)]
    small = summary[1]
    assert small["statuses"] == {"error": 1, "ok": 1} and small["prompt_tokens"] == 10 and small["cached_tokens"] == 4
    assert small["first_at"] == NOW - 7200 and small["last_at"] == NOW and small["total_tokens"] == 15
    assert [g["partner"] for g in store.usage_summary(since=NOW)] == ["acme", "lab2"]
    assert store.tokens_used(a.key_id, NOW - 3600) == 12


def test_a_restart_keeps_keys_and_ledger(tmp_path):
    path = tmp_path / "serve.sqlite3"
    s = Store(path)
    text, key = s.create_key("acme", token_quota=100, period="day")
    for i in range(3):
        s.record(rec(i, key))
    s.close()  # flushes
    s.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        s.record(rec(9, key))
    s2 = Store(path)
    assert s2.authenticate(text) == key and len(s2.usage()) == 3
    s2.close()


def test_two_stores_on_one_file_see_each_others_writes(tmp_path):
    path = tmp_path / "serve.sqlite3"
    server = Store(path)                    # the server process
    cli = Store(path, create=False)         # `muse keys ...` in another process
    text, key = cli.create_key("acme")
    assert server.authenticate(text) == key     # a key created by the CLI works at once
    server.record(rec(1, key))
    server.flush()
    assert [r.request_id for r in cli.usage()] == ["req-1"]
    cli.revoke(key.key_id)
    with pytest.raises(AuthError, match="revoked"):
        server.authenticate(text)               # and a revocation applies at once
    server.close()
    cli.close()


def test_concurrent_records_from_threads_lose_nothing(store):
    _, key = store.create_key("acme")
    n_threads, per_thread = 8, 150
    barrier = threading.Barrier(n_threads)

    def work(t):
        barrier.wait()
        for i in range(per_thread):
            store.record(rec(f"{t}-{i}", key, prompt=t + 1, completion=1))
            if i % 50 == 0:
                store.tokens_used(key.key_id, 0)  # reads interleaved with writes from other threads

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    expected = sum((t + 2) * per_thread for t in range(n_threads))
    assert store.tokens_used(key.key_id, 0) == expected  # before the flush: queued rows count
    store.flush(timeout=30)
    assert len(store.usage()) == n_threads * per_thread
    assert store.tokens_used(key.key_id, 0) == expected
    assert not store._ledger.pending()


# ------------------------------------------------------------------------- a bad row, a sick disk

def _committed(path) -> dict[str, tuple]:
    conn = sqlite3.connect(path)
    try:
        return {r[0]: r for r in conn.execute("SELECT request_id, model, status, prompt_tokens, completion_tokens "
                                              "FROM ledger")}
    finally:
        conn.close()


def _poison(path):
    """A trigger that makes SQLite refuse any row for model 'poison', however it is cleaned."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TRIGGER poison BEFORE INSERT ON ledger WHEN NEW.model = 'poison' "
                 "BEGIN SELECT RAISE(ABORT, 'poison row'); END")
    conn.commit()
    conn.close()


def test_a_bad_row_never_blocks_the_writer(tmp_path, caplog):
    # A lone surrogate in the model name used to fail every commit of its batch, retried forever: no
    # later row reached the disk, flush() never returned and close() hung.
    path = tmp_path / "serve.sqlite3"
    s = Store(path, clock=lambda: NOW)
    _poison(path)
    s.record(rec(1, model="\ud800evil"))
    s.record(rec(2, model="poison"))                     # refused by SQLite even when cleaned: dropped
    s.record(rec(3))
    assert s.flush(timeout=10) is True
    s.record(rec(4))
    assert s.close(timeout=10) is True
    rows = _committed(path)
    assert set(rows) == {"req-1", "req-3", "req-4"} and rows["req-1"][1] == "\ufffdevil"
    dropped = [r.getMessage() for r in caplog.records if "dropped the row of request req-2" in r.getMessage()]
    assert len(dropped) == 1 and '"model": "poison"' in dropped[0]   # the whole row is in the log


def test_the_writer_splits_a_failing_batch_and_sanitises_a_row_that_fails_alone(store, caplog):
    # Rows reach the writer cleaned (record() calls cleaned()); this hands one in raw, as a bug upstream
    # might, to check the writer's own defence: the batch fails, the good rows go in one by one, the
    # bad row is sanitised and written.
    store.record(rec(0))
    store.flush()
    with store._ledger._cv:  # queue all three before the writer wakes: one batch
        store._ledger._set(rec(1))
        store._ledger._set(rec(2, model="bad\ud800\x1b[2J"))
        store._ledger._set(rec(3))
        store._ledger._urgent = True
        store._ledger._cv.notify_all()
    assert store.flush(timeout=10)
    rows = _committed(store.path)
    assert set(rows) == {"req-0", "req-1", "req-2", "req-3"} and rows["req-2"][1] == "bad\ufffd\\x1b[2J"
    assert store._ledger.failures == 2 and any("written sanitised" in r.getMessage() for r in caplog.records)


@pytest.fixture
def quick_retries(monkeypatch):
    from muse.server.ledger import LedgerWriter

    monkeypatch.setattr(LedgerWriter, "RETRY_BASE_S", 0.001)
    monkeypatch.setattr(LedgerWriter, "RETRY_MAX_S", 0.01)
    return LedgerWriter


def _wait_for_failures(s: Store, n: int) -> None:
    """Wait (on the writer's condition, no sleeps) until it has failed `n` commits."""
    deadline = time.monotonic() + 30
    with s._ledger._cv:
        while s._ledger.failures < n:
            assert time.monotonic() < deadline, "the writer never failed"
            s._ledger._cv.wait(0.05)


def test_a_locked_database_keeps_rows_and_retries_them(tmp_path, quick_retries):
    path = tmp_path / "serve.sqlite3"
    s = Store(path, busy_timeout_ms=10, clock=lambda: NOW)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")                   # "database is locked" for the writer
    try:
        for i in range(3):
            s.record(rec(i, prompt=10, completion=5))
        _wait_for_failures(s, 3)
        assert s.flush(timeout=0.05) is False            # a timeout, not a hang, not an exception
        assert s.tokens_used("key_000000000000", 0) == 45 and len(s.usage()) == 3   # still counted
        assert _committed(path) == {}
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert s.flush(timeout=10) is True and set(_committed(path)) == {"req-0", "req-1", "req-2"}
    assert s.close(timeout=10) is True


def test_rows_are_dropped_after_bounded_retries_and_close_never_hangs(tmp_path, quick_retries, monkeypatch, caplog):
    monkeypatch.setattr(quick_retries, "RETRY_ATTEMPTS", 4)
    path = tmp_path / "serve.sqlite3"
    s = Store(path, busy_timeout_ms=10, clock=lambda: NOW)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        s.record(rec(1))
        assert s.flush(timeout=30) is True               # given up on: logged in full, not pending
        assert s._ledger.failures == 4 and not s._ledger.pending()
        assert any('"request_id": "req-1"' in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        s.record(rec(2))
        assert s.close(timeout=30) is True               # close() tries STOP_ATTEMPTS times, then gives up
        assert s._ledger.failures == 4 + quick_retries.STOP_ATTEMPTS
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert _committed(path) == {}


def test_close_with_a_timeout_returns_and_logs_the_rows(tmp_path, quick_retries, monkeypatch, caplog):
    monkeypatch.setattr(quick_retries, "RETRY_MAX_S", 0.5)
    monkeypatch.setattr(quick_retries, "STOP_ATTEMPTS", 100)   # the writer is still trying when close() gives up
    path = tmp_path / "serve.sqlite3"
    s = Store(path, busy_timeout_ms=10)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        s.record(rec(7))
        _wait_for_failures(s, 1)
        t0 = time.monotonic()
        assert s.close(timeout=0.2) is False
        assert time.monotonic() - t0 < 3
        assert any("unwritten row" in r.getMessage() and "req-7" in r.getMessage() for r in caplog.records)
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    s._ledger._thread.join(30)                           # the writer's next try gets through after all
    assert not s._ledger._thread.is_alive() and set(_committed(path)) == {"req-7"}


# ------------------------------------------------------------------------------------- text fields

def test_record_bounds_and_cleans_text_fields(store):
    from muse.server.records import LABEL_LIMIT, clean_label

    huge = "\x1b]0;pwned\x07" + "m" * 1_000_000
    store.record(rec(1, model=huge, partner="acme\r\nFORGED 1 2 3"))
    store.record(rec(2, model="\u202egnp.exe\ud83d"))
    assert store.flush(timeout=10)
    rows = {r.request_id: r for r in store.usage()}
    m1 = rows["req-1"].model
    assert len(m1) <= LABEL_LIMIT and m1.startswith("\\x1b]0;pwned\\x07mmm") and m1.endswith("\u2026")
    assert rows["req-1"].partner == "acme\\r\\nFORGED 1 2 3"
    assert rows["req-2"].model == "\\u202egnp.exe\ufffd"
    assert all(r.model.isprintable() for r in rows.values())
    # the helper the server uses too
    assert clean_label("small") == "small" and clean_label("modèle-漢字") == "modèle-漢字"
    assert clean_label("a\tb\x7f\x9b") == "a\\tb\\x7f\\x9b" and clean_label(42) == "42"
    assert clean_label("x" * 200, limit=10) == "x" * 9 + "\u2026" and clean_label("\x00" * 50, 9) == "\\x00\\x00\u2026"
    assert len(clean_label("y" * 10**6, limit=None)) == 10**6
    with pytest.raises(ValueError):
        rec(9, rid="req-\x1b")              # the primary key is the server's: refused, never rewritten


# ---------------------------------------------------------------------------------- crash safety

def running(i, key="key_000000000000", *, prompt=10, at=NOW) -> UsageRecord:
    return UsageRecord(request_id=f"req-{i}", key_id=key, partner="acme", model="small", endpoint="completions",
                       prompt_tokens=prompt, completion_tokens=0, cached_tokens=0, status="running", http_status=200,
                       finish_reason=None, created_at=at, latency_s=0.0)


def test_begin_progress_record_is_one_row_and_progress_is_coalesced(tmp_path, monkeypatch):
    t = [NOW]
    s = Store(tmp_path / "serve.sqlite3", clock=lambda: t[0])
    monkeypatch.setattr(s._ledger, "PROGRESS_INTERVAL_S", 3600.0)  # only flush() writes progress here
    s.begin(running(1, prompt=100))
    assert s.flush(timeout=10) and s._ledger.commits == 1
    assert _committed(s.path)["req-1"][2:] == ("running", 100, 0)
    assert s.tokens_used("key_000000000000", 0) == 100
    for n in range(1, 1001):                             # one note per token: no transaction each
        t[0] = NOW + n / 100
        s.progress("req-1", n, 4)
    assert s._ledger.commits == 1 and s.tokens_used("key_000000000000", 0) == 1100   # known, not yet written
    assert s.flush(timeout=10) and s._ledger.commits == 2
    row = s.usage()[0]
    assert (row.status, row.completion_tokens, row.cached_tokens, row.latency_s) == ("running", 1000, 4, 10.0)
    s.record(rec(1, prompt=100, completion=1002, cached=4, status="ok"))
    s.progress("req-1", 5, 0)                            # late note after the settlement: ignored
    s.record(rec(1, prompt=1, status="aborted"))         # a second settlement: a bug, ignored
    assert s.flush(timeout=10)
    assert _committed(s.path) == {"req-1": ("req-1", "small", "ok", 100, 1002)}
    assert s.tokens_used("key_000000000000", 0) == 1102 and s.usage_summary()[0]["statuses"] == {"ok": 1}
    with pytest.raises(ValueError, match="running"):
        s.begin(rec(2))
    with pytest.raises(ValueError, match="begin"):
        s.record(running(2))
    s.close()


def test_a_settled_row_replaces_a_running_one_still_queued_or_committed(store):
    store.begin(running(1))
    store.record(rec(1, prompt=10, completion=3))        # replaces it in memory, before any commit
    store.begin(running(2))
    store.flush()
    store.progress("req-2", 7, 0)                        # pending progress over a committed running row
    summary = store.usage_summary()[0]
    assert summary["requests"] == 2 and summary["statuses"] == {"ok": 1, "running": 1}
    assert summary["completion_tokens"] == 10 and store.tokens_used("key_000000000000", 0) == 30
    store.record(rec(2, prompt=10, completion=8))
    assert [(r.request_id, r.status) for r in store.usage()] == [("req-1", "ok"), ("req-2", "ok")]
    store.flush()
    assert store.usage_summary()[0]["statuses"] == {"ok": 2} and store.tokens_used("key_000000000000", 0) == 31


def test_progress_alone_is_written_within_the_interval(store, monkeypatch):
    monkeypatch.setattr(store._ledger, "PROGRESS_INTERVAL_S", 0.01)
    store.begin(running(1))
    store.flush()
    store.progress("req-1", 3, 0)
    deadline = time.monotonic() + 30
    with store._ledger._cv:                              # no flush: the writer's own timer writes it
        while store._ledger.pending():
            assert time.monotonic() < deadline
            store._ledger._cv.wait(0.05)
    assert _committed(store.path)["req-1"][2:] == ("running", 10, 3)


_CRASH = """
import os, signal, sys
from muse.server.store import Store
from muse.server.records import UsageRecord

def row(i, status, completion=0, prompt=100):
    return UsageRecord(f"req-{i}", "key_000000000000", "acme", "small", "completions", prompt, completion, 0, status,
                       200, None, 1750000000.0, 0.0)

s = Store(sys.argv[1])
s.lock_for_server()
s.begin(row(1, "running"))
s.begin(row(2, "running"))
s.begin(row(3, "running"))
s.progress("req-1", 40, 0)
assert s.flush(timeout=30)
s.record(row(3, "ok", completion=9))
assert s.flush(timeout=30)
s.progress("req-1", 55, 0)           # not committed: lost with the process
s.begin(row(4, "running", prompt=7))  # nor this
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_server_leaves_interrupted_rows_billed_to_the_last_commit(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "serve.sqlite3"
    Store(path).close()
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9 and "ready" in proc.stdout, proc.stderr
    s = Store(path)
    with pytest.raises(RuntimeError, match="lock_for_server"):
        s.recover_interrupted()
    s.lock_for_server()                                  # the dead server's lock died with it
    # The last two calls before the kill may or may not reach the disk: the writer thread commits on
    # its own as soon as rows queue up, and SIGKILL can land before or after that. Either outcome is
    # what was committed, never more.
    recovered = s.recover_interrupted()
    assert recovered in (2, 3) and s.recover_interrupted() == 0
    rows = {rid: (r.status, r.prompt_tokens, r.completion_tokens) for rid, r in
            ((r.request_id, r) for r in s.usage())}
    assert rows.pop("req-1") in (("interrupted", 100, 40), ("interrupted", 100, 55))
    assert rows.pop("req-2") == ("interrupted", 100, 0) and rows.pop("req-3") == ("ok", 100, 9)
    assert rows == ({"req-4": ("interrupted", 7, 0)} if recovered == 3 else {})
    expected = 100 + 100 + 109 + (7 if recovered == 3 else 0)
    assert s.tokens_used("key_000000000000", 0) - expected in (40, 55)
    s.close()


# --------------------------------------------------------------------------- one server per database

def test_two_servers_on_one_database_are_refused(tmp_path):
    import os

    path = tmp_path / "serve.sqlite3"
    first, second = Store(path), Store(path)
    first.lock_for_server()
    first.lock_for_server()                              # idempotent
    # flock locks belong to the open file description: a second open conflicts, even in this process
    with pytest.raises(StoreError, match=rf"another muse serve \(pid {os.getpid()}\) is using DB .*PostgreSQL"):
        second.lock_for_server()
    second.create_key("acme")                            # without the lock the CLI's work goes on
    first.close()
    second.lock_for_server()                             # released by close()
    second.close()
    assert (tmp_path / "serve.sqlite3.serve.lock").exists()


def test_a_url_is_never_a_file_and_open_store_dispatches_on_it(tmp_path, monkeypatch):
    from muse.server.store import open_store

    monkeypatch.chdir(tmp_path)
    for url in ("postgresql://muse:s3cret@db.internal/muse", "sqlite:///x.db", "https://example.com/db"):
        with pytest.raises(StoreError, match=r"is a URL, but this is the SQLite store, which takes a file path") as e:
            Store(url)
        assert "s3cret" not in str(e.value)                 # a URL may carry a password: never echoed
    for url in ("sqlite:///x.db", "https://u:s3cret@example.com/db", "mysql://x"):
        with pytest.raises(StoreError, match=r"is a URL Muse cannot open: pass a postgresql://") as e:
            open_store(url)
        assert "s3cret" not in str(e.value)
    with pytest.raises(StoreError, match=r"cannot connect to the serving database postgresql://muse:\*\*\*@127.0.0.1:1/x") as e:
        open_store("postgresql://muse:s3cret@127.0.0.1:1/x")   # nothing listens on port 1: PostgreSQL, refused
    assert "s3cret" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    s = open_store(tmp_path / "a.sqlite3")                   # a path: the SQLite store
    assert isinstance(s, Store) and s.kind == "sqlite" and s.replicas() == []
    s.close()


# ------------------------------------------------------------------------------------- rotation

def test_a_rotation_chain_shares_one_owner_and_its_usage(store):
    _, a = store.create_key("acme", token_quota=100, period="day")
    _, b = store.rotate(a.key_id)
    _, c = store.rotate(b.key_id)
    _, other = store.create_key("acme")
    assert a.owner_id == b.owner_id == c.owner_id == a.key_id == store.get_key(c.key_id).owner_id
    assert [store.quota_owner(k) for k in (a, b, c, other)] == [a.key_id] * 3 + [other.key_id]
    assert store.quota_owner(dataclasses.replace(c, owner_id=None)) == a.key_id    # looked up
    for i, k in enumerate((a, b, c, other, c)):
        store.record(rec(i, k, prompt=10, completion=i))
    assert store.chain_tokens_used(a.key_id, 0) == 40 + 0 + 1 + 2 + 4            # queued or not, once each
    store.flush()
    assert store.chain_tokens_used(a.key_id, 0) == 47 and store.chain_tokens_used(other.key_id, 0) == 13


# ------------------------------------------------------------------------------------- migration

ASSET_V1 = Path(__file__).parent / "assets" / "serve_v1.sqlite3"
# tests/assets/serve_v1.sqlite3 was written by the schema-1 code (`git show 099e415:src/muse/server/
# store.py` and records.py, run from a temporary copy): keys A (acme, models small+large, rpm 60, tpm
# 10000, quota 100000/month), B (lab2, revoked), C (acme, quota 5000/day) rotated to D, then to E;
# key texts are muse-sk-<43 x the letter>_<checksum>; six ledger rows, one per key and status kind.


def _schema(path) -> list:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall()
    finally:
        conn.close()


def test_a_version_1_database_is_upgraded_in_place_and_keeps_everything(tmp_path):
    path = tmp_path / "serve.sqlite3"
    shutil.copy(ASSET_V1, path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    old_rows = conn.execute("SELECT * FROM ledger ORDER BY request_id").fetchall()
    old_keys = conn.execute("SELECT * FROM api_keys ORDER BY key_id").fetchall()
    conn.close()
    assert len(old_rows) == 6 and len(old_keys) == 5

    s = Store(path, clock=lambda: NOW + 1000)   # the asset's times are around NOW; key E expires a year later
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert [r[:-1] for r in conn.execute("SELECT * FROM ledger ORDER BY request_id")] == old_rows  # + replica
    assert [r[:-1] for r in conn.execute("SELECT * FROM api_keys ORDER BY key_id")] == old_keys
    conn.close()
    fresh = tmp_path / "fresh.sqlite3"
    Store(fresh).close()
    assert _schema(path) == _schema(fresh)               # upgraded and new files are the same

    a = s.authenticate(K.format_key("A" * 43))
    assert (a.partner, a.models, a.rpm, a.tpm, a.token_quota, a.period) == ("acme", ("small", "large"), 60,
                                                                           10000, 100000, "month")
    e = s.authenticate(K.format_key("E" * 43))
    for letter, reason in (("B", "revoked"), ("C", "revoked"), ("D", "revoked")):
        with pytest.raises(AuthError, match=reason):
            s.authenticate(K.format_key(letter * 43))
    chain = [e.key_id, e.rotated_from, s.get_key(e.rotated_from).rotated_from]
    root = chain[-1]
    assert [s.get_key(k).owner_id for k in chain] == [root] * 3 and a.owner_id == a.key_id
    assert s.chain_tokens_used(s.quota_owner(e), 0) == 150 + 220 + 8
    assert s.tokens_used(e.key_id, 0) == 8 and s.tokens_used(a.key_id, 0) == 26
    summary = s.usage_summary()
    assert sum(g["requests"] for g in summary) == 6 and sum(g["total_tokens"] for g in summary) == 404
    assert {st for g in summary for st in g["statuses"]} == {"ok", "aborted", "error"}
    # and it keeps working as a v2 database
    s.begin(running(9, e.key_id, prompt=5))
    s.record(dataclasses.replace(rec(9, e, prompt=5, completion=1), partner="acme"))
    _, f = s.rotate(e.key_id)
    assert f.owner_id == root and s.chain_tokens_used(root, 0) == 384
    assert s.close(timeout=10)


def test_a_failed_upgrade_leaves_the_old_file_untouched(tmp_path, monkeypatch):
    from muse.server import schema

    path = tmp_path / "serve.sqlite3"
    shutil.copy(ASSET_V1, path)

    def broken(c):
        c.execute("ALTER TABLE api_keys ADD COLUMN owner_id TEXT")
        raise sqlite3.OperationalError("disk I/O error")  # half-way through

    monkeypatch.setitem(schema.MIGRATIONS, 2, broken)
    with pytest.raises(sqlite3.OperationalError):
        Store(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    assert "owner_id" not in [r[1] for r in conn.execute("PRAGMA table_info(api_keys)")]
    conn.close()
    monkeypatch.undo()
    Store(path).close()                                  # and the real upgrade still works
