"""Two `muse serve` replicas (real processes) on one real PostgreSQL database (pg_kit.py): quotas hold
across them, the ledger is one table for both, the operator's view covers both, and a replica killed
mid-stream releases its quota holds within its lease while the other keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from muse.cli.main import main
from muse.server.store import open_store
from server_kit import stream_until

pytest_plugins = ["pg_kit"]   # the pg_cluster and pg_url fixtures: a real PostgreSQL

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]

ADMIN = "admin-" + "r" * 40
LEASE = 2.0   # seconds: short, so the kill test waits (polls) a little


@pytest.fixture(scope="module")
def long_checkpoint(save_tiny_checkpoint):
    """A tiny llama with a 1,024-token context: a 1,000-token stream takes seconds on CPU, long enough to
    kill a replica in the middle of it."""
    return save_tiny_checkpoint("replica", n_layer=4, d_model=128, max_seq_len=1024)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    def __init__(self, checkpoint, db: str, name: str):
        self.name, self.port = name, _free_port()
        env = {**os.environ, "MUSE_ADMIN_KEY": ADMIN, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "muse", "serve", str(checkpoint), "--name", "long", "--db", db, "--port",
             str(self.port), "--device", "cpu", "--replica-name", name, "--lease", str(LEASE), "--no-engine-process",
             "--grace", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_up(self) -> Replica:
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.proc.communicate()[1][-3000:]
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the replica did not come up in 120 s"
            time.sleep(0.1)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.communicate()[1]


@pytest.fixture
def replicas(long_checkpoint, pg_url):
    started = [Replica(long_checkpoint, pg_url, name) for name in ("a", "b")]  # both load at once
    try:
        yield [r.wait_up() for r in started]
    finally:
        for r in started:
            err = r.stop()
            assert "Traceback" not in err, err[-3000:]


def _until(cond, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def test_fifty_requests_on_two_replicas_spend_exactly_the_quota(replicas, pg_url, capsys):
    """Each request reserves 3 + 7 = 10 tokens and uses all of them (ignore_eos); the quota is 100: of 50
    requests sent at once, alternating between the replicas, exactly 10 run, the rest get 429
    insufficient_quota, and the ledger's settled rows are exactly the 10 admitted."""
    with open_store(pg_url) as store:
        key, k = store.create_key("acme", token_quota=100, period="day")
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": "long", "prompt": [5, 6, 7], "max_tokens": 7, "ignore_eos": True}

    async def fire():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(replicas[i % 2].url + "/v1/completions", json=body, headers=auth)
                                          for i in range(50)))

    responses = asyncio.run(fire())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) == 10 and len(refused) == 40, [r.status_code for r in responses]
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    assert all(r.json()["usage"]["total_tokens"] == 10 for r in ok)
    admitted = {r.json()["id"] for r in ok}
    assert {r.headers["x-request-id"] for r in ok} == admitted
    with open_store(pg_url, create=False) as store:
        rows = _until(lambda: [r for r in store.usage() if r.total_tokens] if len(
            [r for r in store.usage() if r.status == "ok"]) == 10 else None, "the ledger rows never arrived")
        assert {r.request_id for r in rows} == admitted and all(r.status == "ok" for r in rows)
        assert sum(r.total_tokens for r in rows) == 100 and {r.replica for r in rows} <= {"a", "b"}
        assert {r.replica for r in store.usage()} == {"a", "b"}        # both served (or refused) requests
        assert store.make_quotas().remaining(k) == 0
    admin = {"Authorization": f"Bearer {ADMIN}"}
    # the operator's view from either replica covers both: keys, usage, live engine state
    engine = httpx.get(replicas[1].url + "/admin/engine", headers=admin).json()
    assert engine["replica"] == "b" and [(r["name"], r["alive"]) for r in engine["replicas"]] == [("a", True), ("b", True)]
    _until(lambda: all(r["state"] for r in httpx.get(replicas[0].url + "/admin/engine",
                                                     headers=admin).json()["replicas"]), "no heartbeat state")
    usage = httpx.get(replicas[0].url + "/admin/usage", headers=admin).json()["data"]
    assert sum(g["total_tokens"] for g in usage) == 100 and sum(g["requests"] for g in usage) == 50
    metrics = httpx.get(replicas[0].url + "/metrics", headers=admin).text
    assert 'muse_replica_info{replica="a",store="postgresql"} 1.0' in metrics
    assert "muse_store_seconds_per_request_count" in metrics
    assert main(["usage", "--db", pg_url, "--json"]) == 0
    import json

    totals = json.loads(capsys.readouterr().out)["totals"]
    assert totals["total_tokens"] == 100 and totals["requests"] == 50
    assert main(["keys", "list", "--db", pg_url]) == 0 and k.key_id in capsys.readouterr().out
    assert 'muse_store_op_seconds_count{op="admit"}' in metrics    # the store's time split by operation
    # A key revoked elsewhere (the CLI) is refused by both replicas at once, though each has just cached
    # it (a 429 each: authenticated, refused at admission): admission reads the key again, in the database.
    for r in replicas:
        assert httpx.post(r.url + "/v1/completions", json=body, headers=auth).status_code == 429
    assert main(["keys", "revoke", k.key_id, "--db", pg_url]) == 0
    for r in replicas:
        resp = httpx.post(r.url + "/v1/completions", json=body, headers=auth)
        assert resp.status_code == 401 and "revoked" in resp.json()["error"]["message"], resp.text
    for r in replicas:                                             # each flushes its ledger writer
        assert httpx.get(r.url + "/admin/usage", headers=admin).status_code == 200
    with open_store(pg_url, create=False) as store:                # the 429s have rows, the 401s none
        assert len(store.usage()) == 52 and not store._rows("SELECT * FROM quota_holds")


