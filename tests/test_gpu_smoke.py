"""bench/gpu.sh in its CPU smoke mode: every step runs at a tiny shape and the summary table says ok.

The GPU script only runs when a GPU is lent; this keeps it from rotting in between (a renamed flag, a moved
file, a step that no longer parses). About 45 s of CPU on a quiet 2-vCPU machine (most of it interpreter
start-ups: each step is its own process); 4-5 minutes under a load average of 12, hence the timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_script_smoke_mode_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=590)
    assert res.returncode == 0, res.stderr[-3000:]
    table = (out / "summary.md").read_text().splitlines()
    rows = [line.split(" | ") for line in table[2:]]
    assert [r[0].strip("| ") for r in rows] == [str(n) for n in range(1, 11)], table
    failed = [r for r in rows if r[2] != "ok"]
    assert not failed, "\n".join(table) + "\n" + res.stdout[-4000:]
    # the fused cross-entropy step compares the two loss curves (identical batches and seed)
    assert "loss curves, llama+muon plain loss chunk 8192 vs loss chunk 0" in (out / "step7.txt").read_text()
