"""Train a scaling ladder on RUN_DIR's prepared data, fit scaling laws, predict a bigger run and check it.

For each compute budget (FLOPs, counted as muse.model.flops does: 6N + 12 L d T per token) an IsoFLOP
set of models from the --depth rule, each an ordinary `muse train` run in RUN_DIR/ladder/<name>/ trained
to exactly its budget (its LR schedule scaled to its length). A killed ladder resumes where it stopped
and never retrains a finished run. Then: an IsoFLOP parabola per budget, power laws N_opt(C) and
D_opt(C), the parametric L(N, D) fit with bootstrap intervals, all in RUN_DIR/ladder/ladder.json, with
PNGs and report.md. --predict C gives the compute-optimal run at C with a 95% interval; --verify trains
it and reports predicted vs actual. See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """examples:
  muse prepare --out runs/lad
  muse ladder runs/lad --budgets 1e12,2e12,4e12 --sizes 1,2,3,4,5 --jobs 2 --verify   # ~1.6e13 checked
  muse ladder runs/lad --budgets 1e12,2e12,4e12 --predict 6.4e13                      # refit, predict only
  muse ladder runs/big --budgets 1e17,3e17,1e18 --seq-len 2048 --batch-size 32 --jobs 8 --verify  # 8 GPUs
  muse ladder runs/big --budgets 1e17,3e17,1e18 --seq-len 2048 --batch-size 32 --print-commands > jobs.txt
