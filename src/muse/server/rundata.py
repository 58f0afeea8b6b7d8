"""What the run dashboard shows, read from a run directory: each stage's metrics.jsonl (numeric columns
only, thinned to at most MAX_POINTS rows), `muse eval`'s results.json and a few samples per (model,
task), and the speedrun's report.md as plain text (the page renders it as text, never as HTML).

    runs/x/base/metrics.jsonl, runs/x/sft/metrics.jsonl ...   -> stages
    runs/x/eval/results.json, runs/x/eval/samples/M/T.jsonl   -> eval
    runs/x/report.md                                          -> report

A stage or checkpoint directory works too (its own metrics.jsonl is one stage). A half-written last
line (a run killed mid-write) is skipped and counted. Torch-free; this module knows files, not HTTP.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from muse.common.errors import UsageError

MAX_POINTS = 2000            # rows per stage sent to the page (every k-th row, the last one always)
MAX_REPORT_CHARS = 200_000
MAX_SAMPLES = 20             # per (model, task)
MAX_SAMPLE_CHARS = 2000      # per text field of a sample


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """(rows with `step` and their finite numeric values, lines skipped as unreadable)."""
    rows, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                bad += 1
                continue
            rows.append({k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)
                         and math.isfinite(v)})
    return thin(rows), bad


def thin(rows: list[dict], limit: int = MAX_POINTS) -> list[dict]:
    if len(rows) <= limit:
        return rows
    k = math.ceil(len(rows) / limit)
    return rows[::k] + ([rows[-1]] if (len(rows) - 1) % k else [])


def _clip(value):
    if isinstance(value, str) and len(value) > MAX_SAMPLE_CHARS:
        return value[:MAX_SAMPLE_CHARS] + "\u2026"
    if isinstance(value, dict):
        return {k: _clip(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clip(v) for v in value[:50]]
    return value


def read_samples(eval_dir: Path) -> dict[str, dict[str, list]]:
    """model -> task -> its first MAX_SAMPLES sample records (long texts clipped)."""
    out: dict[str, dict[str, list]] = {}
    root = eval_dir / "samples"
    if not root.is_dir():
        return out
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(model_dir.glob("*.jsonl")):
            recs = []
            with open(f, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if len(recs) >= MAX_SAMPLES:
                        break
                    try:
                        recs.append(_clip(json.loads(line)))
                    except json.JSONDecodeError:
                        continue
            out.setdefault(model_dir.name, {})[f.stem] = recs
    return out


def read_run(path: str | Path) -> dict:
    """One run directory as the dashboard's JSON. UsageError when it is not a directory or holds
    nothing to show."""
    run = Path(path).expanduser()
    if not run.is_dir():
        raise UsageError(f"{run} is not a directory; pass a run directory such as runs/speedrun")
    stages, skipped = {}, 0
    candidates = [run] + sorted(p for p in run.iterdir() if p.is_dir())
    for d in candidates:
        f = d / "metrics.jsonl"
        if f.is_file():
            rows, bad = read_metrics(f)
            skipped += bad
            stages[d.name if d != run else run.name] = rows
    results = run / "eval" / "results.json"
    evals = None
    if results.is_file():
        try:
            evals = json.loads(results.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UsageError(f"{results} is not valid JSON; rerun `muse eval` to rewrite it") from None
    report = run / "report.md"
    text = report.read_text(encoding="utf-8", errors="replace")[:MAX_REPORT_CHARS] if report.is_file() else None
    if not stages and evals is None and text is None:
        raise UsageError(f"{run} has no metrics.jsonl, eval/results.json or report.md; pass a run directory "
                         f"that `muse train` (or another stage) wrote")
    return {"name": run.resolve().name, "path": str(run), "stages": stages, "skipped_lines": skipped,
            "eval": evals, "samples": read_samples(run / "eval") if evals is not None else {}, "report": text}


def read_runs(paths: list[str | Path]) -> list[dict]:
    runs = [read_run(p) for p in paths]
    names = [r["name"] for r in runs]
    for r in runs:  # two runs named alike (a/run, b/run) get their path as the label
        if names.count(r["name"]) > 1:
            r["name"] = r["path"]
    return runs
