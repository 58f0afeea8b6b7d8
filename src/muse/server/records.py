"""What the serving database holds, as Python values: `ApiKey` (a key without its text) and
`UsageRecord` (one ledger row), the UTC time helpers their commands use (`utc_iso`, `parse_utc`,
`parse_duration`), and `clean_label`, the one rule for client-supplied text that reaches the ledger,
a log line or a terminal. No SQL here: store.py maps these to and from its tables.
"""

from __future__ import annotations

import calendar
import dataclasses
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from muse.common.errors import UsageError

PERIODS = ("day", "month")                 # calendar periods in UTC
FINAL_STATUSES = ("ok", "aborted", "error")  # how a request ended (Store.record)
# "running": admitted and not settled yet (Store.begin); "interrupted": it was running when the server
# died, found by Store.recover_interrupted at the next start.
STATUSES = (*FINAL_STATUSES, "running", "interrupted")
LABEL_LIMIT = 128                          # characters of a text field the ledger keeps (clean_label)


# ---------------------------------------------------------------------------------------------- text

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if "\ud800" <= ch <= "\udfff":  # a lone surrogate: not encodable as UTF-8, so SQLite refuses it
        return "\ufffd"
    if ch.isprintable():
        return ch
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def clean_label(text: object, limit: int | None = LABEL_LIMIT) -> str:
    """`text` made safe to store, log and print: at most `limit` characters (None: no cap), lone
    surrogates replaced by U+FFFD, and every non-printable character (C0/C1 controls such as ESC and
    newline, DEL, bidi overrides and other format characters, non-space separators) written as a
    Python-style escape ("\\x1b", "\\n", "\\u202e"), so no terminal escape, forged line or reordered text
    survives. A longer text is cut to limit - 1 characters plus "\u2026"; an escape is never cut in half.
    Printable text (any script) within the limit comes back unchanged. Not reversible: it is for labels
    (a model name a client sent), not for data.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"clean_label needs a limit >= 1 (or None), got {limit}")
    if not isinstance(text, str):
        text = str(text)
    if (limit is None or len(text) <= limit) and text.isprintable():
        return text  # the common case, a plain short name
    pieces: list[str] = []
    size = 0
    for ch in text:  # stops one piece past the limit: a 1 MB name costs ~limit steps, not a million
        piece = _escape(ch)
        pieces.append(piece)
        size += len(piece)
        if limit is not None and size > limit:
            break
    else:
        return "".join(pieces)
    while size > limit - 1:
        size -= len(pieces.pop())
    return "".join(pieces) + "\u2026"


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
    # The first key of its rotation chain (itself unless it was made by `rotate`): the quota's owner,
    # so in-flight reservations and usage are shared by a key and every key that replaced it.
    owner_id: str | None = None

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
    status: str                   # one of STATUSES: "ok", "aborted" (client left / shutdown), "error",
                                  # "running" (not settled yet), "interrupted" (the server died)
    http_status: int
    finish_reason: str | None
    created_at: float             # when the request arrived
    latency_s: float
    ttft_s: float | None = None
    replica: str | None = None    # the `muse serve --replica-name` that served it (None: one server alone)

    def __post_init__(self):
        # A bad row is a bug in the caller: fail at the call site, not later in the writer thread.
        if not self.request_id or not isinstance(self.request_id, str):
            raise ValueError("UsageRecord needs a non-empty request_id")
        if clean_label(self.request_id) != self.request_id:  # the primary key: never rewritten, so refused
            raise ValueError(f"UsageRecord.request_id must be printable and at most {LABEL_LIMIT} characters, "
                             f"got {clean_label(self.request_id, 40)!r}")
        if self.status not in STATUSES:
            raise ValueError(f"UsageRecord.status must be one of {STATUSES}, got {self.status!r}")
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"UsageRecord.{name} must be a non-negative int, got {v!r}")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def cleaned(self) -> UsageRecord:
        """This row with every text field passed through clean_label (itself when nothing changes).

        The model name comes from the client (up to a 1 MB body of anything); the others are the
        server's, cleaned too so a bug upstream cannot put a terminal escape into `muse usage`.
        """
        changes = {}
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None and clean_label(value) != value:
                changes[name] = clean_label(value)
        return dataclasses.replace(self, **changes) if changes else self


_TEXT_FIELDS = ("key_id", "partner", "model", "endpoint", "finish_reason", "replica")
