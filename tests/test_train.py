"""The trainer end to end on a tiny model: exact resume after SIGKILL, a golden loss curve, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from muse.cli.main import main
from muse.train.metrics import read_metrics

GOLDEN = Path(__file__).parent / "assets" / "golden_loss_30.json"
TINY = ["--depth", "2", "--seq-len", "32", "--batch-size", "4", "--set", "model.d_model=64",
        "--set", "model.n_head=2", "--set", "model.n_kv_head=1", "--set", "log_every=1",
        "--eval-every", "10", "--set", "eval_batches=2", "--device", "cpu",
        "--dtype", "float32"]  # pinned: `auto` is bf16 autocast on CPUs with native bf16 matmul


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "base" / "metrics.jsonl") if "loss" in r}


def _train_cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "muse", "train", str(run), *TINY, *extra]


def _env():
    env = dict(os.environ, MUSE_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    env.pop("MUSE_PROGRESS", None)
    return env


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_after_sigkill_is_bit_identical(tiny_run, tmp_path, dtype):
    """Killed mid-run and resumed, the loss curve is the uninterrupted one to the bit, in fp32 and under
    bf16 autocast (fp32 master weights and optimizer state in the checkpoint; autocast keeps nothing)."""
    import shutil

    ref = tmp_path / "ref"
    shutil.copytree(tiny_run, ref)
    steps = ["--max-steps", "40", "--save-every", "5", "--dtype", dtype]
    subprocess.run(_train_cmd(ref, *steps), check=True, env=_env(), capture_output=True)
    expected = _losses(ref)
    assert sorted(expected) == list(range(1, 41))

    proc = subprocess.Popen(_train_cmd(tiny_run, *steps), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if max(_losses(tiny_run), default=0) >= 17:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "training finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = max(_losses(tiny_run))
    assert 17 <= killed_at < 40
    res = subprocess.run(_train_cmd(tiny_run, *steps, "--resume"), env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = _losses(tiny_run)
    assert sorted(got) == list(range(1, 41))  # rows after the checkpoint were rewritten, none duplicated
    resumed_from = 15 if killed_at < 20 else (killed_at // 5) * 5
    for step in range(resumed_from + 1, 41):
        assert got[step] == expected[step], f"step {step}: {got[step]!r} != {expected[step]!r}"
    val_ref = [r["val_loss"] for r in read_metrics(ref / "base" / "metrics.jsonl") if "val_loss" in r]
    val_got = [r["val_loss"] for r in read_metrics(tiny_run / "base" / "metrics.jsonl") if "val_loss" in r]
    assert val_got == val_ref
    written = json.loads((tiny_run / "base" / "train_config.json").read_text())["dtype"]
    assert written.startswith(f"{dtype} autocast (--dtype {dtype}" if dtype == "bfloat16" else "float32 (--dtype float32)")


def test_golden_loss_curve(tiny_run):
    """30 steps of a tiny config against the committed curve (MUSE_UPDATE_GOLDEN=1 rewrites it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the committed curve was made with one thread; restore after
    try:
        # fp32 Newton-Schulz: "auto" picks bf16 on CPUs with native bf16 matmul, and the curve must not
        # depend on which CPU runs the test.
        assert main(["train", str(tiny_run), *TINY, "--max-steps", "30", "--save-every", "0",
                     "--set", 'optim.ns_dtype="float32"']) == 0
    finally:
        torch.set_num_threads(threads)
    losses = [v for _, v in sorted(_losses(tiny_run).items())]
    assert len(losses) == 30
    if os.environ.get("MUSE_UPDATE_GOLDEN") or not GOLDEN.exists():
        GOLDEN.write_text(json.dumps({"args": TINY, "losses": losses}, indent=1) + "\n")
        if not os.environ.get("MUSE_UPDATE_GOLDEN"):
            pytest.fail(f"wrote {GOLDEN}; commit it and rerun")
    golden = json.loads(GOLDEN.read_text())["losses"]
    # fp32 on CPU: BLAS builds may reorder sums, so allow a small relative drift; a real change moves far more.
    assert losses == pytest.approx(golden, rel=2e-4, abs=1e-4)
    assert losses[-1] < losses[0] - 0.5  # it learns


def test_metrics_plot_and_config_written(tiny_run, capsys):
    assert main(["train", str(tiny_run), *TINY, "--max-steps", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    base = tiny_run / "base"
    assert out["steps"] == 10 and out["val_bpb"] > 0
    assert (base / "loss.png").stat().st_size > 1000
    assert (base / "latest").resolve().name == "step_000010"
    cfg = json.loads((base / "train_config.json").read_text())
    assert cfg["model"]["d_model"] == 64 and cfg["train"]["depth"] == 2
    assert list((base / "tensorboard").glob("events.out.tfevents.*"))
    rows = read_metrics(base / "metrics.jsonl")
    assert {"step", "loss", "lr", "tokens", "tokens_per_s", "flops_per_s"} <= set(rows[0])


def test_compile_switch_parses_and_survives_the_worker_command_line():
    import argparse

    from muse.cli import train as train_cli
    from muse.distributed.launch import rebuild_argv
    from muse.train.config import load_config

    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    for argv, want in ((["r"], None), (["r", "--compile"], True), (["r", "--no-compile"], False)):
        args = p.parse_args(argv)
        assert args.compile is want and p.parse_args(rebuild_argv(train_cli.add_arguments, args)) == args
    assert load_config(None, {}, ["parallel.compile=true"]).parallel.compile is True
    assert load_config(None, {"parallel.compile": False}, ["parallel.compile=true"]).parallel.compile is True  # --set last


@pytest.mark.slow  # ~10 s with inductor's on-disk cache warm, ~50 s cold on a loaded 2-core machine
def test_compiled_training_matches_eager(tiny_run):
    """--compile trains to the same losses (inductor reorders fp32 sums: close, not bit-equal) and
    writes checkpoints with the plain parameter names (no `_orig_mod.`)."""
    args = ["train", str(tiny_run), *TINY, "--set", "model.n_layer=1", "--max-steps", "3", "--set", "eval_batches=1"]
    assert main(args) == 0
    eager = _losses(tiny_run)
    assert main([*args, "--compile", "--force"]) == 0
    assert json.loads((tiny_run / "base" / "train_config.json").read_text())["train"]["parallel"]["compile"] is True
    compiled = _losses(tiny_run)
    assert compiled.keys() == eager.keys()
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), step
    assert main(["sample", str(tiny_run), "--prompt", "KING:", "--max-tokens", "2"]) == 0


def _one_line_error(capsys, code: int, *needles: str):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("muse ")]
    assert lines, err
    for n in needles:
        assert n in err, err
    return err


def test_unknown_config_key_names_closest(tiny_run, capsys):
    code = main(["train", str(tiny_run), *TINY, "--set", "optim.matrx_lr=0.1"])
    _one_line_error(capsys, code, "matrix_lr")
    code = main(["train", str(tiny_run), *TINY, "--set", "seq_lenn=8"])
    _one_line_error(capsys, code, "seq_len")


def test_loss_chunk_is_set_on_the_model_and_checked(tiny_run, capsys, monkeypatch):
    """`loss_chunk` reaches the model (the chunked cross-entropy; 0 = the plain loss); a negative one is
    a one-line error."""
    from muse.train import loop as loop_mod

    seen = []
    step = loop_mod.TrainLoop._train_step
    monkeypatch.setattr(loop_mod.TrainLoop, "_train_step", lambda self, i: seen.append(self.plain.loss_chunk) or step(self, i))
    for chunk in ("0", "48"):
        assert main(["train", str(tiny_run), *TINY, "--max-steps", "1", "--force", "--set", f"loss_chunk={chunk}"]) == 0
    assert seen == [0, 48]
    capsys.readouterr()
    code = main(["train", str(tiny_run), *TINY, "--max-steps", "1", "--force", "--set", "loss_chunk=-1"])
    _one_line_error(capsys, code, "loss_chunk")


def test_run_dir_without_data(tmp_path, capsys):
    code = main(["train", str(tmp_path / "nothing"), *TINY])
    _one_line_error(capsys, code, "muse prepare")


def test_seq_len_beyond_model(tiny_run, capsys):
    code = main(["train", str(tiny_run), *TINY, "--set", "model.max_seq_len=16"])
    _one_line_error(capsys, code, "max_seq_len")


def test_out_of_memory_names_the_knob(tiny_run, capsys, monkeypatch):
    from muse.train import loop as loop_mod

    def boom(self, step):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1000000000000 bytes")

    monkeypatch.setattr(loop_mod.TrainLoop, "_train_step", boom)
    code = main(["train", str(tiny_run), *TINY, "--max-steps", "5"])
    _one_line_error(capsys, code, "--batch-size")


def test_nan_loss_stops_and_keeps_last_good(tiny_run, capsys, monkeypatch):
    from muse.train import loop as loop_mod

    real = loop_mod.TrainLoop._train_step

    def flaky(self, step):
        loss = real(self, step)
        return loss * float("nan") if step >= 7 else loss

    monkeypatch.setattr(loop_mod.TrainLoop, "_train_step", flaky)
    code = main(["train", str(tiny_run), *TINY, "--max-steps", "20", "--save-every", "5"])
    err = _one_line_error(capsys, code, "nan", "step_000005")
    assert "step 8" in err
    base = tiny_run / "base"
    assert sorted(p.name for p in base.glob("step_*")) == ["step_000005"]
    assert (base / "latest").resolve().name == "step_000005"


def test_resume_with_changed_shape_is_refused(tiny_run, capsys):
    assert main(["train", str(tiny_run), *TINY, "--max-steps", "5"]) == 0
    capsys.readouterr()
    code = main(["train", str(tiny_run), *TINY, "--max-steps", "10", "--set", "model.n_layer=3", "--resume"])
    _one_line_error(capsys, code, "n_layer")


def test_existing_run_needs_resume_or_force(tiny_run, capsys):
    assert main(["train", str(tiny_run), *TINY, "--max-steps", "5"]) == 0
    capsys.readouterr()
    code = main(["train", str(tiny_run), *TINY, "--max-steps", "5"])
    _one_line_error(capsys, code, "--resume", "--force")
    assert main(["train", str(tiny_run), *TINY, "--max-steps", "5", "--force"]) == 0


def test_corrupt_latest_is_refused_on_resume(tiny_run, capsys):
    assert main(["train", str(tiny_run), *TINY, "--max-steps", "10", "--save-every", "5"]) == 0
    capsys.readouterr()
    weights = tiny_run / "base" / "step_000010" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    code = main(["train", str(tiny_run), *TINY, "--max-steps", "20", "--resume"])
    _one_line_error(capsys, code, "step_000005")
    assert weights.read_bytes() == bytes(data)  # nothing was overwritten


def test_sample_from_run(tiny_run, capsys):
    assert main(["train", str(tiny_run), *TINY, "--max-steps", "5"]) == 0
    capsys.readouterr()
    args = ["sample", str(tiny_run), "--prompt", "KING:", "--max-tokens", "8", "--seed", "3", "--json"]
    assert main(args) == 0
    a = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    b = json.loads(capsys.readouterr().out)
    assert a == b and 1 <= a["tokens"] <= 8


def test_init_from_continues_pretraining_from_weights(tiny_run, tmp_path, capsys):
    """--init-from takes a checkpoint's shape and weights (e.g. one made by `muse import`), fresh optimizer."""
    import shutil

    assert main(["train", str(tiny_run), *TINY, "--max-steps", "30"]) == 0
    trained_last = _losses(tiny_run)[30]
    second = tmp_path / "second"
    second.mkdir()
    shutil.copytree(tiny_run / "data", second / "data")
    ckpt = tiny_run / "base" / "latest"
    # no --depth/model flags: the checkpoint fixes the shape
    args = ["--seq-len", "32", "--batch-size", "4", "--set", "log_every=1", "--device", "cpu", "--max-steps", "3"]
    assert main(["train", str(second), "--init-from", str(ckpt), *args]) == 0
    first_loss = _losses(second)[1]
    assert first_loss < trained_last + 0.5 < 5.0  # starts where the first run ended, not at ~ln(320)=5.8
    cfg = json.loads((second / "base" / "train_config.json").read_text())
    assert cfg["model"]["d_model"] == 64 and cfg["model"]["n_layer"] == 2
    capsys.readouterr()
    code = main(["train", str(tmp_path / "second"), "--init-from", str(ckpt), *args, "--force", "--set", "model.n_layer=3"])
    _one_line_error(capsys, code, "n_layer")


def test_a_time_budget_stops_saves_and_bounds_the_eta(tiny_run, capsys, caplog, monkeypatch):
    """max_time_s ends the run at the first step past it, with a checkpoint there; the logged eta is the time
    left in the budget, not the 1,000 steps of the horizon."""
    monkeypatch.setenv("MUSE_NO_PROGRESS", "1")
    caplog.set_level("INFO", logger="muse.train")
    assert main(["train", str(tiny_run), *TINY, "--max-steps", "1000", "--set", "max_time_s=1e-6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 1
    assert (tiny_run / "base" / "latest").resolve().name == "step_000001"
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1/1000 |")]
    assert steps and steps[0].endswith("eta 0m00s"), steps
    assert any("max_time_s reached at step 1" in r.getMessage() for r in caplog.records)
