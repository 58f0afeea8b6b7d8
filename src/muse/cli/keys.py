"""Create, list, revoke and rotate the API keys partners use to call `muse serve`.

A key is printed once, when it is created (or rotated), and never again: the database keeps only its
sha256. Lists show the public key id ("key_..."), which is also what the usage ledger and the server's
logs show. Revoking or rotating takes effect at once, also in a server that is already running.
Limits: --rpm (requests/minute) and --tpm (tokens/minute, prompt + max_tokens reserved per request);
--token-quota N --period day|month caps the tokens of each UTC calendar day or month. Times are UTC.
The database is --db, else $MUSE_SERVE_DB, else $MUSE_HOME/serve.sqlite3 (~/.muse/serve.sqlite3): an
SQLite file, or the postgresql:// URL that several `muse serve` replicas share (a key works on every
replica at once, and a revocation stops it on every replica from its next request).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from datetime import UTC, datetime

from muse.common.errors import UsageError

EXAMPLES = """examples:
  muse keys create --partner acme --models small,large --rpm 60 --tpm 100000
  muse keys create --partner lab2 --token-quota 5000000 --period month --expires 2025-12-31
  KEY=$(muse keys create --partner ci --expires 7d)     # the key alone on stdout
  muse keys list                    # active and expired keys; --all adds revoked ones
  muse keys revoke key_3f2a9c01b7e4
  muse keys rotate key_3f2a9c01b7e4  # a new key with the same settings; the old one stops working
"""

_SHOWN_ONCE = "This is the only time the key is shown: store it now (the database keeps only its hash)."


class _Parser(argparse.ArgumentParser):
    """Bad flags become one UsageError line (exit 2) like every other user error, not usage + error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.error = types.MethodType(_Parser.error, p)  # main builds a plain parser; give it one-line errors too
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", metavar="PATH|URL",
                        help="serving database: an SQLite file or a postgresql:// URL (default $MUSE_SERVE_DB, "
                             "else $MUSE_HOME/serve.sqlite3)")
    common.add_argument("--json", action="store_true", help="print one JSON object")
    sub = p.add_subparsers(dest="action", required=True, metavar="{create,list,revoke,rotate}",
                           parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    c = sub.add_parser("create", parents=[common], formatter_class=fmt, help="create a key and print it once",
                       description="Create a key and print it once on stdout (a note goes to stderr).")
    c.add_argument("--partner", required=True, help="who the key is for (usage is reported per partner)")
    c.add_argument("--models", metavar="A,B", help="models the key may call (default: every served model)")
    c.add_argument("--rpm", type=_positive_int, metavar="N", help="requests per minute (default: unlimited)")
    c.add_argument("--tpm", type=_positive_int, metavar="N",
                   help="tokens per minute, prompt + max_tokens (default: unlimited)")
    c.add_argument("--token-quota", type=_positive_int, metavar="N",
                   help="tokens per --period (prompt + completion); needs --period")
    c.add_argument("--period", choices=["day", "month"], help="quota period, a UTC calendar day or month")
    c.add_argument("--expires", metavar="WHEN",
                   help="YYYY-MM-DD (00:00 UTC that day), an ISO datetime (UTC unless it has an offset), "
                        "or a duration from now: 30d, 12h")

    ls = sub.add_parser("list", parents=[common], formatter_class=fmt, help="list keys (never their text)",
                        description="List keys: id, partner, models, limits, quota, expiry, status.")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    ls.add_argument("--partner", help="only this partner's keys")

    r = sub.add_parser("revoke", parents=[common], formatter_class=fmt, help="revoke a key (takes effect at once)",
                       description="Revoke a key; a running server refuses it from the next request on.")
    r.add_argument("key_id", metavar="KEY_ID", help="the key's id, as `muse keys list` shows it")

    ro = sub.add_parser("rotate", parents=[common], formatter_class=fmt, help="replace a key, print the new one once",
                        description="Create a new key with the same settings and revoke the old one.")
    ro.add_argument("key_id", metavar="KEY_ID", help="the key's id, as `muse keys list` shows it")


def _open(args, *, create: bool):
    from muse.server.store import open_store

    return open_store(args.db, create=create)


def _expires(text: str | None, now: float) -> float | None:
    from muse.server.records import parse_duration, parse_utc

    if text is None:
        return None
    duration = parse_duration(text)
    if duration is not None:
        if duration <= 0:
            raise UsageError(f"--expires {text!r} is not in the future; pass e.g. 30d or a later date")
        return now + duration
    when = parse_utc(text, what="--expires")
    if when <= now:
        raise UsageError(f"--expires {text!r} is in the past; pass a later date (times are UTC)")
    return when


def _when(ts: float | None, default: str = "never") -> str:
    return default if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _limits(key) -> str:
    parts = [f"{key.rpm} rpm" if key.rpm else "", f"{key.tpm} tpm" if key.tpm else "",
             f"{key.token_quota} tokens/{key.period}" if key.token_quota else ""]
    return ", ".join(p for p in parts if p) or "no limits"


def _describe(key) -> str:
    models = "all models" if key.models is None else "models " + ",".join(key.models)
    expires = "" if key.expires_at is None else f", expires {_when(key.expires_at)} UTC"
    return f"partner {key.partner}, {models}, {_limits(key)}{expires}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
                     for row in [headers, *rows])


