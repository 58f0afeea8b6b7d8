"""Per-key rate limits, token quotas and the bounded admission queue: pure bookkeeping (stdlib only).

Three gates, in the order the server applies them to a request that reserves `tokens` =
prompt tokens + max_tokens * n:

- `RateLimiter.acquire(key, tokens)`: OpenAI-style requests/min and tokens/min (with several replicas,
  each enforces its share: limit // live replicas, pgstore.py says why). Each limited dimension
  of a key is a continuous token bucket: capacity = the per-minute limit, refilled at limit/60 per
  second, full when first seen. A request takes 1 from the requests bucket and `tokens` from the tokens
  bucket, both or neither. At the end `Grant.settle(actual)` gives the unused part of the token
  reservation back (the request itself is not given back: failed requests count against rpm, as at
  OpenAI). A request larger than the whole tpm can never run: RateLimited with retry_after None.
- `QuotaManager.reserve(key, tokens)`: a token quota per calendar day or month (UTC). used + tokens
  reserved by requests in flight + this request must fit, checked and taken under one lock, so any
  number of concurrent requests can never overspend. The quota belongs to the key's owner
  (`owner(key)`, e.g. Store.quota_owner: the first key of a rotation chain), so a key rotated while
  its requests run shares their reservations instead of starting from zero. The ledger is the source
  of truth: `used(owner, period_start)` is asked once per owner per period, after that settlements
  are counted in memory.
- `AdmissionQueue.slot()`: at most max_running requests hold a slot, at most max_waiting wait for one
  in FIFO order, beyond that Overloaded at once (an HTTP 503 instead of an ever-growing queue).

Every error carries `status_code`, `error_type`, `code` and `headers` for the OpenAI error body, and
a message that says what to do. Rate-limit headers (`x-ratelimit-{limit,remaining,reset}-{requests,
tokens}`) are only sent for a dimension the key limits: an unlimited dimension gets no headers at all
(OpenAI clients read a missing header as "no information", and a made-up huge limit would mislead).
Durations are written like OpenAI's (Go's): "250ms", "1s", "1.5s", "6m0s".

This module knows nothing about HTTP, SQLite or the engine; the quotas several replicas share are
pgstore.SharedQuotas, with the same interface. A key is anything with `key_id`, `rpm`,
`tpm`, `token_quota`, `period` and `period_start(now)` (records.ApiKey); keys of one owner share
their period and quota (rotate copies them). Clocks are injectable:
the rate limiter uses a monotonic clock, quotas wall-clock epoch seconds (periods are calendar ones).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from muse.common.errors import ConfigError, MuseError
from muse.common.logging import get_logger

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from muse.server.records import ApiKey

log = get_logger("muse.server")

_EPS = 1e-9  # float slack: a bucket refilled to 0.9999999999 holds 1


def format_duration(seconds: float) -> str:
    """A duration as OpenAI's rate-limit headers write it: "0s", "250ms", "1s", "1.25s", "6m0s", "1h0m0s".

    Rounded UP to the millisecond, so a client that waits this long is never early.
    """
    ms = math.ceil(round(max(0.0, seconds) * 1000, 6))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, frac = divmod(rest, 1000)
    sec = f"{s}.{frac:03d}".rstrip("0") if frac else str(s)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


# --------------------------------------------------------------------------------------------- errors


class LimitError(MuseError):
    """A request turned away by a limit; the server turns it into an OpenAI error body and status."""

    status_code = 429
    error_type = "rate_limit_exceeded"
    code: str | None = "rate_limit_exceeded"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


class RateLimited(LimitError):
    """429 rate_limit_exceeded. `kind` is "requests" or "tokens" (OpenAI puts it in the error's type).

    `retry_after`: seconds until the bucket holds enough, or None when the request can never run
    (it needs more than the whole per-minute limit); then headers carry `x-should-retry: false`
    instead of `retry-after`, so the OpenAI SDK does not retry it in vain.
    """

    def __init__(self, kind: str, retry_after: float | None, message: str, headers: dict[str, str]):
        super().__init__(message, headers)
        self.kind = kind
        self.error_type = kind
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.retry_after is not None


class QuotaExceeded(LimitError):
    """429 insufficient_quota, with `x-should-retry: false` (the quota renews only at `resets_at`)."""

    error_type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, *, quota: int, used: int, in_flight: int, requested: int,
                 resets_at: float | None):
        super().__init__(message, {"x-should-retry": "false"})
        self.quota, self.used, self.in_flight, self.requested = quota, used, in_flight, requested
        self.resets_at = resets_at


class Overloaded(LimitError):
    """503: the admission queue is full (or the server is shutting down)."""

    status_code = 503
    error_type = "server_error"
    code = "overloaded"


# ----------------------------------------------------------------------------------- rate limiter


class _Bucket:
    """A continuous token bucket: `capacity` per minute, refilled at capacity/60 per second."""

    __slots__ = ("capacity", "level", "updated")

    def __init__(self, capacity: int, now: float):
        self.capacity = capacity
        self.level = float(capacity)
        self.updated = now

    def refill(self, now: float) -> None:
        if self.capacity > 0:
            self.level = min(float(self.capacity), self.level + max(0.0, now - self.updated) * self.capacity / 60)
        self.updated = now

    def resize(self, capacity: int) -> None:
        """The key's limit changed: keep what was spent in the last minute (the deficit), not the level."""
        deficit = self.capacity - self.level
        self.capacity = capacity
        self.level = max(0.0, capacity - deficit)

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds `amount` (amount <= capacity)."""
        return max(0.0, (amount - self.level) * 60 / self.capacity)

    def reset_in(self) -> float:
        """Seconds until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
        return (self.capacity - self.level) * 60 / self.capacity if self.capacity > 0 else 0.0

    def remaining(self) -> int:
        return max(0, math.floor(self.level + _EPS))


class _KeyBuckets:
    __slots__ = ("requests", "tokens")

    def __init__(self):
        self.requests: _Bucket | None = None
        self.tokens: _Bucket | None = None


def _sync(bucket: _Bucket | None, limit: int | None, now: float) -> _Bucket | None:
    """The bucket for the key's CURRENT limit: created full, refilled to now, resized if it changed."""
    if limit is None:
        return None
    if bucket is None:
        return _Bucket(limit, now)
    bucket.refill(now)
    if bucket.capacity != limit:
        bucket.resize(limit)
    return bucket


def _headers(b: _KeyBuckets) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, bucket in (("requests", b.requests), ("tokens", b.tokens)):
        if bucket is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(bucket.capacity)
            headers[f"x-ratelimit-remaining-{name}"] = str(bucket.remaining())
            headers[f"x-ratelimit-reset-{name}"] = format_duration(bucket.reset_in())
    return headers


class Grant:
    """One admitted request's hold on its key's buckets. `headers` are the rate-limit headers after it."""

    def __init__(self, limiter: RateLimiter | None, key_id: str, reserved: int, headers: dict[str, str]):
        self._limiter = limiter
        self.key_id = key_id
        self.reserved = reserved
        self.headers = headers
        self.settled = False

    def settle(self, actual_tokens: int) -> int:
        """Give back `reserved - actual_tokens` to the tokens bucket; returns what was given back.

        Idempotent: only the first call counts. Call it with 0 when the request failed before
        generating anything. More than reserved is never given back, nor charged on top (logged).
        """
        if self._limiter is None:
            return 0
        return self._limiter._settle(self, actual_tokens)


class RateLimiter:
    """requests/min and tokens/min per key, as continuous token buckets. Thread-safe (one lock).

    Buckets follow the key's current limits (a changed rpm/tpm resizes them, keeping what was spent),
    and a rotated key (one whose `rotated_from` names a key seen here) shares its predecessor's
    buckets, so rotating a key does not hand out a fresh minute.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, share: Callable[[], int] | None = None):
        """`share()`: how many replicas split each key's limits (pgstore.PgStore.live_replicas); each
        bucket then holds limit // share (at least 1). None: this server alone enforces the whole limit."""
        self._clock = clock
        self._share = share
        self._lock = threading.Lock()
        self._keys: dict[str, _KeyBuckets] = {}

    def _part(self, limit: int | None) -> int | None:
        if limit is None or self._share is None:
            return limit
        return max(1, limit // max(1, int(self._share())))

    def _buckets(self, key: ApiKey, now: float) -> _KeyBuckets:
        b = self._keys.get(key.key_id)
        if b is None:
            # the keys of one rotation chain share one set of buckets (by owner, else by predecessor)
            owner = getattr(key, "owner_id", None)
            b = (self._keys.get(owner or "") or self._keys.get(getattr(key, "rotated_from", None) or "")
                 or _KeyBuckets())
            self._keys[key.key_id] = b
            if owner:
                self._keys.setdefault(owner, b)
        b.requests = _sync(b.requests, self._part(key.rpm), now)
        b.tokens = _sync(b.tokens, self._part(key.tpm), now)
        return b

    def acquire(self, key: ApiKey, tokens: int) -> Grant:
        """Take 1 request and `tokens` tokens from the key's buckets, both or neither; or raise RateLimited.

        When both buckets are short, the error names the one that needs longer, and retry_after is the
        time until both hold enough.
        """
        if tokens < 0:
            raise ValueError(f"a request reserves >= 0 tokens, got {tokens}")
        with self._lock:
            b = self._buckets(key, self._clock())
            needs = (("requests", b.requests, 1), ("tokens", b.tokens, tokens))
            for kind, bucket, need in needs:
                if bucket is not None and need > bucket.capacity:
                    raise RateLimited(kind, None, _too_large(kind, need, bucket.capacity),
                                      {**_headers(b), "x-should-retry": "false"})
            short = [(bucket.wait_for(need), kind, need) for kind, bucket, need in needs
                     if bucket is not None and bucket.level + _EPS < need]
            if short:
                wait, kind, need = max(short)
                bucket = b.requests if kind == "requests" else b.tokens
                assert bucket is not None
                ms = max(1, math.ceil(round(wait * 1000, 6)))
                headers = {**_headers(b), "retry-after": str(max(1, math.ceil(wait))), "retry-after-ms": str(ms)}
                raise RateLimited(kind, wait, _rate_message(kind, bucket, need, wait), headers)
            if b.requests is not None:
                b.requests.level -= 1
            if b.tokens is not None:
                b.tokens.level -= tokens
            return Grant(self, key.key_id, tokens, _headers(b))

    def add_tokens(self, grant: Grant, tokens: int) -> None:
        """Reserve `tokens` more for a request that already holds its grant (the request slot was taken
        before the expensive work that counts its tokens), or raise RateLimited and reserve nothing."""
        if tokens < 0:
            raise ValueError(f"a request reserves >= 0 tokens, got {tokens}")
        with self._lock:
            if grant.settled:
                raise RuntimeError("add_tokens() on a settled grant")
            b = self._keys.get(grant.key_id)
            if b is None or b.tokens is None or tokens == 0:
                grant.reserved += tokens
                return
            bucket = b.tokens
            bucket.refill(self._clock())
            if tokens > bucket.capacity:
                raise RateLimited("tokens", None, _too_large("tokens", tokens, bucket.capacity),
                                  {**_headers(b), "x-should-retry": "false"})
            if bucket.level + _EPS < tokens:
                wait = bucket.wait_for(tokens)
                ms = max(1, math.ceil(round(wait * 1000, 6)))
                headers = {**_headers(b), "retry-after": str(max(1, math.ceil(wait))), "retry-after-ms": str(ms)}
                raise RateLimited("tokens", wait, _rate_message("tokens", bucket, tokens, wait), headers)
            bucket.level -= tokens
            grant.reserved += tokens
            grant.headers = _headers(b)

    def _settle(self, grant: Grant, actual_tokens: int) -> int:
        with self._lock:
            if grant.settled:
                return 0
            grant.settled = True
            if actual_tokens > grant.reserved:
                log.warning("key %s used %d tokens but reserved only %d; not charging the difference",
                            grant.key_id, actual_tokens, grant.reserved)
            refund = grant.reserved - min(max(0, actual_tokens), grant.reserved)
            b = self._keys.get(grant.key_id)
            if b is None or b.tokens is None or refund == 0:
                return 0
            b.tokens.refill(self._clock())
            b.tokens.level = min(float(b.tokens.capacity), b.tokens.level + refund)
            return refund

    def peek_headers(self, key: ApiKey) -> dict[str, str]:
        """The key's rate-limit headers now, taking nothing (for error responses). {} for an unlimited key."""
        with self._lock:
            return _headers(self._buckets(key, self._clock()))


def _rate_message(kind: str, bucket: _Bucket, need: int, wait: float) -> str:
    abbr = "rpm" if kind == "requests" else "tpm"
    requested = f", requested {need} (prompt + max_tokens * n)" if kind == "tokens" else ""
    return (f"Rate limit reached for {kind} per minute ({abbr}): limit {bucket.capacity}, "
            f"remaining {bucket.remaining()}{requested}; retry in {format_duration(wait)}.")


def _too_large(kind: str, need: int, capacity: int) -> str:
    if kind == "requests":
        return (f"This key allows {capacity} requests per minute (rpm), so no request can run; "
                "ask the operator to raise the key's rpm.")
    return (f"Request too large for tokens per minute (tpm): it reserves {need} tokens (prompt + max_tokens * n) "
            f"but this key's limit is {capacity} per minute, so it can never run; lower max_tokens or n, "
            "or shorten the prompt.")


# -------------------------------------------------------------------------------------- quotas


def period_end(period: str | None, start: float) -> float | None:
    """When the calendar (UTC) period that began at `start` ends: the next day or the 1st of next month."""
    if period == "day":
        return start + 86400.0
    if period == "month":
        d = datetime.fromtimestamp(start, tz=UTC)
        year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
        return datetime(year, month, 1, tzinfo=UTC).timestamp()
    return None


class _QuotaState:
    __slots__ = ("period_start", "used", "in_flight")

    def __init__(self, period_start: float, used: int):
        self.period_start, self.used, self.in_flight = period_start, used, 0


class Reservation:
    """Tokens of an owner's quota held by one request in flight, in the period it was admitted in."""

    def __init__(self, manager: QuotaManager, key_id: str, owner: str, tokens: int, period_start: float):
        self._manager = manager
        self.key_id, self.owner, self.tokens, self.period_start = key_id, owner, tokens, period_start
        self.settled = False

    def settle(self, actual_tokens: int) -> None:
        """Charge `actual_tokens` (clamped to the reservation, logged if more) and release the rest.

        Idempotent. A request is charged to the period it was admitted in: settled after the period
        rolled over, it changes nothing in memory (the new period's usage came from the ledger), so the
        ledger row's created_at should be the admission time for the two to agree.
        """
        self._manager._settle(self, actual_tokens)


def _own_key(key: ApiKey) -> str:
    return key.key_id


class QuotaManager:
    """Token quotas per owner per calendar period; thread-safe (one lock).

    `owner(key)` names whose quota a key spends (default: the key's own id). `used(owner,
    period_start)` returns the tokens the ledger holds for that owner since period_start: with an
    owner covering several keys it must sum all of them, e.g.
    `QuotaManager(store.chain_tokens_used, owner=store.quota_owner)`. It is called under the lock,
    once per owner per period (and again after a rollover), so it should be quick: an indexed sum.
    """

    def __init__(self, used: Callable[[str, float], int], clock: Callable[[], float] = time.time, *,
                 owner: Callable[[ApiKey], str] = _own_key):
        self._used = used
        self._clock = clock
        self._owner = owner
        self._lock = threading.Lock()
        self._owners: dict[str, _QuotaState] = {}

    def _state(self, owner: str, key: ApiKey, now: float) -> _QuotaState:
        # A quota without a period (the store should not allow one) counts all time.
        start = key.period_start(now)
        start = 0.0 if start is None else float(start)
        state = self._owners.get(owner)
        if state is None or state.period_start != start:
            state = _QuotaState(start, int(self._used(owner, start)))
            self._owners[owner] = state
        return state

    def reserve(self, key: ApiKey, tokens: int, request_id: str | None = None) -> Reservation | None:
        """Hold `tokens` of the key owner's quota for one request, or raise QuotaExceeded. None: no quota.
        `request_id` names the hold where holds are rows (pgstore.SharedQuotas); here it is not needed."""
        quota = key.token_quota
        if quota is None:
            return None
        if tokens < 0:
            raise ValueError(f"a request reserves >= 0 tokens, got {tokens}")
        owner = self._owner(key)  # outside the lock: it may read the database
        with self._lock:
            state = self._state(owner, key, self._clock())
            if state.used + state.in_flight + tokens > quota:
                raise _quota_error(key, quota, state, tokens)
            state.in_flight += tokens
            return Reservation(self, key.key_id, owner, tokens, state.period_start)

    def _settle(self, res: Reservation, actual_tokens: int) -> None:
        with self._lock:
            if res.settled:
                return
            res.settled = True
            if actual_tokens > res.tokens:
                log.warning("key %s used %d tokens but reserved only %d; charging the reservation",
                            res.key_id, actual_tokens, res.tokens)
            state = self._owners.get(res.owner)
            if state is None or state.period_start != res.period_start:
                return  # the period rolled over: the new one started from the ledger
            state.in_flight -= res.tokens
            state.used += min(max(0, actual_tokens), res.tokens)

    def remaining(self, key: ApiKey) -> int | None:
        """Tokens the key may still reserve this period (quota - used - held by requests in flight)."""
        if key.token_quota is None:
            return None
        owner = self._owner(key)
        with self._lock:
            state = self._state(owner, key, self._clock())
            return max(0, key.token_quota - state.used - state.in_flight)


def _quota_error(key: ApiKey, quota: int, state: _QuotaState, tokens: int) -> QuotaExceeded:
    period = key.period or "period"
    resets_at = period_end(key.period, state.period_start)
    when = (f"It renews at {datetime.fromtimestamp(resets_at, tz=UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"
            if resets_at is not None else "It does not renew")
    if tokens > quota:
        message = (f"You exceeded your token quota for this {period}: this request reserves {tokens} tokens "
                   f"(prompt + max_tokens * n), more than the whole quota of {quota}; lower max_tokens or n, "
                   "or shorten the prompt.")
    else:
        message = (f"You exceeded your token quota for this {period}: quota {quota} tokens, used {state.used}, "
                   f"held by requests in flight {state.in_flight}, this request reserves {tokens} "
                   f"(prompt + max_tokens * n). {when}; until then lower max_tokens, or ask the operator "
                   "for a larger quota.")
    return QuotaExceeded(message, quota=quota, used=state.used, in_flight=state.in_flight, requested=tokens,
                         resets_at=resets_at)


# ------------------------------------------------------------------------------- admission queue


class AdmissionQueue:
    """At most `max_running` sequences inside, `max_waiting` more queued in arrival order, the rest turned away.

    A request takes one slot per sequence it generates (prompts x n), so one request asking for 64
    sequences weighs what 64 one-sequence requests do. For one asyncio event loop (not thread-safe).
    Freed slots go to the oldest waiters first, in order (a small request never overtakes a large one
    that came first, so nobody starves). A waiter cancelled (client gone) leaves the queue; if slots had
    just been handed to it, they pass on. `close()` (shutdown) turns away new requests and the waiting
    ones; requests already inside keep their slots.
    """

    def __init__(self, max_running: int, max_waiting: int):
        if isinstance(max_running, bool) or not isinstance(max_running, int) or max_running < 1:
            raise ConfigError(f"the admission queue needs max_running >= 1, got {max_running!r}")
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ConfigError(f"the admission queue needs max_waiting >= 0, got {max_waiting!r}")
        self.max_running, self.max_waiting = max_running, max_waiting
        self._running = 0
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self._closed = False

    @property
    def running(self) -> int:
        """Slots (sequences) held by admitted requests."""
        return self._running

    @property
    def waiting(self) -> int:
        """Slots (sequences) the waiting requests ask for."""
        return sum(n for f, n in self._waiters if not f.done())

    depth = waiting

    @property
    def closed(self) -> bool:
        return self._closed

    def weight(self, n: int) -> int:
        """Slots a request of n sequences takes: n, but never more than the whole pool (it could never run)."""
        return max(1, min(int(n), self.max_running))

    async def acquire(self, n: int = 1) -> None:
        """Wait for n slots (FIFO); Overloaded at once when the queue is full or closed. Pair with release(n)."""
        n = self.weight(n)
        if self._closed:
            raise Overloaded("The server is shutting down and admits no new requests; retry against "
                             "another replica or after the restart.")
        if self._running + n <= self.max_running and not self.waiting:
            self._running += n
            return
        if self.waiting + n > self.max_waiting:
            raise Overloaded(f"The server is overloaded: {self._running} sequences running and {self.waiting} "
                             "waiting, the most it queues; retry in a moment.", {"retry-after": "1"})
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, n)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(n)  # the slots were handed to us just as we were cancelled: pass them on
            else:
                self._remove(entry)
            raise
        except Overloaded:
            self._remove(entry)
            raise

    def release(self, n: int = 1) -> None:
        """Free n slots; they go to the oldest live waiters that fit, in arrival order."""
        n = self.weight(n)
        if self._running < n:
            raise RuntimeError("AdmissionQueue.release() without a matching acquire()")
        self._running -= n
        self._wake_next()

    def _remove(self, entry) -> None:
        try:
            self._waiters.remove(entry)
        except ValueError:
            return
        self._wake_next()

    def _wake_next(self) -> None:
        """Hand free slots to the waiters at the head of the queue while they fit (after a release, or
        when a waiter left and the ones behind it may fit now)."""
        while self._waiters:
            fut, want = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self._running + want > self.max_running:
                return
            self._waiters.popleft()
            self._running += want
            fut.set_result(None)

    @asynccontextmanager
    async def slot(self, n: int = 1) -> AsyncIterator[None]:
        """`async with queue.slot(n):` holds n slots for the block; any exit (error, cancel) frees them."""
        await self.acquire(n)
        try:
            yield
        finally:
            self.release(n)

    def close(self) -> None:
        """Stop admitting: later acquire() calls and everyone waiting now get Overloaded."""
        self._closed = True
        while self._waiters:
            fut, _ = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(Overloaded("The server is shutting down and admits no new requests; "
                                             "retry against another replica or after the restart."))
