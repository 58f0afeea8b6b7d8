"""server/keys.py and server/store.py: key text, the key table and the usage ledger (SQLite)."""

from __future__ import annotations

import sqlite3
import stat
import threading
from datetime import UTC, datetime

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
    store._pending["req-3"] = rec(3, key, prompt=10, completion=5)
    assert store.tokens_used(key.key_id, NOW - 1) == 75 and len(store.usage()) == 6
    store._pending.clear()


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
    assert not store._pending
