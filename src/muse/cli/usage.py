"""Report what partners used: a summary per partner, key and model, or one CSV row per request for billing.

Reads the usage ledger of `muse serve` (one row per request, written by the server, also for requests
the client abandoned: status "aborted" with the tokens generated until then). Prompt tokens include
cached ones (prefix-cache hits); "cached" shows how many of them were. Times are UTC; --since is
inclusive, --until exclusive. The database is --db, else $MUSE_SERVE_DB, else $MUSE_HOME/serve.sqlite3;
with several replicas on one PostgreSQL database (--db postgresql://...) the ledger is theirs together,
and --csv's last column says which replica served each request.
It can be read while the server runs; rows the server has not committed yet (at most a fraction of a
second's worth) are not in it. Requests still running show status "running" with the tokens known so
far; "interrupted" ones were running when a server died (billed prompt + tokens known at the crash).

Text in the ledger comes partly from clients (the model name), so nothing is printed raw: the table
escapes control characters (no terminal escapes, no forged lines), and CSV cells that a spreadsheet
would run as a formula (starting with = + - @ tab or CR) get a leading ' (the OWASP CSV-injection rule).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import types
from datetime import UTC, datetime

from muse.common.errors import UsageError

EXAMPLES = """examples:
  muse usage                                   # every partner, all time
  muse usage --partner acme --since 7d         # the last 7 days (24h: the last 24 hours)
  muse usage --since 2025-06-01 --until 2025-07-01 --csv > june.csv   # one row per request, for billing
  muse usage --json --db /srv/muse/serve.sqlite3
"""

CSV_COLUMNS = ["request_id", "created_at", "partner", "key_id", "model", "endpoint", "status", "http_status",
               "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens",
               "latency_s", "ttft_s", "replica"]
_TOKEN_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens")


def _error(self, message: str):
    raise UsageError(f"{message} (see `{self.prog} --help`)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.error = types.MethodType(_error, p)  # bad flags: one line and exit 2, like every other user error
    p.add_argument("--partner", help="only this partner")
    p.add_argument("--since", metavar="WHEN",
                   help="from this time: YYYY-MM-DD (00:00 UTC), an ISO datetime, or back from now: 7d, 24h")
    p.add_argument("--until", metavar="WHEN", help="up to (not including) this time; same forms as --since")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="one CSV row per request on stdout, header first")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--db", metavar="PATH|URL",
                   help="serving database: an SQLite file or a postgresql:// URL (default $MUSE_SERVE_DB, "
                        "else $MUSE_HOME/serve.sqlite3)")


def _parse_when(text: str | None, flag: str, now: float) -> float | None:
    from muse.server.records import parse_duration, parse_utc

    if text is None:
        return None
    duration = parse_duration(text)
    if duration is not None:
        return now - duration
    try:
        return parse_utc(text, what=flag)
    except UsageError:
        raise UsageError(f"{flag} {text!r} is neither a date nor a duration; use YYYY-MM-DD, an ISO datetime "
                         f"such as 2025-06-01T12:00:00Z (UTC), or 7d / 24h back from now") from None


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    from muse.server.records import clean_label

    rows = [[clean_label(x, limit=None) for x in row] for row in rows]  # a model name may hold ESC or \n
    numeric = [all(str(r[i]).isdigit() for r in rows) and bool(rows) for i in range(len(headers))]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    return "\n".join("  ".join(str(x).rjust(w) if num else str(x).ljust(w)
                               for x, w, num in zip(row, widths, numeric)).rstrip()
                     for row in [headers, *rows])


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(value: str | None) -> str:
    """A text cell safe to open in a spreadsheet: control characters escaped (rows written before the
    ledger cleaned its text may hold them) and a leading ' on anything Excel or Sheets would evaluate
    as a formula (OWASP: cells starting with = + - @ tab CR). Numbers are written as numbers."""
    from muse.server.records import clean_label

    text = "" if value is None else clean_label(value, limit=None)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _write_csv(records) -> None:
    from muse.server.records import utc_iso

    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in records:
        w.writerow([_csv_text(r.request_id), utc_iso(r.created_at), _csv_text(r.partner), _csv_text(r.key_id),
                    _csv_text(r.model), _csv_text(r.endpoint), _csv_text(r.status), r.http_status,
                    _csv_text(r.finish_reason), r.prompt_tokens, r.completion_tokens, r.cached_tokens,
                    r.total_tokens, round(r.latency_s, 6), "" if r.ttft_s is None else round(r.ttft_s, 6),
                    _csv_text(r.replica)])


def run(args) -> int:
    try:
        code = _report(args)
        sys.stdout.flush()  # inside the try: a reader gone away fails here, not at interpreter exit
    except BrokenPipeError:
        # `muse usage --csv | head -1`: the reader has what it wanted. Stop quietly, as a Unix tool killed
        # by SIGPIPE would (exit 141), and point stdout at devnull so the interpreter's last flush of
        # the leftover buffer cannot print a second error (the recipe of Python's signal docs).
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):  # stdout replaced by an object without a file
            pass
        return 141
    return code


def _report(args) -> int:
    from muse.common.errors import closest
    from muse.server.records import utc_iso
    from muse.server.store import open_store

    now = time.time()
    since = _parse_when(args.since, "--since", now)
    until = _parse_when(args.until, "--until", now)
    if since is not None and until is not None and since >= until:
        raise UsageError(f"--since ({utc_iso(since)}) must be before --until ({utc_iso(until)})")
    with open_store(args.db, create=False) as store:
        if args.partner is not None:
            partners = {k.partner for k in store.list_keys(include_revoked=True)}
            if args.partner not in partners:
                raise UsageError(f"no partner named {args.partner!r}.{closest(args.partner, partners)} "
                                 f"`muse keys list --all` shows the partners")
        if args.csv:
            _write_csv(store.usage(partner=args.partner, since=since, until=until))
            return 0
        groups = store.usage_summary(partner=args.partner, since=since, until=until)

    totals = {f: sum(g[f] for g in groups) for f in _TOKEN_FIELDS}
    totals["statuses"] = {}
    for g in groups:
        for s, n in g["statuses"].items():
            totals["statuses"][s] = totals["statuses"].get(s, 0) + n
    if args.json:
        out = [{**g, "first_at": utc_iso(g["first_at"]), "last_at": utc_iso(g["last_at"])} for g in groups]
        print(json.dumps({"partner": args.partner, "since": utc_iso(since), "until": utc_iso(until),
                          "groups": out, "totals": totals}))
        return 0

    span = f"from {_when(since)} UTC" if since is not None else "all time"
    if until is not None:
        span += f" until {_when(until)} UTC"
    if not groups:
        print(f"no requests recorded ({span})")
        return 0

    def statuses(d: dict) -> str:
        return ", ".join(f"{s} {n}" for s, n in sorted(d.items()))

    rows = [[g["partner"], g["key_id"], g["model"], *(str(g[f]) for f in _TOKEN_FIELDS[:4]), statuses(g["statuses"])]
            for g in groups]
    rows.append(["total", "", "", *(str(totals[f]) for f in _TOKEN_FIELDS[:4]), statuses(totals["statuses"])])
    print(f"usage, {span}:")
    print(_table(["PARTNER", "KEY_ID", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "CACHED", "STATUSES"], rows))
    return 0
