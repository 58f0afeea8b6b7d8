"""`muse keys create|list|revoke|rotate` and `muse usage`: outputs, the key shown once, and bad flags."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

from muse.server.keys import check_format
from muse.server.records import UsageRecord
from muse.server.store import AuthError, Store

pytest_plugins = ["pg_kit"]   # the pg_cluster and pg_url fixtures: a real PostgreSQL


def test_create_prints_the_key_once(muse):
    code, out, err = muse("keys", "create", "--partner", "acme", "--models", "small,large", "--rpm", "60",
                          "--tpm", "1000", "--token-quota", "50000", "--period", "month", "--expires", "30d")
    key = out.strip()
    assert code == 0 and check_format(key) and out == key + "\n"  # the key alone on stdout: KEY=$(...) works
    assert "only time" in err and key not in err and "acme" in err
    with Store(muse.db) as s:
        k = s.authenticate(key)
    assert (k.partner, k.models, k.rpm, k.tpm, k.token_quota, k.period) == ("acme", ("small", "large"), 60, 1000,
                                                                           50000, "month")
    assert 29 * 86400 < k.expires_at - time.time() <= 30 * 86400

    code, out, _ = muse("keys", "create", "--partner", "lab2", "--expires", "2999-01-01", "--json")
    obj = json.loads(out)
    assert code == 0 and check_format(obj["key"]) and obj["expires_at"] == "2999-01-01T00:00:00Z"
    assert obj["status"] == "active" and obj["models"] is None


def test_list_never_shows_key_text(muse):
    keys = [muse("keys", "create", "--partner", p)[1].strip() for p in ("acme", "acme", "lab2")]
    code, out, err = muse("keys", "list")
    assert code == 0 and out.count("key_") == 3 and "acme" in out and "active" in out
    assert out.splitlines()[0].split()[:3] == ["KEY_ID", "PARTNER", "MODELS"]
    code, js, _ = muse("keys", "list", "--json", "--partner", "acme")
    listed = json.loads(js)["keys"]
    assert code == 0 and len(listed) == 2 and {k["partner"] for k in listed} == {"acme"}
    for k in keys:
        assert k not in out + err + js and k[8:51] not in out + js
    code, out, _ = muse("keys", "list", "--partner", "acm")
    assert code == 0 and "Did you mean: acme" in out


def test_revoke_and_rotate(muse):
    old = muse("keys", "create", "--partner", "acme", "--rpm", "7")[1].strip()
    with Store(muse.db) as s:
        old_id = s.authenticate(old).key_id
    code, out, err = muse("keys", "rotate", old_id)
    new = out.strip()
    assert code == 0 and check_format(new) and new != old and "only time" in err and old_id in err
    with Store(muse.db) as s:
        k = s.authenticate(new)
        assert k.rotated_from == old_id and k.rpm == 7 and k.partner == "acme"
        with pytest.raises(AuthError, match="revoked"):
            s.authenticate(old)
    code, out, _ = muse("keys", "revoke", k.key_id)
    assert code == 0 and f"revoked {k.key_id}" in out
    code, out, _ = muse("keys", "revoke", k.key_id)
    assert code == 0 and "already revoked" in out
    with Store(muse.db) as s, pytest.raises(AuthError, match="revoked"):
        s.authenticate(new)
    assert "no keys" in muse("keys", "list")[1]
    code, out, _ = muse("keys", "list", "--all")
    assert out.count("revoked") == 2 and new not in out


@pytest.mark.parametrize("argv, message", [
    (["keys", "create", "--partner", "x", "--rpm", "0"], "positive integer"),
    (["keys", "create", "--partner", "x", "--tpm", "-3"], "positive integer"),
    (["keys", "create", "--partner", "x", "--rpm", "lots"], "positive integer"),
    (["keys", "create", "--partner", "x", "--token-quota", "1000"], "go together"),
    (["keys", "create", "--partner", "x", "--period", "day"], "go together"),
    (["keys", "create", "--partner", "x", "--token-quota", "5", "--period", "week"], "invalid choice"),
    (["keys", "create", "--partner", "x", "--expires", "2020-01-01"], "in the past"),
    (["keys", "create", "--partner", "x", "--expires", "2025-13-45"], "YYYY-MM-DD"),
    (["keys", "create", "--partner", "x", "--expires", "soon"], "YYYY-MM-DD"),
    (["keys", "create", "--partner", "x", "--models", "a,,b"], "non-empty"),
    (["keys", "create", "--partner", "  "], "partner name"),
    (["keys", "create"], "--partner"),
    (["keys"], "required"),
    (["keys", "frobnicate"], "invalid choice"),
    (["keys", "list", "--bogus"], "unrecognized"),
    (["keys", "revoke"], "KEY_ID"),
    (["keys", "revoke", "key_000000000000"], "no key"),
    (["keys", "rotate", "key_000000000000"], "no key"),
    (["usage", "--since", "yesterday"], "neither a date nor a duration"),
    (["usage", "--since", "2025-02-01", "--until", "2025-01-01"], "before --until"),
    (["usage", "--csv", "--json"], "not allowed"),
    (["usage", "--partner", "nobody"], "no partner"),
])
def test_bad_flags_are_one_line_and_exit_2(muse, argv, message):
    muse("keys", "create", "--partner", "acme")  # a database to talk to
    code, out, err = muse(*argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and out == ""


def test_read_verbs_do_not_create_a_database(muse, tmp_path):
    missing = tmp_path / "typo.sqlite3"
    for argv in (["keys", "list"], ["keys", "revoke", "key_000000000000"], ["usage"]):
        code, _, err = muse(*argv, "--db", str(missing))
        assert code == 2 and "no serving database" in err and len(err.strip().splitlines()) == 1
    assert not missing.exists()


def _ledger(db, now):
    with Store(db) as s:
        _, a = s.create_key("acme")
        _, b = s.create_key("lab2")
        rows = [(a, "small", now - 3 * 86400, "ok", 10, 5, 2), (a, "small", now - 600, "aborted", 8, 3, 0),
                (a, "large", now - 60, "ok", 4, 4, 0), (b, "small", now - 30, "error", 7, 0, 0)]
        for i, (k, model, at, status, p, c, cached) in enumerate(rows):
            s.record(UsageRecord(f"req-{i}", k.key_id, k.partner, model, "chat.completions", p, c, cached, status,
                                 200 if status == "ok" else 499, "stop", at, 0.5, 0.05))
    return a, b


def test_usage_summary_csv_and_json(muse):
    muse("keys", "create", "--partner", "nobody-used-me")
    a, b = _ledger(muse.db, time.time())
    code, out, _ = muse("usage")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("usage, all time")
    assert lines[1].split() == ["PARTNER", "KEY_ID", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "CACHED", "STATUSES"]
    small = next(line for line in lines if a.key_id in line and "small" in line).split()
    assert small[3:7] == ["2", "18", "8", "2"] and "aborted" in small[7:]
    assert lines[-1].split()[:5] == ["total", "4", "29", "12", "2"]

    code, out, _ = muse("usage", "--csv", "--partner", "acme", "--since", "24h")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["request_id"] for r in rows] == ["req-1", "req-2"]
    assert rows[0]["status"] == "aborted" and rows[0]["total_tokens"] == "11" and rows[0]["key_id"] == a.key_id
    assert rows[0]["created_at"].endswith("Z") and out.splitlines()[0].startswith("request_id,created_at,")

    code, out, _ = muse("usage", "--json", "--since", "1h")
    obj = json.loads(out)
    assert code == 0 and obj["totals"]["requests"] == 3 and obj["totals"]["statuses"] == {"aborted": 1, "error": 1,
                                                                                          "ok": 1}
    assert {(g["partner"], g["model"]) for g in obj["groups"]} == {("acme", "small"), ("acme", "large"),
                                                                  ("lab2", "small")}
    code, out, _ = muse("usage", "--partner", "nobody-used-me")
    assert code == 0 and "no requests" in out
    code, out, _ = muse("usage", "--csv", "--until", "2000-01-01")
    assert code == 0 and out.splitlines() == [out.splitlines()[0]]  # the header alone


def test_a_database_url_is_one_line_and_creates_nothing(muse, tmp_path, monkeypatch):
    # `--db postgresql://...` used to be taken as a relative path: it created ./postgresql:/host/...; now
    # it is the PostgreSQL store, and a server nobody answers on is one line without the password
    monkeypatch.chdir(tmp_path)
    url = "postgresql://muse:s3cret@127.0.0.1:1/muse"
    for argv in (["keys", "create", "--partner", "acme"], ["keys", "list"], ["usage"]):
        code, out, err = muse(*argv, "--db", url)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert "cannot connect to the serving database postgresql://muse:***@127.0.0.1:1/muse" in err
        assert "s3cret" not in err
    code, _, err = muse("keys", "list", "--db", "sqlite:///x.db")
    assert code == 2 and "is a URL Muse cannot open" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_keys_and_usage_against_postgresql(muse, pg_url, monkeypatch):
    """The same verbs on the PostgreSQL store (pg_kit.py): --db URL, and MUSE_SERVE_DB holding a URL."""
    from muse.server.store import open_store

    code, out, err = muse("keys", "create", "--partner", "acme", "--token-quota", "100", "--period", "day",
                          "--db", pg_url)
    key = out.strip()
    assert code == 0 and check_format(key) and "postgresql://muse@" in err
    monkeypatch.setenv("MUSE_SERVE_DB", pg_url)
    code, out, _ = muse("keys", "list")
    assert code == 0 and out.count("key_") == 1 and "100/day" in out
    with open_store(pg_url, create=False) as s:
        k = s.authenticate(key)
        s.record(UsageRecord("req-1", k.key_id, "acme", "small", "completions", 7, 3, 0, "ok", 200, "stop",
                             time.time(), 0.5, replica="a"))
    code, out, _ = muse("keys", "rotate", k.key_id)
    assert code == 0 and check_format(out.strip())
    code, out, _ = muse("usage", "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [(r["request_id"], r["total_tokens"], r["replica"]) for r in rows] == [("req-1", "10", "a")]
    code, _, err = muse("usage", "--db", pg_url.rsplit("/", 1)[0] + "/missing")
    assert code == 2 and "cannot connect" in err and "Traceback" not in err
