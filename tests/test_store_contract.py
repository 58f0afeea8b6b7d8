"""One contract, two stores: every test here runs against the SQLite file and a real PostgreSQL database
(pg_kit.py), through the same Store interface (server/sqlstore.py). What only one of them does (the
SQLite file's mode and journal, PostgreSQL's leases and holds) is tested at the end or in its own file."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest

from muse.common.errors import UsageError
from muse.server.limits import QuotaExceeded
from muse.server.records import UsageRecord
from muse.server.schema import SCHEMA_VERSION
from muse.server.store import AuthError, StoreError, open_store

pytest_plugins = ["pg_kit"]   # the pg_cluster and pg_url fixtures: a real PostgreSQL

NOW = 1_750_000_000.0  # 2025-06-15T15:06:40Z


def rec(i, key="key_000000000000", *, prompt=10, completion=5, status="ok", at=NOW, model="small",
        partner="acme") -> UsageRecord:
    return UsageRecord(request_id=f"req-{i}", key_id=key, partner=partner, model=model, endpoint="completions",
                       prompt_tokens=prompt, completion_tokens=completion, cached_tokens=0, status=status,
                       http_status=200 if status != "running" else 0, finish_reason=None, created_at=at,
                       latency_s=0.5)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """What --db would say for a fresh database of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "serve.sqlite3")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db):
    s = open_store(db, clock=lambda: NOW, replica="r1")
    yield s
    s.close()


def test_keys_lifecycle(store):
    text, key = store.create_key(" acme ", models=["small", "large", "small"], rpm=60, tpm=1000,
                                 token_quota=5000, period="month", expires_at=NOW + 3600)
    assert key.partner == "acme" and key.models == ("small", "large") and store.get_key(key.key_id) == key
    assert store.authenticate(text) == key and store.get_key("key_nope") is None
    with pytest.raises(AuthError, match="expired"):
        store.authenticate(text, now=NOW + 3600)
    for kwargs in ({"rpm": 0}, {"token_quota": 10}, {"models": []}, {"expires_at": NOW - 1}):
        with pytest.raises(UsageError):
            store.create_key("acme", **kwargs)
    changed = store.update_key(key.key_id, rpm=5, models=None)
    assert changed.rpm == 5 and changed.models is None and store.get_key(key.key_id) == changed
    new_text, new = store.rotate(key.key_id, now=NOW + 1)
    assert new.owner_id == key.key_id == store.quota_owner(new) and new.rotated_from == key.key_id
    with pytest.raises(AuthError, match="revoked"):
        store.authenticate(text)
    assert store.authenticate(new_text) == new
    assert store.revoke(new.key_id).revoked_at == NOW and store.list_keys() == []
    assert len(store.list_keys(include_revoked=True, partner="acme")) == 2
    with pytest.raises(UsageError, match="no key with id"):
        store.revoke("key_000000000000")
    with pytest.raises(UsageError, match="revoked"):
        store.update_key(new.key_id, rpm=1)


def test_admin_credentials(store):
    admin = "admin-" + "y" * 40
    assert not store.is_admin(admin)
    store.set_bootstrap_admin(admin)
    store.set_bootstrap_admin(admin)       # again at the next start: still one row
    assert store.is_admin(admin) and not store.is_admin(admin + "z")
    store.set_bootstrap_admin(None)
    assert not store.is_admin(admin)


def test_ledger_one_row_per_request_and_reads(store):
    _, a = store.create_key("acme")
    _, b = store.create_key("lab2")
    store.begin(rec(1, a.key_id, status="running", completion=0))
    store.progress("req-1", 3)
    store.record(rec(1, a.key_id, completion=7))
    store.record(rec(1, a.key_id, completion=999))       # a second settlement: ignored
    store.record(rec(2, a.key_id, model="large", at=NOW - 7200))
    store.record(rec(3, b.key_id, partner="lab2"))
    assert store.tokens_used(a.key_id, 0) == 32          # counted before it is committed
    assert store.flush()
    store.record(rec(2, a.key_id, prompt=500))           # already committed: refused by the upsert
    assert store.flush()
    rows = store.usage()
    assert [r.request_id for r in rows] == ["req-2", "req-1", "req-3"]
    assert rows[1] == dataclasses.replace(rec(1, a.key_id, completion=7), replica=store.replica)  # every field
    assert [r.request_id for r in store.usage(partner="acme", since=NOW - 60)] == ["req-1"]
    assert [r.request_id for r in store.usage(until=NOW - 60)] == ["req-2"]
    summary = store.usage_summary(partner="acme")
    assert [(g["model"], g["requests"], g["total_tokens"]) for g in summary] == [("large", 1, 15), ("small", 1, 17)]
    assert summary[1]["statuses"] == {"ok": 1} and summary[1]["first_at"] == NOW
    assert store.tokens_used(a.key_id, NOW - 60) == 17 and store.chain_tokens_used(a.key_id, 0) == 32


