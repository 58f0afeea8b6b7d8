"""What an eval leaves on disk: results.json, report.md, bar charts, and every sample's record.

    OUT/results.json               the numbers (schema below); the gate and the speedrun read it
    OUT/report.md                  a side-by-side table, skips and failures, time and tokens, the charts,
                                   and the samples where the models disagree
    OUT/scores.png, OUT/bpb.png    one bar per (task, model), error bars = bootstrap stderr
    OUT/samples/<model>/<task>.jsonl   one record per sample: id, output or log-likelihoods, scores, reason

results.json (schema_version 1):

    {"schema_version": 1, "muse_version": "...", "created_at": "2026-...Z",
     "settings": {"tasks": [...], "split": "test", "limit": 100, "task_seed": 0, "shots": null | K,
                  "bootstrap": 1000, "cache": PATH},
     "models": {NAME: {"kind": "muse"|"openai", "checkpoint" | "base_url"+"model", "identity", "style",
                       "spec", "error": null | "why the model could not be evaluated", "time_s"}},
     "tasks": {TASK: {"kind", "description", "metrics": [...], "primary", "higher_is_better", "chance", "source",
                    "shots": the few-shot examples in each prompt}},
     "results": {TASK: {NAME: {"status": "ok" | "skipped" | "failed", "reason": null | "...", "n", "n_failed",
                               "failures": [first reasons], "metrics": {METRIC: {"value", "stderr"}},
                               "time_s", "tokens": {"prompt", "completion"},
                               "requests": {"sent", "cached"}}}}}

`stderr` is the bootstrap standard error of the metric (1,000 resamples of the samples; null for n < 2).
Every file is written atomically. This module knows the results' shape, Markdown and matplotlib; it
runs nothing.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

from muse.common.paths import atomic_write_bytes, atomic_write_json, atomic_write_text

MAX_DISAGREEMENTS = 10


def _fmt(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "-"
    v, se = m["value"], m.get("stderr")
    return f"{v:.3f} ± {se:.3f}" if se is not None else f"{v:.3f}"


def _cell(r: dict | None, metric: str) -> str:
    if not r:
        return "-"
    if r["status"] != "ok":
        return r["status"]
    cell = _fmt(r.get("metrics", {}).get(metric))
    return cell + (f" ({r['n_failed']} failed)" if r.get("n_failed") else "")


def results_table(data: dict) -> str:
    """The side-by-side Markdown table: one row per task metric, one column per model."""
    models = list(data["models"])
    head = "| task | metric | " + " | ".join(models) + " | chance | n |"
    rows = [head, "|" + "---|" * (len(models) + 4)]
    for task, info in data["tasks"].items():
        per_model = data["results"].get(task, {})
        n = max((r.get("n", 0) for r in per_model.values()), default=0)
        chance = "-" if info.get("chance") is None else f"{info['chance']:.3f}"
        for metric in info["metrics"]:
            arrow = "" if info["higher_is_better"] else " (lower is better)"
            cells = [_cell(per_model.get(m), metric) for m in models]
            rows.append(f"| {task} | {metric}{arrow} | " + " | ".join(cells) + f" | {chance} | {n} |")
    return "\n".join(rows)


def _notes(data: dict) -> list[str]:
    lines = []
    for name, m in data["models"].items():
        if m.get("error"):
            lines.append(f"- **{name} failed**: {m['error']}")
    for task, per_model in data["results"].items():
        for name, r in per_model.items():
            if r["status"] == "skipped":
                lines.append(f"- {task} skipped for {name}: {r['reason']}")
            elif r["status"] == "ok" and r.get("n_failed"):
                lines.append(f"- {task}, {name}: {r['n_failed']} of {r['n']} samples failed (scored 0): "
                             + "; ".join(r.get("failures", [])[:3]))
    return lines


def _cost_table(data: dict) -> str:
    rows = ["| model | task | time (s) | prompt tokens | completion tokens | requests sent | from cache |",
            "|---|---|---|---|---|---|---|"]
    for task, per_model in data["results"].items():
        for name, r in per_model.items():
            if r["status"] == "ok":
                t, q = r["tokens"], r["requests"]
                rows.append(f"| {name} | {task} | {r['time_s']:.2f} | {t['prompt']:,} | {t['completion']:,} | "
                            f"{q['sent']:,} | {q['cached']:,} |")
    return "\n".join(rows)


def _short(text, n: int = 80) -> str:
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= n else s[: n - 3] + "..."


def disagreements(data: dict, records: dict, limit: int = MAX_DISAGREEMENTS) -> dict[str, list[dict]]:
    """Per task, the samples (by id) on which the models' primary scores or picks differ."""
    models = list(data["models"])
    out = {}
    for task, info in data["tasks"].items():
        per = {m: {r["id"]: r for r in records.get((m, task), [])} for m in models}
        per = {m: rs for m, rs in per.items() if rs}
        if len(per) < 2 or info["kind"] == "bpb":
            continue
        first = next(iter(per.values()))
        rows = []
        for sid in first:
            recs = {m: rs.get(sid) for m, rs in per.items()}
            if any(r is None for r in recs.values()):
                continue
            keys = {(r["scores"].get(info["primary"]), r.get("pred"), r.get("failed")) for r in recs.values()}
            if len(keys) > 1:
                rows.append({"id": sid, "records": recs})
                if len(rows) >= limit:
                    break
        if rows:
            out[task] = rows
    return out


