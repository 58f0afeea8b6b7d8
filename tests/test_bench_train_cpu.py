"""bench/train_cpu.py --interleaved: fused, `--unfused`, `--fused` and chunked-loss rows run side by side in one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench_kit import load_bench

BENCH = Path(__file__).parents[1] / "bench" / "train_cpu.py"


def test_interleaved_report_with_an_unfused_row(tiny_run):
    cmd = [sys.executable, str(BENCH), "--data", str(tiny_run), "--depth", "1", "--seq-len", "32", "--batch-size", "2",
           "--interleaved", "--steps", "1", "--warmup", "1", "--muse-args=--dtype bfloat16",
           "--muse-args=--dtype bfloat16 --unfused", "--muse-args=--dtype float32 --fused --set loss_chunk=0"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MUSE_NO_PROGRESS="1"), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| plain PyTorch GPT-2 loop (baseline)", "| muse train --dtype bfloat16", "| muse train --dtype bfloat16 --unfused",
        "| muse train --dtype float32 --fused --set loss_chunk=0"]


@pytest.mark.parametrize("flag", ["--unfused", "--fused"])
def test_fusion_rows_need_interleaved(tiny_run, flag):
    cmd = [sys.executable, str(BENCH), "--data", str(tiny_run), f"--muse-args={flag}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--fused rows need --interleaved" in res.stderr


def test_every_row_takes_every_place_in_turn():
    mod = load_bench("train_cpu")
    names = ["baseline", "a", "b"]
    orders = [mod.turn_order(names, i) for i in range(6)]
    assert orders[:3] == [["baseline", "a", "b"], ["a", "b", "baseline"], ["b", "baseline", "a"]]
    assert orders[3:] == orders[:3]
    for place in range(3):
        assert sorted(o[place] for o in orders[:3]) == sorted(names)
