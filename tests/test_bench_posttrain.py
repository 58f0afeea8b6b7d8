"""bench/posttrain.py: the arithmetic mixture file, a custom recipe end to end on a tiny run, bad options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench_kit import load_bench
from muse.posttrain.mixture import load_mixture

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = Path(__file__).parents[1] / "bench"
MIXTURE = BENCH / "arithmetic_mixture.toml"


def _bench():
    return load_bench("posttrain")


@pytest.fixture(scope="module")
def bench_run(tiny_run_with_model):
    """A prepared tiny run (vocab 320) with a base checkpoint: 2 layers, width 64, context 256."""
    return tiny_run_with_model("bench_posttrain", "base", 1)[0]


def test_arithmetic_mixture_trains_on_the_two_graded_levels_only():
    specs = load_mixture(MIXTURE)
    assert [(s.kind, s.target) for s in specs] == [("task", "arithmetic_1digit"), ("task", "arithmetic_2digit")]
    assert all(s.weight > 0 for s in specs)


def test_custom_recipe_end_to_end(bench_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MUSE_NO_PROGRESS", "1")
    code = _bench().main([
        "--run", str(bench_run), "--out", str(tmp_path / "out"), "--threads", "1", "--mixture", str(MIXTURE),
        "--text-share", "0", "--batch-tokens", "1024", "--max-steps", "2", "--limit", "3", "--no-base",
        "--throughput-steps", "0", "--tasks", "arithmetic_1digit,arithmetic_2digit",
        "--set", "optim.matrix_lr=0.03", "--set", "schedule.decay_frac=0.5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert r["sft_steps"] == 2 and r["text_share"] == 0.0 and r["batch_tokens"] == 1024
    assert r["optim"]["matrix_lr"] == 0.03 and r["schedule"]["decay_frac"] == 0.5
    assert "pretrain_tokens_per_s" not in r  # --throughput-steps 0
    assert set(r["tasks"]) == {"arithmetic_1digit", "arithmetic_2digit"}
    assert all(row["n"] == 3 and "base" not in row for row in r["tasks"].values())  # --no-base
    both = r["tasks"]["arithmetic_1digit"]["sft"] + r["tasks"]["arithmetic_2digit"]["sft"]
    assert r["arithmetic_1_2_digit_exact"] == pytest.approx(both / 2, abs=1e-4)
    # only the mixture's sources were trained on: no plain-text share, no other task
    assert set(r["sft_evals"]) == {"val_loss", "val_loss_arithmetic_1digit", "val_loss_arithmetic_2digit"}
    assert Path(r["sft_checkpoint"]).parent == tmp_path / "out" / "sft"


@pytest.mark.parametrize("argv, needle", [
    (["--tasks", "arithmetic_1digit,sums"], "--tasks: 'sums' is not a generative task"),
    (["--mixture", "nowhere.toml"], "--mixture nowhere.toml: no such file"),
    (["--set", "optim.matrix_rate=0.1"], "matrix_rate"),
    (["--text-share", "1.5"], "text_share"),
])
def test_bad_options_are_one_line_errors(bench_run, tmp_path, capsys, argv, needle):
    code = _bench().main(["--run", str(bench_run), "--out", str(tmp_path / "out"), "--throughput-steps", "0", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and "\n" not in err and err.startswith("error: ")
