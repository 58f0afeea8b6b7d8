"""`muse ladder` end to end on a tiny made-up corpus: the plan, the runs (separate `muse train` processes),
resuming a killed ladder without retraining finished runs, `--jobs 2` == `--jobs 1`, and clear refusals.

Each ladder here is 6 runs of width-64..192 models for a handful of steps (vocab 320, 32-token sequences);
the processes are pinned to one torch thread so every run computes the same numbers however scheduled."""

import json
import shutil

import pytest

from conftest import make_corpus
from muse.scaling.ladder import (
    LadderConfig,
    _identity,
    _last_error,
    collect,
    plan_ladder,
    read_data,
    train_argv,
)

ARGS = ["--budgets", "3e9,6e9", "--sizes", "1,2,3", "--seq-len", "32", "--batch-size", "4", "--min-steps", "3",
        "--eval-batches", "4", "--resamples", "20", "--threads", "1"]
# Each ladder test starts 6-8 `muse train` processes (~3 s of CPU each); a loaded 2-core machine can starve
# them for minutes, beyond the suite's 300 s default.
pytestmark = pytest.mark.timeout(900)
CFG = LadderConfig(budgets=(3e9, 6e9), sizes=(1, 2, 3), seq_len=32, batch_size=4, min_steps=3, eval_batches=4)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run directory with data/ from a made-up corpus big enough for a few hundred steps (vocab 320)."""
    from muse.cli.main import main

    root = tmp_path_factory.mktemp("ladder")
    corpus = make_corpus(root / "corpus", n_docs=30, words_per_doc=1200)
    run = root / "run"
    assert main(["prepare", str(corpus), "--out", str(run), "--vocab-size", "320", "--val-fraction", "0.2"]) == 0
    return run


def _copy(prepared, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(prepared, dst, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """The ladder trained with --jobs 1: its run directory and ladder.json."""
    from muse.cli.main import main

    run = tmp_path_factory.mktemp("ref") / "run"
    shutil.copytree(prepared, run)
    assert main(["ladder", str(run), *ARGS, "--jobs", "1"]) == 0
    return run, json.loads((run / "ladder" / "ladder.json").read_text())


def test_plan_spends_each_budget_and_names_what_it_leaves_out(prepared):
    specs = plan_ladder(prepared, CFG)
    assert [s.name for s in specs] == ["3e9-d1", "3e9-d2", "3e9-d3", "6e9-d1", "6e9-d2", "6e9-d3"]
    for s in specs:
        assert s.steps * 4 * 32 == s.tokens and s.flops == pytest.approx(s.tokens * s.flops_per_token)
        assert abs(s.flops / s.budget - 1) <= 0.5 * 4 * 32 * s.flops_per_token / s.budget + 1e-12  # nearest step
        assert not s.excluded
    data = read_data(prepared)
    wide = LadderConfig(budgets=(3e9, 6e9, 8e10), sizes=(1, 2, 3, 4), seq_len=32, batch_size=4, min_steps=3, eval_batches=4)
    big = {s.name: s for s in plan_ladder(prepared, wide)}
    assert big["8e10-d1"].excluded.startswith("beyond one epoch") and big["8e10-d1"].tokens > data.train_tokens
    assert big["3e9-d4"].excluded.startswith("too short: 1 steps < --min-steps 3")
    assert not big["8e10-d3"].excluded and not big["8e10-d4"].excluded


def test_ladder_trains_fits_and_reports(reference):
    run, ladder = reference
    ok = [r for r in ladder["runs"] if r["status"] == "ok"]
    assert len(ok) == 6 and all(r["val_loss"] > 0 for r in ok)
    assert ladder["fits"]["parametric"]["runs"] == 6 and len(ladder["fits"]["isoflop"]) <= 2
    for r in ok:  # ordinary run directories: a `muse train` checkpoint at the planned last step
        assert (run / "ladder" / r["name"] / "base" / "latest").exists()
        cfg = json.loads((run / "ladder" / r["name"] / "base" / "train_config.json").read_text())
        assert cfg["total_steps"] == r["steps"] and cfg["model"]["n_layer"] == r["depth"]
        assert cfg["train"]["optim"]["momentum_warmup_steps"] == round(0.25 * r["steps"])
    # the loop used it: the d1 runs (50 and 100 steps) end at full momentum, where `muse train`'s fixed
    # 300-step warmup would have left them at 0.85 + 0.1 * 99 / 300 = 0.883 or less
    from muse.checkpoint import load_train_state

    for name in ("3e9-d1", "6e9-d1"):
        state = load_train_state(run / "ladder" / name / "base" / "latest")
        momenta = [g["momentum"] for o in state["optimizer"]["optimizers"] for g in o["param_groups"] if "momentum" in g]
        assert momenta and all(m == pytest.approx(0.95) for m in momenta), momenta
    for name in ("report.md", "isoflop.png", "envelope.png", "n_opt.png", "prediction.png"):
        assert (run / "ladder" / name).stat().st_size > 0
    assert "| 3e9-d1 |" in (run / "ladder" / "report.md").read_text()


def test_killed_ladder_resumes_without_retraining_finished_runs_and_jobs_2_gives_the_same_json(
        prepared, reference, tmp_path, muse, monkeypatch):
    """Both invocations run with --jobs 2 (two processes at once), so the final comparison with the --jobs 1
    reference checks both: a resumed ladder and a --jobs 2 ladder write the same ladder.json (one ladder of
    6 runs fewer than a separate --jobs 2 test)."""
    run = _copy(prepared, tmp_path, "killed")
    # The loop's fault hook stands in for a kill: every run with 40+ steps dies before step 40, after its
    # checkpoints (d1: 50 and 100 steps, saved every 13 and 25); the d2 and d3 runs (3-16 steps) finish.
    monkeypatch.setenv("MUSE_FAULT_AT_STEP", "40")
    code, out, err = muse("ladder", str(run), *ARGS, "--jobs", "2")
    assert code == 1 and "2 ladder run(s) failed" in err and "3e9-d1" in err and "rerun the same command" in err
    assert "Traceback" not in err
    finished = {n: sorted(p.name for p in (run / "ladder" / n / "base").glob("step_*"))
                for n in ("3e9-d2", "3e9-d3", "6e9-d2", "6e9-d3")}
    mtimes = {n: (run / "ladder" / n / "base" / "metrics.jsonl").stat().st_mtime_ns for n in finished}
    monkeypatch.delenv("MUSE_FAULT_AT_STEP")
    code, out, err = muse("ladder", str(run), *ARGS, "--jobs", "2")
    assert code == 0, err
    assert "(2 trained now, 4 kept)" in out
    for n, steps in finished.items():  # untouched: no new checkpoint, no new metrics row
        assert sorted(p.name for p in (run / "ladder" / n / "base").glob("step_*")) == steps
        assert (run / "ladder" / n / "base" / "metrics.jsonl").stat().st_mtime_ns == mtimes[n]
    for n in ("3e9-d1", "6e9-d1"):
        assert "resumed from" in (run / "ladder" / n / "train.log").read_text()
    assert json.loads((run / "ladder" / "ladder.json").read_text()) == reference[1]  # resumed exactly, --jobs 2 == 1


def test_print_commands_lists_the_runs_left(prepared, reference, tmp_path, muse):
    run = _copy(prepared, tmp_path, "cmds")
    code, out, err = muse("ladder", str(run), *ARGS, "--jobs", "2", "--print-commands")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 6 and all(ln.startswith("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 muse train ") for ln in lines)
    assert "--max-steps" in lines[0] and (run / "ladder" / "3e9-d1" / "data" / "meta.json").exists()
    code, out, err = muse("ladder", str(reference[0]), *ARGS, "--print-commands")
    assert code == 0 and out.startswith("# every run is trained")


def test_momentum_warmup_is_a_fraction_of_each_run_and_part_of_its_identity(prepared):
    from muse.common.errors import ConfigError
    from muse.train.optim import OptimConfig
    from muse.train.schedule import muon_momentum

    # `muse train`'s default is the recipe's fixed 300 steps, so every run outside a ladder is unchanged
    assert OptimConfig().momentum_warmup_steps == 300
    assert all(muon_momentum(s, warmup_steps=OptimConfig().momentum_warmup_steps) == muon_momentum(s) for s in range(400))
    with pytest.raises(ConfigError, match="momentum_warmup_steps must be >= 0"):
        OptimConfig(momentum_warmup_steps=-1)
    spec = plan_ladder(prepared, CFG)[0]
    argv = train_argv(prepared, CFG, spec, resume=False)
    assert argv[argv.index(f"optim.momentum_warmup_steps={round(0.25 * spec.steps)}") - 1] == "--set"
    assert _identity(CFG, spec)["momentum_warmup_steps"] == round(0.25 * spec.steps)
    fixed = LadderConfig(**{**CFG.__dict__, "momentum_warmup_frac": 0.0})  # `muse train`'s own 300 steps
    assert not any("momentum_warmup" in a for a in train_argv(prepared, fixed, spec, resume=False))
    assert "momentum_warmup_steps" not in _identity(fixed, spec)  # a directory from before the option reads the same
    mine = LadderConfig(**{**CFG.__dict__, "sets": ("optim.momentum_warmup_steps=7",)})
    argv = train_argv(prepared, mine, spec, resume=False)  # a user's --set comes after the ladder's: it wins
    assert argv.index("optim.momentum_warmup_steps=7") > argv.index(f"optim.momentum_warmup_steps={round(0.25 * spec.steps)}")


def test_bad_ladders_are_refused_with_what_is_needed(prepared, tmp_path, muse):
    run = _copy(prepared, tmp_path, "bad")
    code, _, err = muse("ladder", str(run), "--budgets", "1e8,3e9", *ARGS[2:])
    assert code == 2 and "budget 1e8 is too small for the smallest model (depth 1)" in err and "needs at least" in err
    code, _, err = muse("ladder", str(run), "--budgets", "3e9,6e9", "--sizes", "1,2", *ARGS[4:])
    assert code == 2 and "2 usable size(s)" in err and "needs at least 3" in err
    code, _, err = muse("ladder", str(run), "--budgets", "6e9", *ARGS[2:])
    assert code == 2 and "at least 2 compute budgets" in err
    code, _, err = muse("ladder", str(run), "--budgets", "a,b", *ARGS[2:])
    assert code == 2 and "--budgets expects" in err
    code, _, err = muse("ladder", str(tmp_path / "nowhere"), *ARGS)
    assert code == 2 and "muse prepare" in err
    code, _, err = muse("ladder", str(run), *ARGS, "--momentum-warmup-frac", "2")
    assert code == 2 and "--momentum-warmup-frac must be between 0 and 1" in err
    # a run directory made with other settings is not silently reused
    (run / "ladder" / "3e9-d1").mkdir(parents=True)
    (run / "ladder" / "3e9-d1" / "ladder_run.json").write_text(json.dumps({"depth": 1, "steps": 1}))
    code, _, err = muse("ladder", str(run), *ARGS)
    assert code == 2 and "was trained with other settings" in err and "--force" in err


def test_a_diverged_run_is_excluded_and_named(prepared, tmp_path):
    run = _copy(prepared, tmp_path, "div")
    log = tmp_path / "train.log"
    log.write_text("step 3 ...\nmuse train: error: loss became nan at step 3; stopped without saving\n")
    assert _last_error(log) == "loss became nan at step 3; stopped without saving"
    specs = plan_ladder(run, CFG)
    (run / "ladder" / specs[0].name).mkdir(parents=True)
    (run / "ladder" / specs[0].name / "diverged.txt").write_text("loss became nan at step 3\n")
    rows = collect(run, specs, 320)
    assert rows[0]["status"] == "diverged" and "loss became nan" in rows[0]["reason"]
    assert all(r["status"] == "missing" for r in rows[1:])


def test_verify_prediction_is_on_disk_before_the_verify_run_trains(reference, tmp_path, muse, monkeypatch):
    # Only the verify run trains here (the ladder's runs are kept), and the fault hook kills it before its
    # first step: ladder.json must already hold the prediction with its interval, and no verdict.
    run = tmp_path / "verify"
    shutil.copytree(reference[0], run, symlinks=True)
    monkeypatch.setenv("MUSE_FAULT_AT_STEP", "1")
    # --predict 9e9 (1.5x the largest budget, not the default 4x): a verify run of ~150 steps, not ~400
    code, out, err = muse("ladder", str(run), *ARGS, "--predict", "9e9", "--verify")
    assert code == 1 and "1 ladder run(s) failed" in err and "verify-9e9-d" in err
    assert "before training it" in err
    before = json.loads((run / "ladder" / "ladder.json").read_text())
    pred = before["prediction"]
    assert "verify" not in before and not any(r["verify"] for r in before["runs"])
    assert pred["budget"] == 9e9 and pred["name"].startswith("verify-9e9-d") and pred["recorded_at"]
    lo, hi = pred["interval"]
    assert lo <= pred["loss"] <= hi
    monkeypatch.delenv("MUSE_FAULT_AT_STEP")
    code, out, err = muse("ladder", str(run), *ARGS, "--predict", "9e9", "--verify")
    assert code == 0, err
    after = json.loads((run / "ladder" / "ladder.json").read_text())
    assert after["prediction"] == pred  # the prediction the verify run is checked against, first recorded_at kept
    assert after["verify"]["predicted"] == pred["loss"] and after["verify"]["checked_at"] >= pred["recorded_at"]
    verify_row = [r for r in after["runs"] if r["verify"]]
    assert len(verify_row) == 1 and verify_row[0]["name"] == pred["name"] and verify_row[0]["status"] == "ok"
    assert after["verify"]["actual"] == verify_row[0]["val_loss"]
    assert after["verify"]["inside_interval"] == (lo <= verify_row[0]["val_loss"] <= hi)