def _disagreement_md(data: dict, records: dict) -> list[str]:
    lines = []
    for task, rows in disagreements(data, records).items():
        models = list(rows[0]["records"])
        metric = data["tasks"][task]["primary"]
        lines += [f"### {task}", "", "| sample | " + " | ".join(models) + " |", "|" + "---|" * (len(models) + 1)]
        for row in rows:
            cells = []
            for m in models:
                r = row["records"][m]
                what = r.get("reason") if r.get("failed") else r.get("output", "")
                cells.append(f"{r['scores'].get(metric, 0):g}: {_short(what, 60)}")
            lines.append(f"| {_short(row['id'], 30)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def bar_chart(data: dict, metrics_of: str) -> bytes | None:
    """A PNG of the primary metric per task (bpb tasks: metrics_of="bpb"; the others: "scores")."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(data["models"])
    tasks = [t for t, i in data["tasks"].items() if (i["kind"] == "bpb") == (metrics_of == "bpb")]
    series = []
    for t in tasks:
        metric = data["tasks"][t]["primary"]
        vals = [(data["results"][t].get(m, {}).get("metrics", {}).get(metric) or {}) for m in models]
        if any(v.get("value") is not None for v in vals):
            series.append((t, vals))
    if not series:
        return None
    fig = Figure(figsize=(max(6.0, 1.1 * len(series) * max(1, len(models)) + 2), 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(series))]
        ys = [vals[j].get("value") or 0.0 for _, vals in series]
        es = [vals[j].get("stderr") or 0.0 for _, vals in series]
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=m)
    ax.set_xticks(range(len(series)), [t for t, _ in series], rotation=30, ha="right")
    ax.set_ylabel("bits per byte (lower is better)" if metrics_of == "bpb" else "score (primary metric)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_markdown(data: dict, records: dict, charts: list[str]) -> str:
    lines = ["# Evaluation", ""]
    s = data["settings"]
    lines.append(f"Split `{s['split']}`, " + (f"first {s['limit']} samples per task" if s["limit"] else "all samples")
                 + (f", {s['shots']}-shot" if s.get("shots") is not None else "")
                 + f"; ± is the bootstrap standard error ({s['bootstrap']} resamples). muse {data['muse_version']}, "
                 f"{data['created_at']}.")
    lines.append("")
    for name, m in data["models"].items():
        where = m.get("checkpoint") or f"{m.get('base_url')} model {m.get('model')}"
        lines.append(f"- **{name}**: {m['kind']} `{where}` ({m.get('style')} prompts)")
    lines += ["", results_table(data), ""]
    notes = _notes(data)
    if notes:
        lines += ["## Skipped and failed", "", *notes, ""]
    lines += ["## Time and tokens", "", _cost_table(data), ""]
    for c in charts:
        lines += [f"![{c}]({c})", ""]
    dis = _disagreement_md(data, records)
    if dis:
        lines += ["## Where the models disagree", "",
                  f"Up to {MAX_DISAGREEMENTS} samples per task whose scores differ (score: output).", "", *dis]
    return "\n".join(lines).rstrip() + "\n"


def write_report(results, out_dir: str | Path) -> Path:
    """Write everything listed in the module docstring into out_dir; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data, records = results.data, results.records
    atomic_write_json(out / "results.json", data)
    for (model, task), recs in records.items():
        path = out / "samples" / model / f"{task}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    charts = []
    for which, name in (("scores", "scores.png"), ("bpb", "bpb.png")):
        png = bar_chart(data, which)
        if png is not None:
            atomic_write_bytes(out / name, png)
            charts.append(name)
    atomic_write_text(out / "report.md", render_markdown(data, records, charts))
    return out


def contamination_table(reports: Sequence) -> str:
    """Markdown: per task, how many test items occur in the training text (tasks.contamination)."""
    rows = ["| task | items checked | contaminated | too short to check | note |", "|---|---|---|---|---|"]
    for r in reports:
        note = r.overlap_expected or ("" if not r.examples else f"e.g. {r.examples[0].get('id')}")
        rows.append(f"| {r.task} | {r.checked} | {r.contaminated} ({r.rate:.1%}) | {r.too_short} | {note} |")
    return "\n".join(rows)
