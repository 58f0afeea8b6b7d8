"""`muse serve` as a process: SIGTERM drains (running requests finish, new ones are refused, the ledger
is flushed), a restart keeps keys and ledger; and the in-process shutdown that aborts what outlives
the grace period."""

from __future__ import annotations

import asyncio
import json
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
from muse.server.store import Store

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(180)]

ADMIN = "admin-" + "y" * 40


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(checkpoint, db, *flags) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "MUSE_ADMIN_KEY": ADMIN, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "muse", "serve", str(checkpoint), "--db", str(db), "--port",
                             str(port), "--device", "cpu", *flags], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.1)


def test_sigterm_drains_and_a_restart_keeps_keys_and_ledger(checkpoint, tmp_path, capsys):
    db = tmp_path / "serve.sqlite3"
    assert main(["keys", "create", "--partner", "acme", "--db", str(db)]) == 0
    key = capsys.readouterr().out.strip()
    auth = {"Authorization": f"Bearer {key}"}
    proc, url = _start(checkpoint, db, "--grace", "20")
    try:
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 100, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=30) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"                                  # the running request finished
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == 100
        out, err = proc.communicate(timeout=60)
        # uvicorn re-raises the signal once it has shut down, so the parent sees "terminated by SIGTERM"
        assert proc.returncode in (0, -signal.SIGTERM), err[-3000:]
        assert "Application shutdown complete" in err
        assert key not in out + err                                   # no key material in the logs
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(httpx.TransportError):                          # nothing listens any more
        httpx.get(url + "/health", timeout=1)

    # the ledger was flushed before the process ended
    assert main(["usage", "--json", "--db", str(db)]) == 0
    totals = json.loads(capsys.readouterr().out)["totals"]
    assert totals["requests"] == 1 and totals["completion_tokens"] == 100 and totals["statuses"] == {"ok": 1}

    # a restart: the same key works, the ledger goes on
    proc, url = _start(checkpoint, db)
    try:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "the king", "max_tokens": 3},
                       headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        assert httpx.get(url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"][0][
            "requests"] == 2
        assert httpx.get(url + "/admin/keys", headers=auth).status_code == 401
        keys = httpx.get(url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
        assert [k["partner"] for k in keys] == ["acme"] and key not in json.dumps(keys)

        # a client that leaves mid-stream: the engine (its own process) aborts the request and frees its
        # blocks; the ledger gets an "aborted" row with the tokens generated so far
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 100, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=30) as resp:
            lines = resp.iter_lines()
            assert all(next(lines) is not None for _ in range(6))
        admin = {"Authorization": f"Bearer {ADMIN}"}
        deadline = time.monotonic() + 30
        while True:
            statuses = httpx.get(url + "/admin/usage", headers=admin).json()["data"][0]["statuses"]
            metrics = httpx.get(url + "/metrics", headers=admin).text
            free = [line for line in metrics.splitlines() if line.startswith(("muse_kv_cache_free_blocks",
                                                                              "muse_kv_cache_blocks"))]
            if statuses.get("aborted") == 1 and len({line.split()[-1] for line in free}) == 1:
                break
            assert time.monotonic() < deadline, (statuses, free)
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_bad_serve_flags_are_one_line(checkpoint, tmp_path, capsys):
    db = str(tmp_path / "db.sqlite3")
    for flags, needle in ((["--model", "nameonly"], "NAME=CHECKPOINT"),
                          (["--model", f"tiny={checkpoint}"], "two models are named 'tiny'"),
                          (["--max-n", "0"], "--max-n must be positive"),
                          (["--admin-key-file", str(tmp_path / "nope")], "does not exist")):
        assert main(["serve", str(checkpoint), "--db", db, *flags]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    assert main(["serve", str(tmp_path / "missing"), "--db", db]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_shutdown_aborts_what_outlives_the_grace_period(checkpoint, tmp_path):
    """In process: a request held in the engine past the grace period is aborted, recorded and flushed."""
    from muse.infer.engine import Engine, EngineConfig
    from muse.server.app import ServedModel, ServerConfig, create_app, shutdown

    engine = Engine.from_checkpoint(checkpoint, EngineConfig(block_size=8, num_blocks=64, max_num_seqs=4))
    store = Store(tmp_path / "db.sqlite3")
    key, _ = store.create_key("acme")
    app = create_app([ServedModel.from_engine("tiny", engine)], store, ServerConfig(shutdown_grace_s=0.2))
    state = app.state.muse
    execute, steps = engine.runner.execute, []

    def slow(so):  # a step every 20 ms: 100 tokens outlive the 0.2 s grace
        steps.append(1)
        time.sleep(0.02)
        return execute(so)
    engine.runner.execute = slow

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://muse") as client:
            async with app.router.lifespan_context(app):
                task = asyncio.create_task(client.post(
                    "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                    json={"model": "tiny", "prompt": [5, 6], "max_tokens": 100, "ignore_eos": True}))
                while not steps:
                    await asyncio.sleep(0.005)
                t0 = time.monotonic()
                await shutdown(state)                        # what the lifespan's exit does on SIGTERM
                assert time.monotonic() - t0 < 5
                resp = await task
                return resp

    resp = asyncio.run(scenario())
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "shutting_down"   # clients retry a 503
    rows = store.usage()
    assert len(rows) == 1 and rows[0].status == "aborted" and 0 < rows[0].completion_tokens < 100
    assert engine.scheduler.kv.num_free_blocks == engine.num_blocks
    store.close()
