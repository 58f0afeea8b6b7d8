"""A scaling ladder: plan IsoFLOP sets of ordinary training runs, run them (resumably, N at once), read them back.

`plan_ladder(run_dir, LadderConfig)` turns compute budgets (FLOPs) and model depths into `RunSpec`s: for
each budget and depth, the `muse train` run that spends exactly that budget, C = steps x tokens/step x
flops_per_token, with the project's own FLOP count per token (muse.model.flops: 6N + 12 L d T) and the
model the `--depth` rule derives. The steps round to the nearest whole step; the FLOPs actually spent
are what every fit uses. Each run is `RUN/ladder/<name>/`, a normal run directory whose data/ is a link
to RUN/data, trained by a separate `python -m muse train` process: the one training loop, its LR
schedule scaled to the run's length (the schedule is a function of step / max_steps), the learning
rates the depth rule derives, eval and checkpoints as usual.

`execute(...)` runs the specs not yet finished, `jobs` at a time, each with its own torch thread count
(cores // jobs) and, on a GPU node, its own device. A finished run (a verified checkpoint at its last
step) is never retrained; a partial one resumes (`--resume`, exact on CPU); a diverged one is recorded
(diverged.txt) and excluded. `collect(...)` reads the results back from the run directories alone, so
a killed and resumed ladder, or one trained by a cluster scheduler from `--print-commands`, reads the
same. Runs beyond one epoch of the train split and runs too short for `min_steps` are left out at plan
time and named.

What it does not know: the fits (muse.scaling.fit, muse.scaling.analysis) or the plots (report).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from muse.common.errors import DataError, MuseError, UsageError
from muse.common.logging import get_logger
from muse.common.paths import atomic_write_json, atomic_write_text
from muse.model.flops import count_params, flops_per_token

log = get_logger("muse.scaling")

MAX_DEPTH = 32  # depths considered by --sizes auto and by the prediction
MIN_SIZES = 3  # a parabola in log N needs three points


class LadderRunFailed(MuseError):
    """A ladder run stopped for a reason other than divergence (a crash, a kill, a full disk)."""

    exit_code = 1


@dataclass
class LadderConfig:
    budgets: tuple[float, ...]
    sizes: tuple[int, ...] | None = None  # depths; None = auto (per budget, around 20 tokens per parameter)
    per_budget: int = 5  # auto: sizes per budget
    seq_len: int = 64
    batch_size: int = 16
    min_steps: int = 30  # fewer optimizer steps than this is not a run a schedule can be scaled to
    eval_batches: int = 64
    sets: tuple[str, ...] = ()  # any `muse train --set KEY=VALUE`, the same for every run
    device: str = "auto"
    # Muon's momentum warmup (0.85 -> 0.95) as a fraction of each run's steps, like its LR schedule; 0 keeps
    # `muse train`'s fixed 300 steps, which runs shorter than 300 steps never finish (docs/scaling.md).
    momentum_warmup_frac: float = 0.25

    def momentum_warmup_steps(self, steps: int) -> int | None:
        """The run's optim.momentum_warmup_steps, or None to leave `muse train`'s default."""
        return round(self.momentum_warmup_frac * steps) if self.momentum_warmup_frac > 0 else None

    def train_flags(self) -> dict:
        return {"seq_len": self.seq_len, "batch_size": self.batch_size, "eval_batches": self.eval_batches}


@dataclass
class RunSpec:
    name: str
    depth: int
    budget: float  # the FLOPs asked for
    steps: int
    tokens: int  # D: tokens trained
    flops: float  # C actually spent: tokens * flops_per_token
    params: int  # N: parameters that cost FLOPs per token (muse.model.flops, non_embedding=True)
    params_total: int
    flops_per_token: float
    d_model: int
    verify: bool = False
    excluded: str = ""  # why the plan leaves it out ("" = trained)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Data:
    vocab_size: int
    train_tokens: int
    fingerprint: str


def read_data(run_dir: Path) -> Data:
    meta_file = run_dir / "data" / "meta.json"
    if not meta_file.exists():
        raise DataError(f"no prepared data in {run_dir / 'data'}; run `muse prepare --out {run_dir}` first")
    meta = json.loads(meta_file.read_text())
    return Data(vocab_size=int(meta["vocab_size"]), train_tokens=int(meta["splits"]["train"]["tokens"]),
                fingerprint=str(meta.get("fingerprint", "")))


def format_flops(c: float) -> str:
    """1e12 -> '1e12', 2.5e11 -> '2.5e11' (run names and tables)."""
    text = f"{c:.3g}"
    return text.replace("e+0", "e").replace("e+", "e")


def _train_config(cfg: LadderConfig, depth: int):
    from muse.train.config import load_config

    return load_config(None, {"depth": depth, **cfg.train_flags(), "max_steps": 1}, list(cfg.sets))


def make_spec(cfg: LadderConfig, data: Data, depth: int, budget: float, *, verify: bool = False) -> RunSpec:
    """The run of `depth` that spends `budget` FLOPs (to the nearest whole step)."""
    from muse.train.config import model_config

    tcfg = _train_config(cfg, depth)
    mcfg = model_config(tcfg, data.vocab_size)
    fpt = flops_per_token(mcfg, cfg.seq_len)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    steps = round(budget / (fpt * tokens_per_step))
    tokens = steps * tokens_per_step
    name = f"{'verify-' if verify else ''}{format_flops(budget)}-d{depth}"
    spec = RunSpec(name=name, depth=depth, budget=float(budget), steps=steps, tokens=tokens, flops=tokens * fpt,
                   params=count_params(mcfg, non_embedding=True), params_total=count_params(mcfg),
                   flops_per_token=fpt, d_model=mcfg.d_model, verify=verify)
    if steps < cfg.min_steps:
        spec.excluded = f"too short: {steps} steps < --min-steps {cfg.min_steps}"
    elif tokens > data.train_tokens:
        spec.excluded = f"beyond one epoch: {tokens:,} tokens > {data.train_tokens:,} train tokens"
    return spec


def min_budget(cfg: LadderConfig, data: Data, depth: int) -> float:
    """The smallest budget that gives `depth` min_steps steps."""
    spec = make_spec(cfg, data, depth, 1.0)
    return cfg.min_steps * cfg.batch_size * cfg.seq_len * spec.flops_per_token


def _auto_depths(cfg: LadderConfig, data: Data, budget: float) -> list[int]:
    """The `per_budget` usable depths nearest (in log N) to Chinchilla's 20 tokens per parameter."""
    usable = [s for s in (make_spec(cfg, data, d, budget) for d in range(1, MAX_DEPTH + 1)) if not s.excluded]
    target = math.sqrt(budget / 120.0)  # C = 6 N D, D = 20 N
    usable.sort(key=lambda s: abs(math.log(s.params / target)))
    return sorted(s.depth for s in usable[: cfg.per_budget])


