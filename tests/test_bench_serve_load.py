"""bench/serve_load.py stays runnable: a 1 s run at 2 streams on a tiny model, against the real server.

Throughput is not asserted (timing on a shared machine); the run's own checks are: every request
completes with exactly max_tokens, every KV block is free afterwards, and the ledger's token sums equal
the engine's counters, over HTTP and in the database file.
"""

from __future__ import annotations

import sys

import pytest

from bench_kit import load_bench

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def serve_load():
    try:
        yield load_bench("serve_load", register=True)  # dataclasses look their module up by name
    finally:
        sys.modules.pop("serve_load", None)


def test_serve_load_smoke(serve_load, tmp_path):
    cfg = serve_load.LoadConfig(concurrency=[2], duration=1.0, prompt_len=8, max_tokens=6, threads=1, depth=1,
                                width=64, vocab_size=300, max_seq_len=64, warmup=False)
    logs = []
    report = serve_load.run_load(cfg, workdir=tmp_path, log=logs.append)
    assert report["passed"], report["checks"]
    (row,) = report["rows"]
    for mode in ("http", "engine"):
        s = row[mode]
        assert s["requests"] >= 2 and s["completed"] == s["requests"] and not s["errors"]
        assert s["output_tokens"] == 6 * s["completed"]
        assert all(v is not None and v > 0 for k in ("ttft_ms", "tpot_ms", "itl_ms") for v in s[k].values())
    assert row["ratio"] > 0
    names = set(report["checks"])
    assert {"kv_blocks_free after 2 streams", "ledger_equals_engine after 2 streams",
            "ledger file after shutdown", "server exited cleanly"} <= names
    md = serve_load.markdown(report, ["--concurrency", "2"])
    assert "| 2 | " in md and "FAIL" not in md
    assert len(logs) == 2  # one JSON line per mode


def test_serve_load_checks_fail_loudly(serve_load):
    # a wrong pool size or ledger sums that differ from the engine's counters must read FAIL
    metrics = ('muse_kv_cache_free_blocks{model="bench"} 7.0\n'
               'muse_engine_prompt_tokens_total{model="bench"} 10.0\n')
    m = serve_load.parse_metrics(metrics)
    assert m["muse_kv_cache_free_blocks"] == 7 and serve_load.counter(m, "muse_engine_prompt_tokens") == 10
    assert serve_load.counter(m, "muse_engine_generation_tokens") == -1  # missing: can never match a ledger sum
    assert serve_load.percentiles([]) == {"p50": None, "p90": None, "p99": None}
    assert serve_load.percentiles([0.001, 0.002, 0.003])["p50"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        serve_load.run_load(serve_load.LoadConfig(prompt_len=60, max_tokens=8, max_seq_len=64))
