"""server/limits.py: token buckets, quotas and the admission queue, driven by fake clocks (no sleeps)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from muse.common.errors import ConfigError, MuseError
from muse.server.limits import (
    AdmissionQueue,
    Overloaded,
    QuotaExceeded,
    QuotaManager,
    RateLimited,
    RateLimiter,
    format_duration,
    period_end,
)


@dataclass(frozen=True)
class Key:
    """Mirrors the fields and method of records.ApiKey that limits.py reads."""

    key_id: str = "key_a"
    rpm: int | None = None
    tpm: int | None = None
    token_quota: int | None = None
    period: str | None = None
    rotated_from: str | None = None

    def period_start(self, now: float) -> float | None:
        if self.period is None:
            return None
        d = datetime.fromtimestamp(now, tz=UTC)
        d = d.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period == "month":
            d = d.replace(day=1)
        return d.timestamp()


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def limiter():
    clock = Clock()
    return RateLimiter(clock=clock), clock


# ----------------------------------------------------------------------------------- durations


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (0.0001, "1ms"), (0.25, "250ms"), (0.8, "800ms"), (0.9994, "1s"), (1, "1s"), (1.25, "1.25s"),
    (59.9, "59.9s"), (60, "1m0s"), (360, "6m0s"), (90.5, "1m30.5s"), (3600, "1h0m0s"), (-3, "0s"),
])
def test_durations_are_written_like_openai(seconds, text):
    assert format_duration(seconds) == text


# --------------------------------------------------------------------------------- rate limiter


def test_request_bucket_refills_continuously():
    rl, clock = limiter()
    key = Key(rpm=60)
    for _ in range(60):
        rl.acquire(key, 0)
    with pytest.raises(RateLimited) as e:
        rl.acquire(key, 0)
    assert e.value.kind == "requests" and e.value.retry_after == pytest.approx(1.0)
    clock.t += 0.2                                   # 60/min = 1 per second: 0.2 of a request back
    with pytest.raises(RateLimited) as e:
        rl.acquire(key, 0)
    assert e.value.retry_after == pytest.approx(0.8)
    assert e.value.message == "Rate limit reached for requests per minute (rpm): limit 60, remaining 0; retry in 800ms."
    assert e.value.headers["retry-after"] == "1" and e.value.headers["retry-after-ms"] == "800"
    assert e.value.status_code == 429 and e.value.code == "rate_limit_exceeded" and e.value.retryable
    assert isinstance(e.value, MuseError)
    clock.t += 0.8
    rl.acquire(key, 0)                               # exactly one more
    with pytest.raises(RateLimited):
        rl.acquire(key, 0)
    clock.t += 3600                                  # refill stops at the capacity
    for _ in range(60):
        rl.acquire(key, 0)
    with pytest.raises(RateLimited):
        rl.acquire(key, 0)


def test_token_bucket_retry_after_and_message():
    rl, clock = limiter()
    key = Key(tpm=6000)                              # 100 tokens per second
    rl.acquire(key, 5000)
    with pytest.raises(RateLimited) as e:
        rl.acquire(key, 1500)
    assert e.value.kind == "tokens" and e.value.error_type == "tokens"
    assert e.value.retry_after == pytest.approx(5.0)
    assert "tokens per minute (tpm): limit 6000, remaining 1000, requested 1500" in e.value.message
    assert "retry in 5s" in e.value.message
    clock.t += 4.999
    with pytest.raises(RateLimited):
        rl.acquire(key, 1500)
    clock.t += 0.001
    rl.acquire(key, 1500)


def test_both_buckets_or_neither():
    rl, clock = limiter()
    key = Key(rpm=2, tpm=100)
    rl.acquire(key, 90)
    with pytest.raises(RateLimited) as e:            # requests fit, tokens do not: no request is taken
        rl.acquire(key, 50)
    assert e.value.kind == "tokens"
    assert rl.peek_headers(key)["x-ratelimit-remaining-requests"] == "1"
    rl.acquire(key, 10)                              # the second request still fits
    assert rl.peek_headers(key)["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimited) as e:            # both short: the longer wait wins
        rl.acquire(key, 100)
    assert e.value.kind == "tokens" and e.value.retry_after == pytest.approx(60.0)
    with pytest.raises(RateLimited) as e:
        rl.acquire(key, 1)
    assert e.value.kind == "requests" and e.value.retry_after == pytest.approx(30.0)  # 2/min: 30 s per request
    assert rl.peek_headers(key)["x-ratelimit-remaining-tokens"] == "0"           # nothing taken either time


def test_settle_gives_back_the_unused_reservation_once():
    rl, clock = limiter()
    key = Key(tpm=1000)
    g = rl.acquire(key, 800)
    assert g.headers["x-ratelimit-remaining-tokens"] == "200"
    assert g.settle(300) == 500
    assert rl.peek_headers(key)["x-ratelimit-remaining-tokens"] == "700"
    assert g.settle(0) == 0 and g.settle(300) == 0   # idempotent
    assert rl.peek_headers(key)["x-ratelimit-remaining-tokens"] == "700"
    g2 = rl.acquire(key, 600)
    assert g2.settle(10_000) == 0                    # more than reserved: nothing back, nothing extra
    assert rl.peek_headers(key)["x-ratelimit-remaining-tokens"] == "100"
    g3 = rl.acquire(key, 100)
    assert g3.settle(-5) == 100                      # a failure before any output: all back
    clock.t += 60
    g4 = rl.acquire(key, 500)
    clock.t += 60                                    # full again; a refund never overfills it
    g4.settle(0)
    assert rl.peek_headers(key)["x-ratelimit-remaining-tokens"] == "1000"


def test_headers_format_and_unlimited_dimensions():
    rl, clock = limiter()
    g = rl.acquire(Key(rpm=60, tpm=6000), 3000)
    assert g.headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "3000",
        "x-ratelimit-reset-tokens": "30s",
    }
    clock.t += 0.75
    h = rl.peek_headers(Key(rpm=60, tpm=6000))
    assert h["x-ratelimit-reset-requests"] == "250ms" and h["x-ratelimit-reset-tokens"] == "29.25s"
    assert set(rl.acquire(Key("key_b", rpm=10), 10**9).headers) == {
        "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"}
    assert set(rl.acquire(Key("key_c", tpm=10), 3).headers) == {
        "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}
    unlimited = rl.acquire(Key("key_d"), 10**9)
    assert unlimited.headers == {} and rl.peek_headers(Key("key_d")) == {} and unlimited.settle(0) == 0
    h = rl.peek_headers(Key("key_e", rpm=1, tpm=1))  # never used: full
    assert h["x-ratelimit-remaining-requests"] == "1" and h["x-ratelimit-reset-tokens"] == "0s"


def test_a_request_larger_than_the_whole_tpm_can_never_run():
    rl, clock = limiter()
    key = Key(tpm=1000)
    with pytest.raises(RateLimited) as e:
        rl.acquire(key, 1001)
    assert e.value.retry_after is None and not e.value.retryable and e.value.kind == "tokens"
    assert e.value.headers["x-should-retry"] == "false" and "retry-after" not in e.value.headers
    assert "can never run" in e.value.message and "lower max_tokens" in e.value.message
    rl.acquire(key, 1000)                            # nothing was taken; exactly the limit fits
    with pytest.raises(RateLimited) as e:
        rl.acquire(Key("key_z", rpm=0), 1)
    assert e.value.retry_after is None and e.value.kind == "requests"
    with pytest.raises(ValueError):
        rl.acquire(key, -1)


def test_changed_limits_resize_the_bucket_and_rotation_keeps_it():
    rl, clock = limiter()
    rl.acquire(Key(tpm=1000), 600)                   # 600 spent in the last minute
    h = rl.peek_headers(Key(tpm=2000))               # limit raised: still 600 spent
    assert h["x-ratelimit-limit-tokens"] == "2000" and h["x-ratelimit-remaining-tokens"] == "1400"
    h = rl.peek_headers(Key(tpm=500))                # lowered below what was spent: empty, refilling
    assert h["x-ratelimit-remaining-tokens"] == "0" and h["x-ratelimit-reset-tokens"] == "1m0s"
    assert rl.peek_headers(Key()) == {}              # limit removed
    rl.acquire(Key(rpm=1), 0)
    rotated = Key("key_new", rpm=1, rotated_from="key_a")
    with pytest.raises(RateLimited):                 # the new key shares the old key's minute
        rl.acquire(rotated, 0)
    clock.t += 60
    rl.acquire(rotated, 0)


def test_rate_limiter_is_thread_safe():
    rl, clock = limiter()
    key = Key(rpm=1000, tpm=10_000)
    ok = []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        for _ in range(50):
            try:
                ok.append(rl.acquire(key, 70))
            except RateLimited:
                pass

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == 10_000 // 70                   # the clock stands still: exactly what fits


# --------------------------------------------------------------------------------------- quotas


DAY0 = datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()


class Ledger:
    def __init__(self, used: int = 0):
        self.calls: list[tuple[str, float]] = []
        self.value = used

    def __call__(self, key_id: str, since: float) -> int:
        self.calls.append((key_id, since))
        return self.value


def test_no_quota_means_no_reservation():
    ledger = Ledger()
    qm = QuotaManager(ledger, clock=Clock(DAY0))
    assert qm.reserve(Key(), 10**9) is None and qm.remaining(Key()) is None and ledger.calls == []


def test_quota_reserve_settle_and_message():
    ledger = Ledger(used=400)
    clock = Clock(DAY0)
    qm = QuotaManager(ledger, clock=clock)
    key = Key(token_quota=1000, period="day")
    assert qm.remaining(key) == 600
    r = qm.reserve(key, 500)
    assert qm.remaining(key) == 100
    with pytest.raises(QuotaExceeded) as e:
        qm.reserve(key, 200)
    err = e.value
    assert err.headers == {"x-should-retry": "false"} and err.code == "insufficient_quota" and err.status_code == 429
    assert (err.quota, err.used, err.in_flight, err.requested) == (1000, 400, 500, 200)
    assert err.message.startswith("You exceeded your token quota for this day: quota 1000 tokens, used 400")
    assert "renews at 2024-05-02T00:00:00Z" in err.message
    assert err.resets_at == datetime(2024, 5, 2, tzinfo=UTC).timestamp()
    r.settle(150)
    assert qm.remaining(key) == 450
    r.settle(150)                                    # idempotent
    assert qm.remaining(key) == 450
    r2 = qm.reserve(key, 450)                        # exactly the rest fits
    r2.settle(10_000)                                # more than reserved: clamped (and logged)
    assert qm.remaining(key) == 0
    with pytest.raises(QuotaExceeded) as e:
        qm.reserve(key, 5000)
    assert "more than the whole quota of 1000" in e.value.message
    assert ledger.calls == [("key_a", datetime(2024, 5, 1, tzinfo=UTC).timestamp())]   # asked once
    with pytest.raises(ValueError):
        qm.reserve(key, -1)


def test_fifty_concurrent_reservations_against_a_quota_for_ten():
    class SlowLedger(Ledger):                        # widens the window a missing lock would open
        def __call__(self, key_id, since):
            time.sleep(0.002)
            return super().__call__(key_id, since)

    ledger = SlowLedger()
    qm = QuotaManager(ledger, clock=Clock(DAY0))
    key = Key(token_quota=1000, period="day")
    barrier = threading.Barrier(50)
    granted, refused, peak = [], [], [0]
    lock = threading.Lock()

    def worker():
        barrier.wait()
        try:
            r = qm.reserve(key, 100)
        except QuotaExceeded:
            with lock:
                refused.append(1)
            return
        with lock:
            granted.append(r)
            peak[0] = max(peak[0], 1000 - qm.remaining(key))

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 10 and len(refused) == 40 and peak[0] <= 1000
    assert len(ledger.calls) == 1
    for r in granted:
        r.settle(100)
    with pytest.raises(QuotaExceeded):               # fully used, not just held
        qm.reserve(key, 1)


def test_period_rollover_asks_the_ledger_again():
    ledger = Ledger(used=900)
    clock = Clock(DAY0)
    qm = QuotaManager(ledger, clock=clock)
    key = Key(token_quota=1000, period="day")
    late = qm.reserve(key, 100)
    assert qm.remaining(key) == 0
    clock.t += 86400                                 # the next day
    ledger.value = 0
    assert qm.remaining(key) == 1000
    late.settle(40)                                  # charged to yesterday: today is untouched
    assert qm.remaining(key) == 1000
    clock.t += 3600
    qm.reserve(key, 10)
    day1, day2 = datetime(2024, 5, 1, tzinfo=UTC).timestamp(), datetime(2024, 5, 2, tzinfo=UTC).timestamp()
    assert ledger.calls == [("key_a", day1), ("key_a", day2)]
    other = Key("key_b", token_quota=5, period="month")
    qm.remaining(other)
    assert ledger.calls[-1] == ("key_b", datetime(2024, 5, 1, tzinfo=UTC).timestamp())
    assert qm.remaining(dataclasses.replace(key, token_quota=2000)) == 1990   # a raised quota applies at once


def test_a_rotated_key_shares_its_predecessors_quota_in_flight():
    # Quota state used to be kept per key_id: rotating a key while its requests ran gave the new key a
    # fresh zero in flight, so a 2,000-token quota admitted 4,000.
    ledger = Ledger()
    owners = {"key_a": "key_a", "key_b": "key_a", "key_c": "key_a"}
    qm = QuotaManager(ledger, clock=Clock(DAY0), owner=lambda k: owners[k.key_id])
    a = Key("key_a", token_quota=2000, period="day")
    b = dataclasses.replace(a, key_id="key_b", rotated_from="key_a")
    held = qm.reserve(a, 1500)
    with pytest.raises(QuotaExceeded) as e:
        qm.reserve(b, 1000)                          # the rotated key sees A's request in flight
    assert e.value.in_flight == 1500 and qm.remaining(b) == 500
    rb = qm.reserve(b, 500)
    assert qm.remaining(a) == qm.remaining(b) == 0
    held.settle(1000)                                # A's request ends after the rotation
    rb.settle(200)
    c = dataclasses.replace(b, key_id="key_c", rotated_from="key_b")
    assert qm.remaining(c) == 800
    assert ledger.calls == [("key_a", datetime(2024, 5, 1, tzinfo=UTC).timestamp())]   # asked once, by owner


def test_quota_owner_from_the_store_bounds_a_rotation_chain(tmp_path):
    from muse.server.records import UsageRecord
    from muse.server.store import Store

    store = Store(tmp_path / "serve.sqlite3", clock=lambda: DAY0)
    _, a = store.create_key("acme", token_quota=2000, period="day")
    qm = QuotaManager(store.chain_tokens_used, clock=Clock(DAY0), owner=store.quota_owner)
    ra = qm.reserve(a, 2000)
    _, b = store.rotate(a.key_id)
    with pytest.raises(QuotaExceeded):
        qm.reserve(b, 2000)                          # 4,000 in flight on a 2,000 quota: refused
    ra.settle(1200)
    store.record(UsageRecord("req-a", a.key_id, "acme", "m", "completions", 200, 1000, 0, "ok", 200, "stop",
                             DAY0, 1.0))
    assert qm.remaining(b) == 800
    # a restarted server starts from the ledger of the whole chain
    _, c = store.rotate(b.key_id)
    fresh = QuotaManager(store.chain_tokens_used, clock=Clock(DAY0), owner=store.quota_owner)
    assert fresh.remaining(c) == 800
    with pytest.raises(QuotaExceeded):
        fresh.reserve(c, 801)
    store.close()


def test_period_end_is_calendar():
    start = datetime(2024, 12, 1, tzinfo=UTC).timestamp()
    assert period_end("month", start) == datetime(2025, 1, 1, tzinfo=UTC).timestamp()
    feb = datetime(2024, 2, 1, tzinfo=UTC).timestamp()
    assert period_end("month", feb) == datetime(2024, 3, 1, tzinfo=UTC).timestamp()
    assert period_end("day", feb) == feb + 86400 and period_end(None, feb) is None


# ------------------------------------------------------------------------------ admission queue


def test_admission_queue_is_fifo_and_bounded():
    async def main():
        q = AdmissionQueue(max_running=2, max_waiting=2)
        order, gates = [], {}

        async def client(name):
            async with q.slot():
                order.append(name)
                gates[name] = asyncio.Event()
                await gates[name].wait()

        tasks = [asyncio.create_task(client(n)) for n in "abcd"]
        await asyncio.sleep(0)
        assert (q.running, q.waiting, q.depth) == (2, 2, 2) and order == ["a", "b"]
        with pytest.raises(Overloaded) as e:
            async with q.slot():
                pass
        assert e.value.status_code == 503 and "overloaded" in e.value.message
        gates["a"].set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert order == ["a", "b", "c"] and q.running == 2 and q.waiting == 1
        late = asyncio.create_task(client("e"))      # queued behind d, even though b finishes next
        await asyncio.sleep(0)
        gates["b"].set()
        for _ in range(3):
            await asyncio.sleep(0)
        assert order == ["a", "b", "c", "d"]
        for name in "cde":
            while name not in gates:
                await asyncio.sleep(0)
            gates[name].set()
        await asyncio.gather(*tasks, late)
        assert order == list("abcde") and (q.running, q.waiting) == (0, 0)

    asyncio.run(main())


def test_cancelled_waiter_and_failing_request_leak_no_slot():
    async def main():
        q = AdmissionQueue(max_running=1, max_waiting=5)
        await q.acquire()
        waiter = asyncio.create_task(q.acquire())
        await asyncio.sleep(0)
        assert q.waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (q.running, q.waiting) == (1, 0)

        handed = asyncio.create_task(q.acquire())
        behind = asyncio.create_task(q.acquire())
        await asyncio.sleep(0)
        q.release()                                  # the slot goes to `handed`...
        handed.cancel()                              # ...which is cancelled before it runs: passes on
        with pytest.raises(asyncio.CancelledError):
            await handed
        await behind
        assert (q.running, q.waiting) == (1, 0)
        q.release()
        assert q.running == 0

        with pytest.raises(RuntimeError):
            async with q.slot():
                raise RuntimeError("the engine failed")
        assert q.running == 0
        with pytest.raises(RuntimeError):
            q.release()                              # more releases than acquires is a bug

    asyncio.run(main())


def test_close_turns_away_waiters_and_newcomers():
    async def main():
        q = AdmissionQueue(max_running=1, max_waiting=0)
        await q.acquire()
        with pytest.raises(Overloaded):              # nobody may wait
            await q.acquire()
        q2 = AdmissionQueue(max_running=1, max_waiting=3)
        await q2.acquire()
        waiter = asyncio.create_task(q2.acquire())
        await asyncio.sleep(0)
        q2.close()
        with pytest.raises(Overloaded) as e:
            await waiter
        assert "shutting down" in e.value.message and q2.closed
        with pytest.raises(Overloaded):
            await q2.acquire()
        q2.release()
        assert (q2.running, q2.waiting) == (0, 0)

    asyncio.run(main())


@pytest.mark.parametrize("running, waiting", [(0, 1), (1, -1), (True, 1), (1.5, 1)])
def test_admission_queue_rejects_bad_sizes(running, waiting):
    with pytest.raises(ConfigError):
        AdmissionQueue(running, waiting)


# --------------------------------------------------------------- two-phase rate limits, weighted admission


def test_the_request_slot_is_taken_before_the_tokens_are_known():
    """acquire(key, 0) takes the request (before tokenizing); add_tokens reserves the tokens after."""
    rl, clock = limiter()
    key = Key(rpm=2, tpm=100)
    g = rl.acquire(key, 0)
    rl.add_tokens(g, 60)
    assert g.reserved == 60 and g.headers["x-ratelimit-remaining-tokens"] == "40"
    g2 = rl.acquire(key, 0)
    with pytest.raises(RateLimited) as e:            # tokens short: the request stays spent
        rl.add_tokens(g2, 50)
    assert e.value.kind == "tokens" and e.value.retry_after == pytest.approx(6.0)
    assert rl.peek_headers(key)["x-ratelimit-remaining-requests"] == "0"
    assert rl.peek_headers(key)["x-ratelimit-remaining-tokens"] == "40"
    with pytest.raises(RateLimited) as e:            # more than the whole tpm can never run
        rl.add_tokens(g2, 101)
    assert e.value.retry_after is None and e.value.headers["x-should-retry"] == "false"
    with pytest.raises(RateLimited) as e:            # the third request is refused before any work
        rl.acquire(key, 0)
    assert e.value.kind == "requests"
    assert g.settle(10) == 50                        # settling gives back what add_tokens reserved


def test_admission_counts_sequences_not_requests():
    async def main():
        q = AdmissionQueue(max_running=8, max_waiting=8)
        await q.acquire(6)
        assert (q.running, q.waiting) == (6, 0)
        big = asyncio.create_task(q.acquire(4))      # 6 + 4 > 8: waits
        await asyncio.sleep(0)
        small = asyncio.create_task(q.acquire(1))    # would fit, but may not overtake the big one
        await asyncio.sleep(0)
        assert q.waiting == 5 and not big.done() and not small.done()
        with pytest.raises(Overloaded):              # 5 waiting + 4 > 8
            await q.acquire(4)
        q.release(6)
        await asyncio.sleep(0)
        assert big.done() and small.done() and q.running == 5
        q.release(4)
        q.release(1)
        await q.acquire(100)                         # more than the pool: it takes the whole pool
        assert q.running == 8
        q.release(100)
        assert (q.running, q.waiting) == (0, 0)

    asyncio.run(main())
