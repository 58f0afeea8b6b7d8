"""bench/decode_compile.py at a tiny shape: every row runs the same decode step and gives the eager step's logits."""

from __future__ import annotations

import pytest

from bench_kit import load_bench


def _bench():
    return load_bench("decode_compile")


@pytest.mark.slow
def test_every_row_matches_the_eager_step(capsys):
    rows = ["eager auto", "eager static", "compiled static"]  # "compiled whole" compiles for as long again
    assert _bench().main(["--depth", "1", "--vocab", "128", "--max-seq-len", "64", "--decodes", "3",
                          "--context", "10", "40", "--repeats", "1", "--rows", *rows]) == 0
    table = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [r[0].lstrip("| ") for r in table] == rows
    for r in table:
        assert float(r[4].rstrip(" |")) < 1e-5, r


def test_an_unknown_row_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        _bench().main(["--rows", "eager auto", "graphs"])
    assert e.value.code == 2
    assert "unknown rows ['graphs']" in capsys.readouterr().err