def test_a_second_store_sees_writes_at_once(db, store):
    cli = open_store(db, create=False)      # `muse keys` in another process
    try:
        text, key = cli.create_key("acme")
        assert store.authenticate(text) == key
        store.record(rec(1, key.key_id))
        assert store.flush()
        assert [r.request_id for r in cli.usage()] == ["req-1"]
        cli.revoke(key.key_id)
        with pytest.raises(AuthError, match="revoked"):
            store.authenticate(text)
    finally:
        cli.close()


def test_create_false_refuses_an_empty_database(db):
    with pytest.raises(StoreError, match="create a key first"):
        open_store(db, create=False)


def test_a_newer_database_is_refused(db):
    open_store(db).close()
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    else:
        import sqlite3

        conn = sqlite3.connect(db)
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
        conn.commit()
        conn.close()
    with pytest.raises(StoreError, match="newer Muse"):
        open_store(db)


def test_one_server_per_name_and_recovery_of_a_dead_one(db):
    first = open_store(db, replica="r1", lease_s=60)
    second = open_store(db, replica="r1", lease_s=60)
    try:
        first.lock_for_server()
        first.lock_for_server()                        # idempotent
        with pytest.raises(StoreError, match="another muse serve"):
            second.lock_for_server()
        with pytest.raises(RuntimeError, match="lock_for_server"):
            second.recover_interrupted()
        first.begin(rec(1, status="running", completion=0, prompt=40))
        assert first.flush()
    finally:
        first._ledger._stopping = True                  # "dies": nothing more reaches the database
        first._ledger._pending.clear()
        first._ledger._running.clear()
        first.close(timeout=5)
    second.lock_for_server()                           # a closed server gave up the name (lock or lease)
    assert second.recover_interrupted() in (0, 1)      # PostgreSQL settled it when the name was taken over
    assert [(r.status, r.prompt_tokens) for r in second.usage()] == [("interrupted", 40)]
    second.close()