def test_a_replica_killed_mid_stream_releases_its_holds_within_the_lease(replicas, pg_url):
    """Two streams of 1,000 tokens run on replica a, holding 2 x 1,003 of a 2,100-token quota; a is
    SIGKILLed. b refuses a request of 100 tokens while a's holds are live, admits it once a's lease
    has expired (polled, within the lease and one heartbeat), keeps serving, and settles a's two
    requests as "interrupted", billed their prompt and the progress a last committed."""
    a, b = replicas
    with open_store(pg_url) as store:
        key, k = store.create_key("acme", token_quota=2100, period="day")
    auth = {"Authorization": f"Bearer {key}"}
    holders = [[] for _ in range(2)]
    threads = [stream_until(a.url, auth, 20, h) for h in holders]
    assert all(h[0] == 200 for h in holders), holders
    with open_store(pg_url, create=False) as peek:
        _until(lambda: (lambda rows: len(rows) == 2 and all(r.completion_tokens for r in rows))(
            [r for r in peek.usage() if r.status == "running"]), "running rows with progress never reached the ledger")
    small = {"model": "long", "prompt": [5, 6, 7], "max_tokens": 97, "ignore_eos": True}
    before = httpx.post(b.url + "/v1/completions", json=small, headers=auth, timeout=60)
    assert before.status_code == 429 and before.json()["error"]["code"] == "insufficient_quota"
    a.proc.kill()
    a.proc.wait(30)
    killed_at = time.time()
    for t in threads:
        t.join(30)

    def admitted():
        r = httpx.post(b.url + "/v1/completions", json=small, headers=auth, timeout=60)
        assert r.status_code in (200, 429), r.text
        return r if r.status_code == 200 else None

    resp = _until(admitted, "b never admitted the request after a's lease expired", timeout=LEASE * 3 + 30)
    assert resp.json()["usage"]["total_tokens"] == 100
    with open_store(pg_url, create=False) as store:
        # a's holds counted until its lease ran out, which was at most LEASE after the kill (its last
        # heartbeat came before it), and b admitted the request only after that
        (lease_until,) = [r["lease_until"] for r in store.replicas() if r["name"] == "a"]
        (row,) = [r for r in store.usage() if r.request_id == resp.json()["id"]]
        assert lease_until <= killed_at + LEASE and row.created_at + row.latency_s >= lease_until
        rows = _until(lambda: (lambda rs: rs if len(rs) == 2 else None)(
            [r for r in store.usage() if r.replica == "a" and r.status == "interrupted"]),
            "a's requests were not settled as interrupted")
        assert all(r.prompt_tokens == 3 and r.completion_tokens > 0 for r in rows)
        assert not [r for r in store.usage() if r.status == "running"]
        billed = sum(r.total_tokens for r in store.usage())
        assert store.make_quotas().remaining(k) == 2100 - billed       # the quota is the ledger, nothing held
    engine = httpx.get(b.url + "/admin/engine", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert [(r["name"], r["alive"]) for r in engine["replicas"]] == [("a", False), ("b", True)]
    assert httpx.get(b.url + "/health").status_code == 200
