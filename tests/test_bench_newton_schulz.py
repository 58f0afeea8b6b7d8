"""bench/newton_schulz.py: its plain baseline is the same iteration as Muon's, and the report runs."""

from __future__ import annotations

import pytest
import torch

from bench_kit import load_bench
from muse.train.muon import zeropower_via_newtonschulz5


def _bench():
    return load_bench("newton_schulz")


@pytest.mark.parametrize("shape", [(3, 16, 40), (2, 40, 16)])
def test_plain_baseline_is_the_same_iteration(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_bench().plain_newtonschulz(G, 5, torch.float32),
                               zeropower_via_newtonschulz5(G, 5, torch.float32), rtol=1e-5, atol=1e-5)


def test_newton_schulz_report(capsys):
    assert _bench().main(["--depth", "1", "--steps", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {v} |" in out for v in ("baddbmm float32", "baddbmm bfloat16", "plain float32", "plain bfloat16"))
