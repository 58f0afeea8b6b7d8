"""What the two serving databases share: the `Store` interface (keys, operator credentials, the usage
ledger, replicas) written once, in SQL both SQLite and PostgreSQL run, over three primitives each
store supplies:

    _rows(sql, params)   one read (a list of tuples)
    _write_txn()         a short write transaction: `c.execute(sql, params)` -> a cursor
    _snapshot()          several reads that see one snapshot (the ledger reads below)

SQL is written with `?` placeholders; the PostgreSQL store turns them into `%s` (pgstore.py). Which
store a `--db` names is decided by `open_store` (store.py): a file path is SQLite (store.py), a
`postgresql://` URL is PostgreSQL (pgstore.py). What differs between them is only what one process
cannot know on its own: the server lock or replica leases, and where quota reservations live
(`make_quotas`, `make_limiter`).

Ledger reads count rows not yet committed (this process's writer queue, ledger.py) as if they were:
a quota can never be undercounted because of the queue. Rows another replica has not committed yet
(milliseconds) are not visible here; the PostgreSQL store's quotas do not depend on that (pgstore.py).

Torch-free, stdlib + muse.common only.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hmac
import json
import time
from collections.abc import Callable, Iterable, Sequence

from muse.common.errors import MuseError, UsageError, closest
from muse.common.logging import get_logger
from muse.server.keys import check_format, generate_key, hash_key, new_key_id
from muse.server.ledger import REC_COLS, LedgerWriter
from muse.server.records import FINAL_STATUSES, PERIODS, ApiKey, UsageRecord, utc_iso

log = get_logger("muse.server.store")

FLUSH_TIMEOUT_S = 10.0     # flush() waits at most this long by default: a stuck disk must not hang a caller
BOOTSTRAP_ADMIN = "admin_bootstrap"  # the admin_keys row that mirrors the server's admin key
_EDITABLE = {"models", "rpm", "tpm", "token_quota", "period", "expires_at"}   # update_key
CLOSE_TIMEOUT_S = 30.0     # close(): the writer's last tries (ledger.py STOP_ATTEMPTS) fit in it


# The store's time of the HTTP request being served: the server sets a fresh StoreTime per request
# (app.RequestContext) and observes it when the request ends. Worker threads started with
# asyncio.to_thread copy the context, so their calls add to the same object; calls on threads the
# request did not start (the ledger writer, the heartbeat, an engine client's callbacks) are not timed.
STORE_TIME: contextvars.ContextVar[StoreTime | None] = contextvars.ContextVar("muse_store_time", default=None)
_IN_TIMED: contextvars.ContextVar[bool] = contextvars.ContextVar("muse_store_in_timed", default=False)

# What a request's store time is spent on (the labels of muse_store_op_seconds: a closed set)
OPS = ("authenticate", "admit", "release", "ledger", "read", "write")


class StoreTime:
    """One request's wall time in the store: in all (`total`) and per operation (`ops`, keys from OPS).
    Each call is timed from before it asks for a connection (or the SQLite lock) until its result is
    in hand, so it counts waiting for the database and for this process's own connection."""

    __slots__ = ("total", "ops")

    def __init__(self):
        self.total = 0.0
        self.ops: dict[str, float] = {}

    def add(self, op: str, seconds: float) -> None:
        self.total += seconds
        self.ops[op] = self.ops.get(op, 0.0) + seconds


@contextlib.contextmanager
def timed(op: str):
    """Add the block's wall time to the current request's STORE_TIME under `op` (if a request is being
    timed). Nested blocks count once, under the outermost op (authenticate's read is "authenticate")."""
    acc = STORE_TIME.get()
    if acc is None or _IN_TIMED.get():
        yield
        return
    token = _IN_TIMED.set(True)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        acc.add(op, time.perf_counter() - t0)
        _IN_TIMED.reset(token)


class StoreError(MuseError):
    """The serving database cannot be opened or used (missing, not a Muse database, written by a newer
    Muse, an unsupported URL, unreachable, or already served by another `muse serve`)."""


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