def plan_ladder(run_dir: str | Path, cfg: LadderConfig) -> list[RunSpec]:
    """Every run of the ladder (the excluded ones too, with their reason); refuses a ladder that cannot be fitted."""
    run_dir = Path(run_dir)
    data = read_data(run_dir)
    budgets = sorted(set(float(b) for b in cfg.budgets))
    if len(budgets) < 2:
        raise UsageError(f"a ladder needs at least 2 compute budgets for the power laws (3 or more to check them), "
                         f"got {len(budgets)}: e.g. --budgets 1e12,2e12,4e12")
    if any(not math.isfinite(b) or b <= 0 for b in budgets):
        raise UsageError("--budgets must be positive FLOP counts, e.g. 1e12,2e12,4e12")
    specs: list[RunSpec] = []
    for budget in budgets:
        depths = list(cfg.sizes) if cfg.sizes else _auto_depths(cfg, data, budget)
        if cfg.sizes:
            smallest = min(cfg.sizes)
            need = min_budget(cfg, data, smallest)
            if budget < need:
                raise UsageError(f"budget {format_flops(budget)} is too small for the smallest model (depth {smallest}): "
                                 f"it needs at least {format_flops(need)} FLOPs for --min-steps {cfg.min_steps} "
                                 f"steps of {cfg.batch_size}x{cfg.seq_len} tokens")
        elif not depths:
            raise UsageError(f"budget {format_flops(budget)} is too small for the smallest model (depth 1): it needs "
                             f"at least {format_flops(min_budget(cfg, data, 1))} FLOPs for --min-steps {cfg.min_steps}")
        mine = [make_spec(cfg, data, d, budget) for d in depths]
        usable = [s for s in mine if not s.excluded]
        if len(usable) < MIN_SIZES:
            why = "; ".join(f"depth {s.depth}: {s.excluded}" for s in mine if s.excluded)
            raise UsageError(
                f"budget {format_flops(budget)} has {len(usable)} usable size(s) "
                f"({', '.join(f'depth {s.depth}' for s in usable) or 'none'}); an IsoFLOP fit needs at least "
                f"{MIN_SIZES}" + (f" ({why})" if why else "") + ". Give more --sizes, or a budget between "
                f"{format_flops(min_budget(cfg, data, max(depths)))} and one epoch of the smallest size")
        specs += mine
    return specs


# ---------------------------------------------------------------- run directories and their state

def run_path(run_dir: Path, spec: RunSpec) -> Path:
    return run_dir / "ladder" / spec.name