def test_quota_reservations_never_overspend_under_concurrency(store):
    """40 threads race for a quota worth 10 requests: exactly 10 are admitted; settling frees the rest."""
    _, key = store.create_key("acme", token_quota=1000, period="day")
    store.lock_for_server()
    quotas = store.make_quotas()
    admitted, refused = [], []
    barrier = threading.Barrier(40)

    def one(i):
        barrier.wait()
        try:
            admitted.append((i, quotas.reserve(key, 100, request_id=f"req-{i}")))
        except QuotaExceeded:
            refused.append(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 10 and len(refused) == 30 and quotas.remaining(key) == 0
    now = time.time()
    for i, res in admitted:                            # each used 60 of its 100: the ledger row says so
        store.begin(rec(i, key.key_id, status="running", completion=0, prompt=20, at=now))
        res.settle(60)
        store.record(rec(i, key.key_id, prompt=20, completion=40, at=now))
    assert store.flush()
    deadline = time.monotonic() + 10                   # the SQLite manager frees it at settle(), PostgreSQL at commit
    while quotas.remaining(key) != 400:
        assert time.monotonic() < deadline, quotas.remaining(key)
        time.sleep(0.01)
    with pytest.raises(QuotaExceeded):
        quotas.reserve(key, 401, request_id="req-big")
    quotas.reserve(key, 400, request_id="req-last").settle(0)


# ------------------------------------------------------------------------- PostgreSQL only

def test_postgres_holds_of_a_dead_replica_stop_counting_when_its_lease_expires(pg_url):
    a = open_store(pg_url, replica="a", lease_s=0.5)
    b = open_store(pg_url, replica="b", lease_s=30)
    try:
        _, key = a.create_key("acme", token_quota=100, period="day")
        a.lock_for_server()
        b.lock_for_server()
        a._stop.set()                                  # a stops renewing its lease, as if SIGKILLed
        a._heartbeat.join(5)
        a.make_quotas().reserve(key, 90, request_id="req-a")
        a.begin(rec("a", key.key_id, status="running", completion=0, prompt=30, at=time.time()))
        assert a.flush()
        quotas = b.make_quotas()
        with pytest.raises(QuotaExceeded):
            quotas.reserve(key, 20, request_id="req-b1")
        deadline = time.monotonic() + 10               # within the lease: polled, never slept on
        while True:
            try:
                quotas.reserve(key, 20, request_id="req-b2")
                break
            except QuotaExceeded:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert b.recover_interrupted() == 1            # b's sweep settles a's row: billed its prompt
        assert [(r.request_id, r.status, r.replica) for r in b.usage()] == [("req-a", "interrupted", "a")]
        assert quotas.remaining(key) == 100 - 30 - 20  # the interrupted row counts, the dead hold does not
        assert [(r["name"], r["alive"]) for r in b.replicas()] == [("a", False), ("b", True)]
    finally:
        b.close()
        a._ledger._stopping = True
        a.close(timeout=5)


def test_postgres_rate_limits_are_a_share_per_live_replica(pg_url):
    from muse.server.records import ApiKey

    a = open_store(pg_url, replica="a")
    b = open_store(pg_url, replica="b")
    try:
        a.lock_for_server()
        b.lock_for_server()
        a.heartbeat()
        key = ApiKey("key_1", "acme", None, 10, 1000, None, None, None, NOW)
        limiter = a.make_limiter()
        headers = limiter.peek_headers(key)
        assert headers["x-ratelimit-limit-requests"] == "5" and headers["x-ratelimit-limit-tokens"] == "500"
    finally:
        a.close()
        b.close()


def test_postgres_admission_reads_the_key_again_whatever_the_cache_holds(pg_url):
    """A generation request authenticates from the replica's cache (authenticate(cached=True)) and is
    admitted by one round trip that reads the key again: a revocation, an expiry or a new quota made
    on another replica applies to the very next admission, and a refused key takes no hold."""
    from muse.server.pgstore import SharedQuotas

    a = open_store(pg_url, replica="a")
    b = open_store(pg_url, replica="b")                # another replica, or the CLI
    try:
        a.lock_for_server()
        text, key = b.create_key("acme", token_quota=1000, period="day")
        free_text, free = b.create_key("acme")          # no quota: admission still checks the key
        quotas = a.make_quotas()
        assert a.authenticate(text, cached=True) == key and a.authenticate(free_text, cached=True) == free
        b.update_key(key.key_id, token_quota=50)
        assert a.authenticate(text, cached=True).token_quota == 1000      # the cache answers...
        with pytest.raises(QuotaExceeded, match="quota of 50"):          # ...admission does not
            quotas.reserve(key, 100, request_id="req-1")
        assert a.authenticate(text, cached=True).token_quota == 50       # and refreshed the cache
        quotas.reserve(key, 50, request_id="req-2").settle(0)
        for k, t in ((key, text), (free, free_text)):
            b.revoke(k.key_id)
            with pytest.raises(AuthError) as e:
                quotas.reserve(k, 10, request_id=f"req-{k.key_id}")
            assert e.value.reason == "revoked"
            for cached in (True, False):                # admission forgot the cached key
                with pytest.raises(AuthError):
                    a.authenticate(t, cached=cached)
        _, soon = b.create_key("acme", token_quota=1000, period="month", expires_at=time.time() + 3600)
        with pytest.raises(AuthError) as e:
            SharedQuotas(a, clock=lambda: soon.expires_at).reserve(soon, 10, request_id="req-late")
        assert e.value.reason == "expired"
        assert a._rows("SELECT request_id FROM quota_holds") == []     # no refused request holds anything
    finally:
        a.close()
        b.close()


def test_postgres_admission_periods_match_the_keys_calendar():
    """The day and month bounds admission sends (pgstore._calendar_days) against ApiKey.period_start and
    period_end, the reference, around day, month and year ends and a leap day."""
    from datetime import UTC, datetime

    from muse.server.pgstore import _calendar_days
    from muse.server.records import ApiKey

    day = ApiKey("key_1", "acme", None, None, None, 1, "day", None, NOW)
    month = dataclasses.replace(day, period="month")
    for y, mo, d, h in ((2025, 6, 15, 15), (2025, 12, 31, 23), (2026, 1, 1, 0), (2024, 2, 29, 12), (2025, 2, 28, 23)):
        for now in (datetime(y, mo, d, h, tzinfo=UTC).timestamp(), datetime(y, mo, d, h, 59, 59, tzinfo=UTC).timestamp()):
            today, first, end = _calendar_days(now)
            assert (today * 86400.0, (today + 1) * 86400.0) == (day.period_start(now), day.period_end(now))
            assert (first * 86400.0, end * 86400.0) == (month.period_start(now), month.period_end(now))


def test_store_time_is_summed_per_request_and_split_by_operation(store):
    """sqlstore.timed: each call's wall time lands once, under its outermost operation (authenticate's own
    read is "authenticate", not also "read"); nothing is timed outside a request."""
    from muse.server.sqlstore import STORE_TIME, StoreTime

    text, key = store.create_key("acme")
    spent = StoreTime()
    token = STORE_TIME.set(spent)
    try:
        store.authenticate(text)
        store.get_key(key.key_id)
        store.begin(rec(1, key.key_id, status="running", completion=0))
    finally:
        STORE_TIME.reset(token)
    assert set(spent.ops) == {"authenticate", "read", "ledger"} and all(t > 0 for t in spent.ops.values())
    assert spent.total == pytest.approx(sum(spent.ops.values()))

    async def request():                                # a worker thread of the request adds to its StoreTime
        mine = StoreTime()
        STORE_TIME.set(mine)
        await asyncio.to_thread(store.authenticate, text)
        return mine

    assert set(asyncio.run(request()).ops) == {"authenticate"} and STORE_TIME.get() is None


def test_servers_starting_at_once_all_store_the_admin_key(db):
    """Replicas that start together each store the bootstrap admin key; none fails on the other's row."""
    open_store(db).close()  # the schema first, as the first server to start makes it
    stores = [open_store(db) for _ in range(6)]
    barrier, errors = threading.Barrier(len(stores)), []

    def start(store):
        barrier.wait()
        try:
            store.set_bootstrap_admin("muse-admin-secret-0123456789")
        except Exception as e:  # noqa: BLE001 - the failure is the finding
            errors.append(repr(e))

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert stores[0].is_admin("muse-admin-secret-0123456789") and not stores[0].is_admin("muse-admin-other")
    finally:
        for s in stores:
            s.close()