def _create(args, now: float) -> int:
    if (args.token_quota is None) != (args.period is None):
        raise UsageError("--token-quota and --period go together: pass both (e.g. --token-quota 1000000 "
                         "--period month) or neither")
    expires_at = _expires(args.expires, now)
    models = None if args.models is None else args.models.split(",")
    with _open(args, create=True) as store:
        text, key = store.create_key(args.partner, models=models, rpm=args.rpm, tpm=args.tpm,
                                     token_quota=args.token_quota, period=args.period,
                                     expires_at=expires_at, now=now)
    print(f"created {key.key_id} ({_describe(key)}) in {store.where}", file=sys.stderr)
    print(_SHOWN_ONCE, file=sys.stderr)
    print(json.dumps({"key": text, **key.as_dict(now)}) if args.json else text)
    return 0


def _list(args, now: float) -> int:
    with _open(args, create=False) as store:
        keys = store.list_keys(include_revoked=args.all, partner=args.partner)
        partners = {k.partner for k in store.list_keys(include_revoked=True)} if not keys else set()
    if args.json:
        print(json.dumps({"keys": [k.as_dict(now) for k in keys]}))
        return 0
    if not keys:
        if args.partner is not None and args.partner not in partners:
            from muse.common.errors import closest

            print(f"no keys for partner {args.partner!r}.{closest(args.partner, partners)}")
        else:
            print("no keys" + ("" if args.all else " (--all shows revoked ones)")
                  + "; create one with `muse keys create --partner NAME`")
        return 0
    rows = [[k.key_id, k.partner, "all" if k.models is None else ",".join(k.models),
             str(k.rpm or "-"), str(k.tpm or "-"), f"{k.token_quota}/{k.period}" if k.token_quota else "-",
             _when(k.expires_at), k.status(now)] for k in keys]
    print(_table(["KEY_ID", "PARTNER", "MODELS", "RPM", "TPM", "QUOTA", "EXPIRES (UTC)", "STATUS"], rows))
    return 0


def _revoke(args, now: float) -> int:
    with _open(args, create=False) as store:
        before = store.get_key(args.key_id)
        key = store.revoke(args.key_id, now=now)
    if args.json:
        print(json.dumps(key.as_dict(now)))
    elif before is not None and before.revoked_at is not None:
        print(f"{key.key_id} (partner {key.partner}) was already revoked at {_when(key.revoked_at)} UTC")
    else:
        print(f"revoked {key.key_id} (partner {key.partner}); requests with it are refused from now on")
    return 0


def _rotate(args, now: float) -> int:
    with _open(args, create=False) as store:
        text, key = store.rotate(args.key_id, now=now)
    print(f"rotated {args.key_id} -> {key.key_id} ({_describe(key)}); {args.key_id} no longer works",
          file=sys.stderr)
    print(_SHOWN_ONCE, file=sys.stderr)
    print(json.dumps({"key": text, **key.as_dict(now)}) if args.json else text)
    return 0


def run(args) -> int:
    now = time.time()
    return {"create": _create, "list": _list, "revoke": _revoke, "rotate": _rotate}[args.action](args, now)