"""


def _floats(text: str) -> tuple[float, ...]:
    from muse.common.errors import UsageError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--budgets expects FLOP counts separated by commas (e.g. 1e12,2e12,4e12), got {text!r}") from None


def _sizes(text: str) -> tuple[int, ...] | None:
    from muse.common.errors import UsageError

    if text == "auto":
        return None
    try:
        sizes = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise UsageError(f"--sizes expects auto or depths separated by commas (e.g. 1,2,3,4), got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--sizes: depths must be positive integers, got {text!r}")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory holding data/ (from `muse prepare`)")
    p.add_argument("--budgets", required=True, help="compute budgets in FLOPs, comma-separated (e.g. 1e12,2e12,4e12)")
    p.add_argument("--sizes", default="auto",
                   help="depths to train at every budget (e.g. 1,2,3,4,5), or auto: per budget the --per-budget depths "
                        "nearest 20 tokens per parameter (default auto)")
    p.add_argument("--per-budget", type=int, default=5, help="--sizes auto: depths per budget (default 5)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence, every run (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step, every run (default 16)")
    p.add_argument("--min-steps", type=int, default=30,
                   help="runs with fewer optimizer steps are left out (default 30)")
    p.add_argument("--eval-batches", type=int, default=64, help="val batches for each run's final loss (default 64)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any `muse train` setting, the same for every run (repeatable)")
    p.add_argument("--momentum-warmup-frac", type=float, default=0.25,
                   help="Muon's momentum warmup as a fraction of each run's steps (default 0.25); 0 keeps "
                        "`muse train`'s fixed 300 steps, which short runs never finish")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each its own process (on a GPU node: one per device); default 1")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: cores // jobs)")
    p.add_argument("--predict", type=float, help="predict the compute-optimal run at this budget (FLOPs)")
    p.add_argument("--verify", action="store_true",
                   help="train the predicted run and compare (budget: --predict, default 4x the largest budget)")
    p.add_argument("--resamples", type=int, default=200, help="bootstrap refits for the intervals (default 200)")
    p.add_argument("--print-commands", action="store_true",
                   help="print the `muse train` command of every run still to train (one per line) and exit")
    p.add_argument("--force", action="store_true", help="retrain runs made with other settings")
    p.add_argument("--json", action="store_true", help="print ladder.json instead of the summary")


def run(args) -> int:
    import time

    from muse.common.errors import UsageError
    from muse.common.logging import get_logger
    from muse.common.paths import atomic_write_json
    from muse.scaling import analysis
    from muse.scaling.ladder import (
        MAX_DEPTH,
        LadderConfig,
        collect,
        execute,
        format_flops,
        make_spec,
        plan_ladder,
        read_data,
        shell_commands,
        train_seconds,
    )
    from muse.scaling.report import write_report

    t0 = time.perf_counter()
    log = get_logger("muse.scaling")
    run_dir = Path(args.run_dir)
    for name in ("per_budget", "seq_len", "batch_size", "min_steps", "eval_batches", "resamples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 <= args.momentum_warmup_frac <= 1.0:
        raise UsageError(f"--momentum-warmup-frac must be between 0 and 1, got {args.momentum_warmup_frac}")
    cfg = LadderConfig(budgets=_floats(args.budgets), sizes=_sizes(args.sizes), per_budget=args.per_budget,
                       seq_len=args.seq_len, batch_size=args.batch_size, min_steps=args.min_steps,
                       eval_batches=args.eval_batches, sets=tuple(args.set), device=args.device,
                       momentum_warmup_frac=args.momentum_warmup_frac)
    data = read_data(run_dir)
    specs = plan_ladder(run_dir, cfg)
    target = args.predict or (4 * max(cfg.budgets) if args.verify else None)
    if target is not None and target <= 0:
        raise UsageError(f"--predict must be a positive FLOP count, got {target}")

    if args.print_commands:
        lines = shell_commands(run_dir, cfg, specs, args.jobs, args.threads)
        if not lines and args.verify:  # the ladder is done: the verify run is the one left
            rows = collect(run_dir, specs, data.vocab_size)
            _, fits = analysis.fit_ladder(rows, resamples=args.resamples)
            pred = analysis.predict(fits, target, _candidates(cfg, data, target, make_spec, MAX_DEPTH))
            lines = shell_commands(run_dir, cfg, [make_spec(cfg, data, pred["depth"], target, verify=True)], 1, args.threads)
        print("\n".join(lines) if lines else "# every run is trained; run `muse ladder` again to fit")
        return 0

    done = execute(run_dir, cfg, specs, jobs=args.jobs, threads=args.threads, force=args.force)
    rows = collect(run_dir, specs, data.vocab_size)
    fits_json, fits = analysis.fit_ladder(rows, resamples=args.resamples)
    ladder = {
        "format": "muse.ladder/1",
        "data": {"train_tokens": data.train_tokens, "vocab_size": data.vocab_size, "fingerprint": data.fingerprint},
        "settings": {"budgets": sorted(cfg.budgets), "sizes": list(cfg.sizes) if cfg.sizes else "auto",
                     "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "min_steps": cfg.min_steps,
                     "eval_batches": cfg.eval_batches, "sets": list(cfg.sets),
                     "momentum_warmup_frac": cfg.momentum_warmup_frac,
                     "flop_count": "6N + 12 L d T per token (muse.model.flops.flops_per_token)"},
        "runs": rows, "fits": fits_json,
    }
    verify_spec = None
    if target is not None:
        ladder["prediction"] = pred = analysis.predict(fits, target, _candidates(cfg, data, target, make_spec, MAX_DEPTH))
        pred["recorded_at"] = _first_recorded(run_dir / "ladder" / "ladder.json", pred) or _now()
        if args.verify:
            # The prediction and its interval are on disk (and in the log) before the verify run trains a
            # step: a verify run is a test of a prediction made without it, and the file shows so.
            atomic_write_json(run_dir / "ladder" / "ladder.json", ladder)
            lo, hi = pred["interval"]
            log.info("ladder: predicted %s before training it: val loss %.4f (95%% %.4f-%.4f), recorded in %s",
                     pred["name"], pred["loss"], lo, hi, run_dir / "ladder" / "ladder.json")
            verify_spec = make_spec(cfg, data, pred["depth"], target, verify=True)
            execute(run_dir, cfg, [verify_spec], jobs=1, threads=args.threads, force=args.force)
            row = collect(run_dir, [verify_spec], data.vocab_size)[0]
            ladder["runs"].append(row)
            if row["status"] != "ok":
                raise UsageError(f"the verify run {verify_spec.name} did not finish: {row['status']}: {row.get('reason')}")
            ladder["verify"] = {**analysis.verdict(pred, row["val_loss"]),
                                "checked_at": _now()}
    atomic_write_json(run_dir / "ladder" / "ladder.json", ladder)
    wall = train_seconds(run_dir, specs + ([verify_spec] if verify_spec else []))
    report = write_report(run_dir / "ladder", ladder, fits, wall=wall)
    if args.json:
        print(json.dumps(ladder))
        return 0
    _summary(ladder, done, report, time.perf_counter() - t0, format_flops)
    return 0


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def _first_recorded(path: Path, pred: dict) -> str | None:
    """When `path` already holds this same prediction (a resumed verify run), the time it was first recorded."""
    try:
        old = json.loads(path.read_text()).get("prediction") or {}
    except (OSError, ValueError):
        return None
    same = {k: v for k, v in old.items() if k != "recorded_at"} == json.loads(json.dumps(pred))
    return old.get("recorded_at") if same else None


def _candidates(cfg, data, budget, make_spec, max_depth) -> list[dict]:
    return [make_spec(cfg, data, d, budget, verify=True).as_dict() for d in range(1, max_depth + 1)]


def _summary(ladder: dict, done, report: Path, wall_s: float, format_flops) -> None:
    p = ladder["fits"]["parametric"]
    ok = [r for r in ladder["runs"] if r["status"] == "ok" and not r["verify"]]
    print(f"ladder: {len(ok)} runs fitted ({len(done.trained)} trained now, {len(done.kept)} kept)"
          + (f"; diverged, excluded: {', '.join(done.diverged)}" if done.diverged else ""))
    for r in ladder["runs"]:
        if r["status"] in ("excluded", "diverged"):
            print(f"  {r['name']}: {r['status']}: {r['reason']}")
    cov = ladder["fits"]["coverage"]
    if cov["runs"]:
        print(f"backtests: {cov['runs']} held-out run(s) in {cov['folds']} fold(s), largest |error| {cov['max_abs_error']:.2%}; "
              f"inside the stated interval {cov['inside_stated']}, inside the bootstrap one {cov['inside_bootstrap']}")
    print(f"L(N, D) = {p['E']:.3f} + {p['A']:.4g}/N^{p['alpha']:.3f} + {p['B']:.4g}/D^{p['beta']:.3f} "
          f"(alpha 95% {p['intervals']['alpha'][0]:.3f}-{p['intervals']['alpha'][1]:.3f}, "
          f"beta 95% {p['intervals']['beta'][0]:.3f}-{p['intervals']['beta'][1]:.3f}, residual rms {p['residual_rms']:.2%})")
    for key, label in (("n_opt", "N_opt"), ("d_opt", "D_opt")):
        law = ladder["fits"][key]
        if law:
            lo, hi = law["exponent_interval"]
            print(f"{label}(C) = {law['k']:.3g} C^{law['exponent']:.3f} (95% {lo:.3f}-{hi:.3f})")
    pred = ladder.get("prediction")
    if pred:
        lo, hi = pred["interval"]
        print(f"predicted at C = {format_flops(pred['budget'])}: depth {pred['depth']} (N {pred['params']:,}, "
              f"D {pred['tokens']:,} tokens), val loss {pred['loss']:.4f} (95% {lo:.4f}-{hi:.4f})")
        for name, (plo, phi) in pred.get("interval_parts", {}).items():
            print(f"  interval part, {name}: {plo:.4f}-{phi:.4f}")
        if pred["note"]:
            print(f"  note: {pred['note']}")
    ver = ladder.get("verify")
    if ver:
        print(f"verified: actual {ver['actual']:.4f} vs predicted {ver['predicted']:.4f} ({ver['error']:+.2%}), "
              f"{'inside' if ver['inside_interval'] else 'OUTSIDE'} the 95% interval")
    print(f"report: {report} ({wall_s:.0f} s)")
    sys.stdout.flush()
