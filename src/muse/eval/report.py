"""What an eval leaves on disk: results.json, report.md, bar charts, and every sample's record.

    OUT/results.json               the numbers (schema below); the gate and the speedrun read it
    OUT/report.md                  a side-by-side table, skips and failures, time and tokens, the charts,
                                   and the samples where the models disagree
    OUT/scores.png, OUT/bpb.png    one bar per (task, model), error bars = bootstrap stderr
    OUT/samples/<model>/<task>.jsonl   one record per sample: id, output or log-likelihoods, scores, reason
                                   (--samples K: K records per item, each with "sample" (its index) and "seed")

results.json (schema_version 1):

    {"schema_version": 1, "muse_version": "...", "created_at": "2026-...Z",
     "settings": {"tasks": [...], "split": "test", "limit": 100, "task_seed": 0, "shots": null | K,
                  "bootstrap": 1000, "cache": PATH,
                  "sampling": {"samples": K, "temperature": T} (only with --samples / --temperature)},
     "models": {NAME: {"kind": "muse"|"openai", "checkpoint" | "base_url"+"model", "identity", "style",
                       "spec", "error": null | "why the model could not be evaluated", "time_s"}},
     "tasks": {TASK: {"kind", "description", "metrics": [...], "primary", "higher_is_better", "chance", "source",
                    "shots": the few-shot examples in each prompt,
                    "sampling": {"samples", "temperature"} (sampled generate/chat tasks only; with K > 1
                                "metrics" adds "pass@1", "pass@2", ..., "pass@K")}},
     "results": {TASK: {NAME: {"status": "ok" | "skipped" | "failed", "reason": null | "...",
                               "n" (items), "n_samples" (records, K > 1 only), "n_failed" (records),
                               "failures": [first reasons], "metrics": {METRIC: {"value", "stderr"}},
                               "shots_reduced": {"n", "min_shots"} (only where some prompts lost few-shot
                                                examples to fit the model's context),
                               "time_s", "tokens": {"prompt", "completion"},
                               "requests": {"sent", "cached"}}}}}

`stderr` is the bootstrap standard error of the metric (1,000 resamples of the samples; null for n < 2;
sampled with K > 1: of the items, each item's value the mean over its K samples).
With two or more models, results.json also holds "paired" (paired_comparison: each model against the
first, on the samples both answered) and report.md its table:

     "paired": {"baseline": NAME, "confidence": 0.95, "bootstrap": 1000,
                "tasks": {TASK: {NAME: {"metric", "n", "baseline", "value", "delta", "ci": [lo, hi],
                                        "verdict": "better" | "worse" | "no significant difference"}}},
                "skipped": {TASK: {NAME: "why"}}}
Every file is written atomically. This module knows the results' shape, Markdown and matplotlib; it
runs nothing.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from muse.common.paths import atomic_write_bytes, atomic_write_json, atomic_write_text
from muse.eval.sampling import by_item, item_means

MAX_DISAGREEMENTS = 10
CONFIDENCE = 0.95
N_PAIRED_BOOTSTRAP = 1000


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
            # chance is one guess's score: it is not the chance of pass@k for k > 1
            guess = "-" if metric.startswith("pass@") and metric != "pass@1" else chance
            rows.append(f"| {task} | {metric}{arrow} | " + " | ".join(cells) + f" | {guess} | {n} |")
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
                lines.append(f"- {task}, {name}: {r['n_failed']} of {r.get('n_samples', r['n'])} samples failed (scored 0): "
                             + "; ".join(r.get("failures", [])[:3]))
            if r["status"] == "ok" and r.get("shots_reduced"):
                fewer = r["shots_reduced"]
                lines.append(f"- {task}, {name}: {fewer['n']} of {r['n']} prompts were asked with fewer few-shot "
                             f"examples (down to {fewer['min_shots']}) to fit the model's context")
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
    """Per task, the samples (by id) on which the models' primary scores or picks differ. Sampled items
    (several records per id) compare their mean score over the samples and show the first sample."""
    models = list(data["models"])
    out = {}
    for task, info in data["tasks"].items():
        per = {m: _one_per_item(records.get((m, task), []), info["primary"]) for m in models}
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


def _one_per_item(records: list[dict], metric: str) -> dict[str, dict]:
    """{id: record}; an item with several sampled records becomes its first sample's record with the
    mean score over its samples (and "failed" only when every sample failed)."""
    out = {}
    for sid, rs in by_item(records).items():
        if len(rs) == 1:
            out[sid] = rs[0]
        else:
            mean = sum(float(r["scores"].get(metric, 0.0)) for r in rs) / len(rs)
            out[sid] = {**rs[0], "scores": {**rs[0]["scores"], metric: mean}, "failed": all(r["failed"] for r in rs)}
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


def paired_difference(a: Sequence[float], b: Sequence[float], weights_a: Sequence[float] | None = None,
                      weights_b: Sequence[float] | None = None, n_boot: int = N_PAIRED_BOOTSTRAP, seed: int = 0,
                      confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(delta, lo, hi): B's metric minus A's over the same items, with a percentile bootstrap interval that
    resamples ITEMS (both models' values of an item together). The metric is the mean of the values, or
    with weights sum(values) / sum(weights) (bits per byte: nll in bits over bytes).

    Pairing is what makes a small change visible: two models that mostly agree item by item have a
    difference whose spread is far below what their two separate standard errors suggest."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or len(x) < 2:
        raise ValueError(f"a paired comparison needs two equal-length lists of at least 2 items, got {len(x)}, {len(y)}")
    wa = np.ones_like(x) if weights_a is None else np.asarray(weights_a, dtype=np.float64)
    wb = np.ones_like(y) if weights_b is None else np.asarray(weights_b, dtype=np.float64)
    delta = float(y.sum() / wb.sum() - x.sum() / wa.sum())
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    deltas = y[idx].sum(1) / np.maximum(wb[idx].sum(1), 1e-12) - x[idx].sum(1) / np.maximum(wa[idx].sum(1), 1e-12)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(deltas, [tail, 100 - tail])
    return delta, float(lo), float(hi)


def _paired_values(kind: str, metric: str, base_records: list[dict], other_records: list[dict]):
    """(ids, a, b, weights_a, weights_b) over the items both models have, or a reason string."""
    if kind == "bpb":  # failed windows are left out of bpb, so pair only windows both scored
        base, other = {r["id"]: r for r in base_records}, {r["id"]: r for r in other_records}
        ids = [i for i, r in base.items() if not r["failed"] and i in other and not other[i]["failed"]]
        if any(base[i]["bytes"] != other[i]["bytes"] for i in ids):
            return "the models' windows cover different text (another tokenizer), so they cannot be paired"
        a = [base[i]["nll"] / math.log(2) for i in ids]
        b = [other[i]["nll"] / math.log(2) for i in ids]
        w = [base[i]["bytes"] for i in ids]
        return ids, a, b, w, w
    # an item's value is the mean of its samples' scores (one sample unless --samples): items are paired,
    # never samples, whose indices mean nothing across models. A failed sample scores 0, as in the table.
    a, b = item_means(base_records, metric), item_means(other_records, metric)
    ids = [i for i in a if i in b]
    return ids, [a[i] for i in ids], [b[i] for i in ids], None, None


def paired_comparison(data: dict, records: dict, n_boot: int = N_PAIRED_BOOTSTRAP,
                      confidence: float = CONFIDENCE) -> dict | None:
    """Every model against the first (the baseline), task by task on the primary metric, paired by sample
    id, a sampled item by its mean over its samples (module docstring's "paired"); None with fewer than two
    models. A difference is significant when its interval excludes 0; "worse" then means lower (higher for bits per byte)."""
    models = list(data["models"])
    if len(models) < 2:
        return None
    base_name = models[0]
    out: dict = {"baseline": base_name, "confidence": confidence, "bootstrap": n_boot, "tasks": {}, "skipped": {}}
    for task, info in data["tasks"].items():
        base = records.get((base_name, task), [])
        for m in models[1:]:
            other = records.get((m, task), [])
            got = _paired_values(info["kind"], info["primary"], base, other) if base and other else "not scored by both"
            if not isinstance(got, str) and len(got[0]) < 2:
                got = "fewer than 2 samples scored by both"
            if isinstance(got, str):
                out["skipped"].setdefault(task, {})[m] = got
                continue
            ids, a, b, wa, wb = got
            delta, lo, hi = paired_difference(a, b, wa, wb, n_boot, confidence=confidence)
            significant = lo > 0 or hi < 0
            verdict = ("no significant difference" if not significant
                       else "better" if (delta > 0) == info["higher_is_better"] else "worse")
            out["tasks"].setdefault(task, {})[m] = {
                "metric": info["primary"], "n": len(ids), "baseline": _metric_of(a, wa), "value": _metric_of(b, wb),
                "delta": delta, "ci": [lo, hi], "verdict": verdict}
    return out


def _metric_of(values: Sequence[float], weights: Sequence[float] | None) -> float:
    """The metric of one model over the paired items: the mean, or sum(values) / sum(weights)."""
    return float(sum(values) / (sum(weights) if weights is not None else len(values)))


def paired_table(paired: dict) -> str:
    """Markdown: each model's primary metric against the baseline's on the same samples, with the interval."""
    base = paired["baseline"]
    rows = [f"| task | metric | model | {base} | model's | difference ({paired['confidence']:.0%} CI) | n | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    for task, per_model in paired["tasks"].items():
        for m, c in per_model.items():
            lo, hi = c["ci"]
            rows.append(f"| {task} | {c['metric']} | {m} | {c['baseline']:.4f} | {c['value']:.4f} | "
                        f"{c['delta']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {c['n']} | {c['verdict']} |")
    for task, per_model in paired.get("skipped", {}).items():
        for m, why in per_model.items():
            rows.append(f"| {task} | - | {m} | - | - | - | - | not compared: {why} |")
    return "\n".join(rows)


def render_markdown(data: dict, records: dict, charts: list[str]) -> str:
    lines = ["# Evaluation", ""]
    s = data["settings"]
    lines.append(f"Split `{s['split']}`, " + (f"first {s['limit']} samples per task" if s["limit"] else "all samples")
                 + (f", {s['shots']}-shot" if s.get("shots") is not None else "")
                 + f"; ± is the bootstrap standard error ({s['bootstrap']} resamples). muse {data['muse_version']}, "
                 f"{data['created_at']}.")
    sampling = s.get("sampling")
    if sampling:
        k, t = sampling["samples"], sampling["temperature"]
        lines += ["", f"**Sampled, not greedy**: every generate/chat item was asked {k} time{'s' if k > 1 else ''} "
                      f"at temperature {t:g}, each sample with its own seed"
                  + (f"; a score is the mean over items of the item's mean over its {k} samples (pass@1 for 0/1 "
                     "grades), ± a bootstrap over items, and pass@k is the unbiased estimator "
                     "1 - C(n-c, k)/C(n, k) per item (c samples of n graded 1), averaged over items."
                     if k > 1 else ".")
                  + " Multiple-choice and bpb tasks are scored as always."]
    lines.append("")
    for name, m in data["models"].items():
        where = m.get("checkpoint") or f"{m.get('base_url')} model {m.get('model')}"
        lines.append(f"- **{name}**: {m['kind']} `{where}` ({m.get('style')} prompts)")
    lines += ["", results_table(data), ""]
    notes = _notes(data)
    if notes:
        lines += ["## Skipped, failed and shortened", "", *notes, ""]
    paired = data.get("paired")
    if paired and (paired["tasks"] or paired["skipped"]):
        lines += [f"## Paired comparison with {paired['baseline']}", "",
                  f"Each model minus {paired['baseline']} on the samples both scored, per task's primary metric; "
                  f"the interval is a {paired['confidence']:.0%} percentile bootstrap over samples, resampled in "
                  f"pairs ({paired['bootstrap']} resamples). A difference is significant when its interval "
                  "excludes 0.", "", paired_table(paired), ""]
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
    paired = paired_comparison(data, records)
    if paired is not None:
        data["paired"] = paired
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
