"""Training metrics: `metrics.jsonl` (the record), TensorBoard events and a loss-curve PNG (the views).

Rows are `{"step": int, name: value, ...}`; train rows carry loss, lr, tokens, tokens_per_s and mfu (or
flops_per_s on cpu), eval rows val_loss and val_bpb. Only rank 0 writes. On resume, `truncate_after(step)`
drops rows the resumed run will write again (and a half-written last line from a killed process), so the
file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from muse.common import dist
from muse.common.paths import atomic_write_bytes, atomic_write_text


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every complete row of a metrics.jsonl (a torn last line from a crash is skipped)."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn write
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    except FileNotFoundError:
        pass
    return rows


class MetricsLogger:
    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = True, plot: bool = True):
        self.dir = Path(out_dir)
        self.path = self.dir / "metrics.jsonl"
        self.enabled = dist.is_main()
        self.plot_enabled = plot
        self._tb = None
        self._file = None
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but don't die on a broken install
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Keep rows with step <= `step` (resume), rewriting the file atomically."""
        if not self.enabled:
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: v for k, v in values.items() if v is not None}}
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def plot(self, title: str = "", curve: Curve | None = None) -> Path | None:
        """Write the stage's curve (loss.png: train and val loss against tokens) atomically; None if nothing to plot."""
        if not (self.enabled and self.plot_enabled):
            return None
        if self._file is not None:
            self._file.flush()
        curve = curve or LOSS_CURVE
        return plot_loss_curve(read_metrics(self.path), self.dir / curve.file, title=title, curve=curve)


@dataclass(frozen=True)
class Curve:
    """What a stage's PNG shows: a train row key and an eval row key against tokens (an objective's `curve`)."""

    train: str = "loss"
    val: str = "val_loss"
    ylabel: str = "loss (nats/token)"
    file: str = "loss.png"


LOSS_CURVE = Curve()


def plot_loss_curve(rows: list[dict], out: str | os.PathLike, title: str = "", extra: dict | None = None,
                    curve: Curve = LOSS_CURVE) -> Path | None:
    """Train and val loss (or `curve`'s keys) against tokens seen. `extra`: {label: rows} of other runs to overlay."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"": rows, **(extra or {})}
    if not any(curve.train in r or curve.val in r for r in rows):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, rs in series.items():
        tr = [(r["tokens"], r[curve.train]) for r in rs if curve.train in r and "tokens" in r]
        va = [(r["tokens"], r[curve.val]) for r in rs if curve.val in r and "tokens" in r]
        sfx = f" ({label})" if label else ""
        if tr:
            ax.plot(*zip(*tr), lw=1, alpha=0.8, label=f"{'train' if curve.train == 'loss' else curve.train}{sfx}")
        if va:
            ax.plot(*zip(*va), "o-", ms=3, label=f"{'val' if curve.val == 'val_loss' else curve.val}{sfx}")
    ax.set_xlabel("tokens")
    ax.set_ylabel(curve.ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"
