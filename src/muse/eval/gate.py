"""The release gate: minimum (or maximum) metric values a CI can check after `muse eval`.

    # gate.toml: one table per task, one value per metric
    [arithmetic_2digit]
    score = 0.40              # at least 0.40
    [quote_completion]
    acc = { min = 0.30 }      # the same, spelled out
    [val_bpb]
    bpb = 2.1                 # bpb is lower-is-better: a plain number is a maximum
    # models = ["A"]          # optional, top level: which models must pass (default: every model)

`check_gate(results.data, load_gate(path))` returns the failures, one line each ("model A:
arithmetic_2digit score 0.31 < 0.40"); `muse eval --gate` exits 3 with the first one. A gated task or
metric a model did not produce (skipped, failed, not in --tasks) fails the gate: a release check must not
pass because something was not measured.

This module knows the gate file and results.json's shape; it runs nothing.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from muse.common.errors import UsageError, closest


@dataclass(frozen=True)
class Bound:
    task: str
    metric: str
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Gate:
    bounds: tuple[Bound, ...]
    models: tuple[str, ...] | None = None
    path: str = ""


def _number(where: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UsageError(f"{where} must be a number, got {v!r}")
    return float(v)


def load_gate(path: str | os.PathLike, lower_is_better=frozenset({"bpb"})) -> Gate:
    """Parse a gate file; UsageError naming the key for anything malformed."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read the gate file {p}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{p}: not valid TOML ({e})") from None
    models = doc.pop("models", None)
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise UsageError(f"{p}: models must be a list of model names")
    bounds = []
    for task, table in doc.items():
        if not isinstance(table, dict):
            raise UsageError(f"{p}: '{task}' must be a table ([{task}]) of metric = minimum")
        for metric, v in table.items():
            where = f"{p}: [{task}] {metric}"
            if isinstance(v, dict):
                unknown = [k for k in v if k not in ("min", "max")]
                if unknown or not v:
                    raise UsageError(f"{where}: use {{min = x}} and/or {{max = y}}")
                lo = _number(where + ".min", v["min"]) if "min" in v else None
                hi = _number(where + ".max", v["max"]) if "max" in v else None
                bounds.append(Bound(task, metric, lo, hi))
            elif metric in lower_is_better:
                bounds.append(Bound(task, metric, max=_number(where, v)))
            else:
                bounds.append(Bound(task, metric, min=_number(where, v)))
    if not bounds:
        raise UsageError(f"{p}: the gate sets no bound; add e.g. [arithmetic_2digit] score = 0.4")
    return Gate(tuple(bounds), tuple(models) if models is not None else None, str(p))


def check_gate(data: dict, gate: Gate) -> list[str]:
    """One line per bound a model misses (module docstring); [] when every model passes."""
    models = list(gate.models) if gate.models is not None else list(data["models"])
    failures = []
    for m in models:
        if m not in data["models"]:
            failures.append(f"model {m} (named in the gate) was not evaluated.{closest(m, data['models'])}")
            continue
        for b in gate.bounds:
            r = data["results"].get(b.task, {}).get(m)
            if r is None:
                failures.append(f"model {m}: {b.task} was not run (add it to --tasks)")
                continue
            if r["status"] != "ok":
                failures.append(f"model {m}: {b.task} {r['status']}: {r.get('reason')}")
                continue
            value = (r.get("metrics", {}).get(b.metric) or {}).get("value")
            if value is None:
                have = ", ".join(r.get("metrics", {})) or "none"
                failures.append(f"model {m}: {b.task} has no metric {b.metric!r} (it has: {have})")
            elif b.min is not None and value < b.min:
                failures.append(f"model {m}: {b.task} {b.metric} {value:.4f} < {b.min:g}")
            elif b.max is not None and value > b.max:
                failures.append(f"model {m}: {b.task} {b.metric} {value:.4f} > {b.max:g}")
    return failures