def _identity(cfg: LadderConfig, spec: RunSpec) -> dict:
    """What makes a run this run: a directory made with anything else is not reused."""
    ident = {"depth": spec.depth, "steps": spec.steps, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
             "eval_batches": cfg.eval_batches, "sets": list(cfg.sets)}
    warmup = cfg.momentum_warmup_steps(spec.steps)
    if warmup is not None:  # absent when 0: directories made before the option read the same
        ident["momentum_warmup_steps"] = warmup
    return ident


def prepare_run_dir(run_dir: Path, cfg: LadderConfig, spec: RunSpec, *, force: bool = False) -> Path:
    """RUN/ladder/<name>/ with data -> ../../data and ladder_run.json; refuses one made with other settings."""
    path = run_path(run_dir, spec)
    ident_file = path / "ladder_run.json"
    if ident_file.exists():
        old = json.loads(ident_file.read_text())
        if old != _identity(cfg, spec):
            if not force:
                raise UsageError(f"{path} was trained with other settings ({_diff(old, _identity(cfg, spec))}); "
                                 "pass --force to retrain it, or use another run directory")
            shutil.rmtree(path)
    elif force and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    link = path / "data"
    if not link.exists():
        os.symlink(os.path.join("..", "..", "data"), link)  # relative: the run directory can move
    atomic_write_json(ident_file, _identity(cfg, spec))
    return path


def _diff(old: dict, new: dict) -> str:
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def run_state(run_dir: Path, spec: RunSpec) -> tuple[str, int]:
    """('done' | 'partial' | 'diverged' | 'new', last saved step)."""
    from muse.checkpoint import latest_good, load_train_state

    path = run_path(run_dir, spec)
    if (path / "diverged.txt").exists():
        return "diverged", 0
    base = path / "base"
    ckpt = latest_good(base) if base.exists() else None
    if ckpt is None:
        return "new", 0
    step = int(load_train_state(ckpt, verify=False)["step"])
    return ("done" if step >= spec.steps else "partial"), step


def train_argv(run_dir: Path, cfg: LadderConfig, spec: RunSpec, *, resume: bool) -> list[str]:
    """`muse train` arguments of one run (after `muse`)."""
    argv = ["train", str(run_path(run_dir, spec)), "--depth", str(spec.depth), "--seq-len", str(cfg.seq_len),
            "--batch-size", str(cfg.batch_size), "--max-steps", str(spec.steps), "--eval-every", "0",
            "--save-every", str(max(1, math.ceil(spec.steps / 4))), "--device", cfg.device,
            "--set", f"eval_batches={cfg.eval_batches}", "--set", "tensorboard=false"]
    warmup = cfg.momentum_warmup_steps(spec.steps)
    if warmup is not None:
        argv += ["--set", f"optim.momentum_warmup_steps={warmup}"]
    for s in cfg.sets:  # after the ladder's own: a user's --set wins
        argv += ["--set", s]
    return argv + (["--resume"] if resume else [])