KEY_COLS = ", ".join(f.name for f in dataclasses.fields(ApiKey))
_KEY_INSERT = f"INSERT INTO api_keys (key_hash, {KEY_COLS}) VALUES (?{', ?' * len(dataclasses.fields(ApiKey))})"


def _key_from_row(row: Sequence) -> ApiKey:
    k = ApiKey(*row)
    return dataclasses.replace(k, models=None if k.models is None else tuple(json.loads(k.models)))


def _key_params(key: ApiKey) -> list:
    vals = [getattr(key, f.name) for f in dataclasses.fields(ApiKey)]
    vals[2] = None if key.models is None else json.dumps(list(key.models))
    return vals


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


class SqlStore:
    """The Store interface over `_rows`, `_write_txn` and `_snapshot` (see the module docstring).

    Subclasses set `self._clock`, `self._ledger` (a LedgerWriter) and `self.replica` (this server's
    name in the ledger, None for the CLI and one-server SQLite), and implement the opening and closing,
    `lock_for_server` and `recover_interrupted`.
    """

    _clock: Callable[[], float] = time.time
    _ledger: LedgerWriter
    replica: str | None = None
    kind = "?"                 # "sqlite" | "postgresql": what `muse keys`, logs and /admin/replicas say
    where = "?"                # the database as a human sees it (a path, or a URL without its password)

    # ---- primitives (subclasses) ---------------------------------------------------------------------
    def _rows(self, sql: str, params: Sequence = ()) -> list[tuple]:
        raise NotImplementedError

    def _write_txn(self):
        raise NotImplementedError

    def _snapshot(self):
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, timeout: float | None = CLOSE_TIMEOUT_S) -> bool:
        raise NotImplementedError

    # ---- serving: what differs between one server and several replicas ---------------------------------
    def make_quotas(self):
        """The quota manager a server over this store uses (limits.QuotaManager: in this process)."""
        from muse.server.limits import QuotaManager

        return QuotaManager(self.chain_tokens_used, owner=self.quota_owner)

    def make_limiter(self):
        """The rate limiter a server over this store uses (limits.RateLimiter: in this process)."""
        from muse.server.limits import RateLimiter

        return RateLimiter()

    def report_state(self, state: Callable[[], dict]) -> None:
        """Where a replica reads its live engine state for the other replicas' operator view (pgstore.py);
        one server alone shows its own, so this store ignores it."""

    def replicas(self) -> list[dict]:
        """Every replica serving from this database with its last heartbeat and engine state (pgstore.py);
        [] here: one SQLite file has one server, whose state /admin/engine shows directly."""
        return []

    # ---- keys ----------------------------------------------------------------------------------------------
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
        with self._write_txn() as c:
            c.execute(_KEY_INSERT, [hash_key(text), *_key_params(key)])
        return text, key

    def list_keys(self, *, include_revoked: bool = False, partner: str | None = None) -> list[ApiKey]:
        sql, params = f"SELECT {KEY_COLS} FROM api_keys WHERE 1=1", []
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        if partner is not None:
            sql += " AND partner = ?"
            params.append(partner)
        return [_key_from_row(r) for r in self._rows(sql + " ORDER BY created_at, key_id", params)]

    def get_key(self, key_id: str) -> ApiKey | None:
        rows = self._rows(f"SELECT {KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,))
        return _key_from_row(rows[0]) if rows else None

    @staticmethod
    def _unknown_key(c, key_id: str) -> UsageError:
        ids = [r[0] for r in c.execute("SELECT key_id FROM api_keys", ()).fetchall()]
        return UsageError(f"no key with id {key_id!r}.{closest(key_id, ids)} `muse keys list --all` shows the ids")

    @staticmethod
    def _locked_key(c, key_id: str):
        # FOR UPDATE where the database has row locks (PostgreSQL): two admins changing one key take turns
        return c.execute(f"SELECT {KEY_COLS} FROM api_keys WHERE key_id = ?{getattr(c, 'for_update', '')}",
                         (key_id,)).fetchone()

    def revoke(self, key_id: str, *, now: float | None = None) -> ApiKey:
        """Revoke a key (it stops working at once, also in a running server). Revoking a revoked key
        returns it unchanged. UsageError for an unknown id."""
        now = self._now(now)
        with self._write_txn() as c:
            row = self._locked_key(c, key_id)
            if row is None:
                raise self._unknown_key(c, key_id)
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
        with self._write_txn() as c:
            row = self._locked_key(c, key_id)
            if row is None:
                raise self._unknown_key(c, key_id)
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

    def authenticate(self, key_text: str, *, now: float | None = None, cached: bool = False) -> ApiKey:
        """The active key whose text this is; AuthError("invalid" | "revoked" | "expired") otherwise.

        Reads the database on every call, so revocations by the CLI apply at once (an indexed look-up).
        Malformed text (wrong prefix, length, alphabet or checksum) is refused without a look-up.
        `cached`: the caller's request is admitted through the store, which checks the key again (the
        PostgreSQL store may then answer from memory, pgstore.py); this store always reads.
        """
        if not check_format(key_text):
            raise AuthError("invalid")
        digest = hash_key(key_text)
        with timed("authenticate"):
            rows = self._rows(f"SELECT key_hash, {KEY_COLS} FROM api_keys WHERE key_hash = ?", (digest,))
        # The index look-up above is not constant-time, but it only ever sees the sha256 of the text,
        # which tells an attacker nothing about any stored key; the comparison of the hashes is.
        if not rows or not hmac.compare_digest(rows[0][0], digest):
            raise AuthError("invalid")
        key = _key_from_row(rows[0][1:])
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
        rows = self._rows("SELECT owner_id FROM api_keys WHERE key_id = ?", (key.key_id,))
        return rows[0][0] if rows and rows[0][0] else key.key_id

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
        with self._write_txn() as c:
            row = self._locked_key(c, key_id)
            if row is None:
                raise self._unknown_key(c, key_id)
            new = dataclasses.replace(_key_from_row(row), **values)
            if new.revoked_at is not None:
                raise UsageError(f"key {key_id} is revoked; create a new key instead of changing this one")
            _check_quota(new)
            params = _key_params(new)
            cols = [f.name for f in dataclasses.fields(ApiKey)]
            c.execute(f"UPDATE api_keys SET {', '.join(f'{n} = ?' for n in sorted(_EDITABLE))} WHERE key_id = ?",
                      [params[cols.index(n)] for n in sorted(_EDITABLE)] + [key_id])
        return new

    # ---- operator credentials --------------------------------------------------------------------------
    def set_bootstrap_admin(self, text: str | None, *, now: float | None = None) -> None:
        """Store the server's admin key (MUSE_ADMIN_KEY / --admin-key-file) as the operator credential
        BOOTSTRAP_ADMIN, hashed, replacing what an earlier start stored; None removes it (no admin).
        Replicas of one database should share one admin key: the last one started wins otherwise.
        An upsert, not delete-then-insert: replicas starting at once on PostgreSQL (read committed) would
        both find no row and both insert, and the second start would fail on the primary key."""
        now = self._now(now)
        with self._write_txn() as c:
            self._serialize_admin_writes(c)
            if text is None:
                c.execute("DELETE FROM admin_keys WHERE admin_id = ?", (BOOTSTRAP_ADMIN,))
                return
            c.execute("DELETE FROM admin_keys WHERE key_hash = ? AND admin_id <> ?",  # one hash, one row
                      (hash_key(text), BOOTSTRAP_ADMIN))
            c.execute("INSERT INTO admin_keys (admin_id, key_hash, label, created_at) VALUES (?, ?, ?, ?) "
                      "ON CONFLICT (admin_id) DO UPDATE SET key_hash = excluded.key_hash, label = excluded.label, "
                      "created_at = excluded.created_at, revoked_at = NULL",
                      (BOOTSTRAP_ADMIN, hash_key(text), "the server's admin key", now))

    def _serialize_admin_writes(self, c) -> None:
        """Make this transaction the only writer of admin_keys until it ends. SQLite's write transaction
        already is; PostgreSQL's store takes a lock (two upserts at once can each fail on the hash index)."""

    def is_admin(self, text: str) -> bool:
        """True if `text` is an operator credential that is not revoked (an indexed look-up by hash)."""
        digest = hash_key(text)
        rows = self._rows("SELECT key_hash FROM admin_keys WHERE key_hash = ? AND revoked_at IS NULL", (digest,))
        return bool(rows) and hmac.compare_digest(rows[0][0], digest)

    # ---- ledger: writes ---------------------------------------------------------------------------------
    def _label(self, rec: UsageRecord) -> UsageRecord:
        rec = rec.cleaned()
        if self.replica is not None and rec.replica is None:
            rec = dataclasses.replace(rec, replica=self.replica)
        return rec

    def begin(self, rec: UsageRecord) -> None:
        """Record an admitted request now, as a "running" row (prompt tokens known, completion 0 or
        what is known), so a crash still bills it. Settle it with record(); never waits on the disk."""
        if not isinstance(rec, UsageRecord) or rec.status != "running":
            raise ValueError(f"begin() takes a UsageRecord with status 'running', got {rec!r:.200}")
        with timed("ledger"):
            self._ledger.put(self._label(rec))

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
        with timed("ledger"):
            self._ledger.put(self._label(rec))

    def flush(self, timeout: float | None = FLUSH_TIMEOUT_S) -> bool:
        """Wait until every row handed in so far is committed (or dropped and logged, ledger.py).
        False, never a hang, when that takes over `timeout` s (None: no limit) or the writer is gone."""
        ok = self._ledger.flush(timeout)
        if not ok:
            log.warning("ledger: flush did not finish within %s s; rows are still pending (they count in "
                        "every read)", timeout)
        return ok

    # ---- ledger: reads ----------------------------------------------------------------------------------
    def _read_merged(self, query: Callable, **filters):
        """(query result over committed rows, committed rows that a pending version supersedes (to
        take away), pending rows matching `filters` (to add)).

        The pending snapshot is taken first: a version missing from it was committed before it (the
        writer commits, then un-pends), so the query sees it. A request with a pending version counts
        once, from that version: its committed row (an older "running" one, or the same row committed
        meanwhile) is fetched in the same read snapshot and taken away.
        """
        pending = self._ledger.pending()
        where, params = _where(**filters)
        shadowed: list[UsageRecord] = []
        with self._snapshot() as c:
            result = query(c, where, params)
            ids = list(pending)
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                shadowed += [UsageRecord(*row) for row in c.execute(
                    f"SELECT {REC_COLS} FROM ledger{where} AND request_id IN ({', '.join('?' * len(chunk))})",
                    params + chunk).fetchall()]
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
        ids = {r[0] for r in self._rows("SELECT key_id FROM api_keys WHERE owner_id = ?", (owner_id,))}
        return self._tokens(key_ids=sorted(ids | {owner_id}), since=since)

    def usage(self, *, partner: str | None = None, since: float | None = None, key_id: str | None = None,
              until: float | None = None) -> list[UsageRecord]:
        """Ledger rows (committed and not yet) matching the filters, oldest first; `since` inclusive,
        `until` exclusive. Running rows show what they know so far."""
        rows, shadowed, pending = self._read_merged(
            lambda c, where, params: c.execute(f"SELECT {REC_COLS} FROM ledger{where}", params).fetchall(),
            partner=partner, since=since, key_id=key_id, until=until)
        recs = {r.request_id: r for r in (UsageRecord(*row) for row in rows)}
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
            n, pt, ct, cached = int(n), int(pt), int(ct), int(cached)  # PostgreSQL's SUM(bigint) is a numeric
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
