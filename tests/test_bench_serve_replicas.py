"""bench/serve_replicas.py (`serve_load.py --replicas`) stays runnable: 1 s at 2 streams per server on a
tiny model, one SQLite server then two replicas on a real PostgreSQL database (pg_kit.py).

The store-time goals are not asserted here (timing on a shared machine); the run's own exactness checks
are: ledger == the engines' counters in both phases, nothing left running or held, the database's quota
counter == the ledger, and the burst admits exactly 10 requests and leaves the ledger at the quota.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench_kit import load_bench

pytest_plugins = ["pg_kit"]   # the pg_cluster and pg_url fixtures: a real PostgreSQL


pytestmark = pytest.mark.timeout(600)

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def serve_replicas():
    sys.path.insert(0, str(BENCH))
    try:
        load_bench("serve_load", register=True)  # dataclasses look their module up by name
        yield load_bench("serve_replicas", register=True)
    finally:
        sys.modules.pop("serve_load", None)
        sys.modules.pop("serve_replicas", None)
        sys.path.remove(str(BENCH))


def test_serve_replicas_smoke(serve_replicas, pg_url, tmp_path):
    rc = serve_replicas.ReplicaConfig(streams=2, duration=1.0, prompt_len=8, max_tokens=6, depth=1, width=64,
                                      vocab_size=300, max_seq_len=64, engine_process=False, pg_url=pg_url)
    logs = []
    report = serve_replicas.run(rc, workdir=tmp_path, log=logs.append)
    exact = {n: c for n, c in report["checks"].items() if not n.startswith("store time")}
    assert all(c["pass"] for c in exact.values()), exact
    assert {"burst: exactly 10 of the requests admitted", "burst: the ledger holds exactly the quota",
            "2 replicas (PostgreSQL): the quota counter equals the ledger", "replicas exited cleanly"} <= set(exact)
    for name, first in (("sqlite", "authenticate"), ("postgresql", "admit")):
        st = report["phases"][name]["store"]
        assert st["count"] >= report["phases"][name]["requests"] and st["p50_ms"] > 0
        ops = report["phases"][name]["store_ops"]       # the breakdown: every request made its first call
        assert ops[first]["count"] >= report["phases"][name]["requests"] and "ledger" in ops
    floor = report["phases"]["postgresql"]["round_trip"]           # the control ran in the same seconds
    assert floor["count"] > 0 and floor["p50_ms"] > 0 and report["phases"]["sqlite"]["round_trip"] is None, floor
    md = serve_replicas.markdown(report, ["--streams", "2"])
    assert "| postgresql | 2 | 4 |" in md and "| sqlite | 1 | 2 |" in md and "| postgresql | admit |" in md
    assert len(logs) == 2


def test_store_histogram_quantiles(serve_replicas):
    inf = float("inf")
    h = {0.001: 40.0, 0.002: 60.0, 0.01: 99.0, inf: 100.0}
    s = serve_replicas.hist_summary(h)
    assert s["count"] == 100 and s["le_2ms"] == 0.6 and s["le_10ms"] == 0.99
    assert s["p50_ms"] == pytest.approx(1.5) and s["p99_ms"] == pytest.approx(10.0)
    assert serve_replicas.hist_summary({inf: 0.0})["p50_ms"] is None