def threads_per_run(jobs: int, threads: int = 0) -> int:
    return threads or max(1, (os.cpu_count() or 1) // jobs)


def _gpu_count(device: str) -> int:
    if device not in ("auto", "cuda"):
        return 0
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA is simply no GPUs
        return 0


def run_env(slot: int, threads: int, gpus: int) -> dict[str, str]:
    """The environment a run gets: its thread count, and on a GPU node its own device."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "MUSE_NO_PROGRESS": "1"}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def shell_commands(run_dir: Path, cfg: LadderConfig, specs: list[RunSpec], jobs: int, threads: int = 0) -> list[str]:
    """One shell line per run still to train, for a user's own scheduler (one line = one job)."""
    import shlex

    lines = []
    pending = [s for s in specs if not s.excluded and run_state(run_dir, s)[0] in ("new", "partial")]
    for i, spec in enumerate(pending):
        prepare_run_dir(run_dir, cfg, spec)
        state = run_state(run_dir, spec)[0]
        env = run_env(i, threads_per_run(jobs, threads), 0)
        env.pop("MUSE_NO_PROGRESS")
        argv = train_argv(run_dir, cfg, spec, resume=state == "partial")
        lines.append(" ".join(f"{k}={v}" for k, v in env.items()) + " muse " + " ".join(shlex.quote(a) for a in argv))
    return lines


@dataclass
class Outcome:
    trained: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def execute(run_dir: str | Path, cfg: LadderConfig, specs: list[RunSpec], *, jobs: int = 1, threads: int = 0,
            force: bool = False) -> Outcome:
    """Train every planned run not yet finished, `jobs` processes at a time (largest first, so the last
    to start are short). Raises LadderRunFailed, naming the runs and their logs, if a run crashed."""
    run_dir = Path(run_dir)
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    out = Outcome()
    pending = []
    for spec in specs:
        if spec.excluded:
            continue
        prepare_run_dir(run_dir, cfg, spec, force=force)
        state, step = run_state(run_dir, spec)
        if state == "done":
            out.kept.append(spec.name)
        elif state == "diverged":
            out.diverged.append(spec.name)
        else:
            pending.append((spec, state == "partial"))
    pending.sort(key=lambda p: -p[0].flops)
    n_threads, gpus = threads_per_run(jobs, threads), _gpu_count(cfg.device)
    running: dict[int, tuple[subprocess.Popen, RunSpec, object]] = {}
    failures = []
    t0 = time.perf_counter()
    slots = list(range(jobs))
    try:
        while pending or running:
            while pending and slots:
                spec, resume = pending.pop(0)
                slot = slots.pop(0)
                logf = open(run_path(run_dir, spec) / "train.log", "ab")
                argv = [sys.executable, "-m", "muse", *train_argv(run_dir, cfg, spec, resume=resume)]
                log.info("ladder: %s %s (depth %d, %d steps, %s FLOPs)", "resuming" if resume else "training",
                         spec.name, spec.depth, spec.steps, format_flops(spec.flops))
                proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                        env={**os.environ, **run_env(slot, n_threads, gpus)})
                running[slot] = (proc, spec, logf)
            finished = [s for s, (p, _, _) in running.items() if p.poll() is not None]
            if not finished:
                time.sleep(0.2)
                continue
            for slot in finished:
                proc, spec, logf = running.pop(slot)
                logf.close()
                slots.append(slot)
                if proc.returncode == 0:
                    out.trained.append(spec.name)
                    continue
                last = _last_error(run_path(run_dir, spec) / "train.log")
                if "loss became" in last:  # TrainingDiverged: the same run would diverge again
                    atomic_write_text(run_path(run_dir, spec) / "diverged.txt", last + "\n")
                    out.diverged.append(spec.name)
                    log.warning("ladder: %s diverged (%s); excluded from the fits", spec.name, last)
                else:
                    failures.append(f"{spec.name}: {last or f'exit code {proc.returncode}'}")
    finally:
        for proc, _, logf in running.values():  # interrupted: stop our children, they resume next time
            proc.terminate()
            proc.wait()
            logf.close()
    out.wall_s = time.perf_counter() - t0
    if failures:
        raise LadderRunFailed(f"{len(failures)} ladder run(s) failed: " + "; ".join(failures)
                              + f" (logs: {run_dir / 'ladder'}/<name>/train.log); rerun the same command to resume")
    return out


def _last_error(log_file: Path) -> str:
    """The one-line error `muse train` printed last (``muse train: error: ...``), or the last line."""
    try:
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if ln.startswith("muse train: error:"):
            return ln.removeprefix("muse train: error:").strip()
    return lines[-1] if lines else ""


def collect(run_dir: str | Path, specs: list[RunSpec], vocab_size: int) -> list[dict]:
    """Each spec with its result, read from its run directory: status 'ok' (val_loss, val_bpb), 'diverged'
    (named, excluded), 'excluded' (the plan's reason) or 'missing' (not trained yet)."""
    from muse.train.metrics import read_metrics

    run_dir = Path(run_dir)
    rows = []
    for spec in specs:
        row = spec.as_dict()
        if spec.excluded:
            rows.append({**row, "status": "excluded", "reason": spec.excluded})
            continue
        state, _ = run_state(run_dir, spec)
        path = run_path(run_dir, spec)
        if state == "diverged":
            rows.append({**row, "status": "diverged", "reason": (path / "diverged.txt").read_text().strip()})
            continue
        if state != "done":
            rows.append({**row, "status": "missing", "reason": f"not trained yet ({state})"})
            continue
        evals = [r for r in read_metrics(path / "base" / "metrics.jsonl") if "val_loss" in r and r["step"] == spec.steps]
        if not evals:
            rows.append({**row, "status": "missing", "reason": "no val loss at the last step in metrics.jsonl"})
            continue
        val = evals[-1]
        loss = float(val["val_loss"])
        if not math.isfinite(loss) or loss > math.log(vocab_size):
            rows.append({**row, "status": "diverged", "val_loss": loss,
                         "reason": f"val loss {loss:.4g} is no better than uniform guessing ({math.log(vocab_size):.3f})"})
            continue
        rows.append({**row, "status": "ok", "val_loss": loss, "val_bpb": float(val["val_bpb"])})
    return rows


def train_seconds(run_dir: str | Path, specs: list[RunSpec]) -> dict[str, float]:
    """Each finished run's wall time inside `muse train` (all its resumes), for the report."""
    from muse.checkpoint import latest_good, load_train_state

    out = {}
    for spec in specs:
        base = run_path(Path(run_dir), spec) / "base"
        ckpt = latest_good(base) if base.exists() and not spec.excluded else None
        if ckpt is not None:
            out[spec.name] = float(load_train_state(ckpt, verify=False).get("elapsed_s", 0.0))
    return out
