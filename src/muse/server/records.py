"""What the serving database holds, as Python values: `ApiKey` (a key without its text) and
`UsageRecord` (one ledger row), and the UTC time helpers their commands use (`utc_iso`, `parse_utc`,
`parse_duration`). No SQL here: store.py maps these to and from its tables.
"""

from __future__ import annotations

import calendar
import dataclasses
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from muse.common.errors import UsageError

PERIODS = ("day", "month")                 # calendar periods in UTC
STATUSES = ("ok", "aborted", "error")      # a ledger row's status


# ----------------------------------------------------------------------------------------------- time

def utc_iso(ts: float | None) -> str | None:
    """Epoch seconds -> "2025-06-30T12:00:00Z" (None stays None)."""
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.isoformat(timespec="seconds" if dt.microsecond == 0 else "milliseconds").replace("+00:00", "Z")


def parse_utc(text: str, *, what: str = "date") -> float:
    """"2025-06-30" (00:00 UTC that day) or an ISO datetime ("2025-06-30T12:00", "...Z", "...+02:00";
    no offset means UTC) -> epoch seconds. UsageError naming `what` otherwise."""
    s = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):
            dt = datetime.strptime(s, "%Y-%m-%d").replace(tzinfo=UTC)
        else:
            dt = datetime.fromisoformat(s)
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a date; use YYYY-MM-DD or an ISO datetime such as "
                         f"2025-06-30T12:00:00Z (UTC unless an offset is given)") from None
    return dt.timestamp()


def parse_duration(text: str) -> float | None:
    """"7d" -> 604800.0, "24h" -> 86400.0; None when `text` is not a duration (maybe a date)."""
    m = re.fullmatch(r"\s*(\d+)\s*([dh])\s*", text)
    if m is None:
        return None
    return int(m.group(1)) * (86400.0 if m.group(2) == "d" else 3600.0)


# ------------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class ApiKey:
    """One API key as stored (without its text): who it is for, what it may do, and its lifecycle."""

    key_id: str
    partner: str
    models: tuple[str, ...] | None          # None = every served model
    rpm: int | None                         # requests per minute; None = unlimited
    tpm: int | None                         # tokens per minute; None = unlimited
    token_quota: int | None                 # tokens per period; None = no quota
    period: str | None                      # "day" | "month" (UTC calendar); set iff token_quota is
    expires_at: float | None
    created_at: float
    revoked_at: float | None = None
    rotated_from: str | None = None         # the key_id this key replaced

    def allows_model(self, name: str) -> bool:
        return self.models is None or name in self.models

    def status(self, now: float) -> str:
        """"active", "revoked" or "expired" at time `now`."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def period_start(self, now: float) -> float | None:
        """Start of the quota period containing `now` (00:00 UTC today, or the 1st of the month); None
        without a period."""
        if self.period is None:
            return None
        dt = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period == "month":
            dt = dt.replace(day=1)
        return dt.timestamp()

    def period_end(self, now: float) -> float | None:
        """When the quota period containing `now` ends (the next period's start); None without a period."""
        start = self.period_start(now)
        if start is None:
            return None
        dt = datetime.fromtimestamp(start, UTC)
        if self.period == "day":
            return start + 86400.0
        days = calendar.monthrange(dt.year, dt.month)[1]
        return start + days * 86400.0

    def as_dict(self, now: float | None = None) -> dict:
        """A JSON-ready dict (times as ISO strings, plus "status" when `now` is given). No key text."""
        d = dataclasses.asdict(self)
        d["models"] = None if self.models is None else list(self.models)
        for name in ("expires_at", "created_at", "revoked_at"):
            d[name] = utc_iso(d[name])
        if now is not None:
            d["status"] = self.status(now)
        return d


@dataclass(frozen=True)
class UsageRecord:
    """One request's ledger row. Tokens: prompt_tokens includes cached_tokens (prefix-cache hits)."""

    request_id: str
    key_id: str
    partner: str
    model: str
    endpoint: str                 # "completions" | "chat.completions" | ...
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    status: str                   # one of STATUSES: "ok", "aborted" (client left / shutdown), "error"
    http_status: int
    finish_reason: str | None
    created_at: float             # when the request arrived
    latency_s: float
    ttft_s: float | None = None

    def __post_init__(self):
        # A bad row is a bug in the caller: fail at the call site, not later in the writer thread.
        if not self.request_id or not isinstance(self.request_id, str):
            raise ValueError("UsageRecord needs a non-empty request_id")
        if self.status not in STATUSES:
            raise ValueError(f"UsageRecord.status must be one of {STATUSES}, got {self.status!r}")
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"UsageRecord.{name} must be a non-negative int, got {v!r}")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
