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
from server_kit import stream_until

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
        if time.monotonic() >= deadline:
            proc.kill()  # no orphaned server (and engine process, which exits with its parent) after a failure
            raise AssertionError(f"the server did not come up in 90 s: {proc.communicate()[1][-3000:]}")
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


@pytest.fixture(scope="module")
def long_checkpoint(save_tiny_checkpoint):
    """A tiny llama with a 1,024-token context: a stream of ~1,000 tokens takes a few seconds on CPU, long
    enough to kill or drain a server in the middle of it."""
    return save_tiny_checkpoint("long", n_layer=4, d_model=128, max_seq_len=1024)


def test_a_crash_leaves_every_request_in_flight_in_the_ledger(long_checkpoint, tmp_path):
    """SIGKILL while 4 streams run: after the restart each has a row, "interrupted", billed what the
    ledger knew (its prompt, and the completion tokens of its last recorded progress)."""
    db = tmp_path / "serve.sqlite3"
    with Store(db) as store:
        key, _ = store.create_key("acme")
    auth = {"Authorization": f"Bearer {key}"}
    proc, url = _start(long_checkpoint, db)
    holders = [[] for _ in range(4)]
    try:
        threads = [stream_until(url, auth, 20, h) for h in holders]
        deadline = time.monotonic() + 30
        while True:  # the 4 running rows and some progress are on disk (the writer commits within ~1 s)
            with Store(db, create=False) as peek:
                running = [r for r in peek.usage() if r.status == "running"]
            if len(running) == 4 and any(r.completion_tokens for r in running):
                break
            assert time.monotonic() < deadline, "the running requests and their progress never reached the ledger"
            time.sleep(0.05)
        proc.kill()
        proc.wait(30)
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, url = _start(long_checkpoint, db)
    try:
        rows = httpx.get(url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
        assert rows[0]["requests"] == 4 and rows[0]["statuses"] == {"interrupted": 4}, rows
        assert rows[0]["prompt_tokens"] == 12 and rows[0]["completion_tokens"] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_a_drain_answers_503_and_aborts_what_outlives_the_grace(long_checkpoint, tmp_path):
    """SIGTERM with --grace 0.5 while a ~1,000-token stream and a plain request run: a new request during the
    drain gets a 503 shutting_down (not a refused connection); after the grace the stream ends with an
    error event and [DONE], the plain request gets a JSON 503; both rows say what the client got."""
    import threading

    db = tmp_path / "serve.sqlite3"
    with Store(db) as store:
        key, _ = store.create_key("acme")
    auth = {"Authorization": f"Bearer {key}"}
    proc, url = _start(long_checkpoint, db, "--grace", "0.5")
    try:
        stream = []
        st = stream_until(url, auth, 3, stream)
        plain = []
        pt = threading.Thread(target=lambda: plain.append(httpx.post(
            url + "/v1/completions", headers=auth, timeout=60,
            json={"model": "long", "prompt": [5, 6], "max_tokens": 1000, "ignore_eos": True})), daemon=True)
        pt.start()
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        during = httpx.post(url + "/v1/completions", headers=auth, timeout=10,
                            json={"model": "long", "prompt": [5], "max_tokens": 2})
        assert during.status_code == 503 and during.json()["error"]["code"] == "shutting_down"
        st.join(30)
        pt.join(30)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [line[6:] for line in stream[1:] if isinstance(line, str) and line.startswith("data: ")]
    assert stream[0] == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down"
    (resp,) = plain
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "shutting_down"
    with Store(db, create=False) as store:
        rows = sorted(store.usage(), key=lambda r: r.http_status)
    assert [(r.status, r.http_status) for r in rows if r.prompt_tokens] == [("aborted", 200), ("aborted", 503)]


def test_one_database_serves_one_server(checkpoint, tmp_path, capsys):
    db = tmp_path / "serve.sqlite3"
    proc, url = _start(checkpoint, db)
    try:
        assert main(["serve", str(checkpoint), "--db", str(db), "--port", str(_free_port())]) == 2
        err = capsys.readouterr().err
        assert "another muse serve" in err and "Traceback" not in err, err
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_a_database_url_is_never_a_file_and_bad_ones_are_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url, words in (("postgresql://u:s3cret@127.0.0.1:1/muse", "cannot connect to the serving database "
                                                                   "postgresql://u:***@127.0.0.1:1/muse"),
                       ("mysql://u@localhost/muse", "is a URL Muse cannot open")):
        assert main(["serve", str(checkpoint), "--db", url]) == 2
        err = capsys.readouterr().err
        assert words in err and "s3cret" not in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert main(["serve", str(checkpoint), "--db", str(tmp_path / "x.sqlite3"), "--replica-name", "a"]) == 2
    assert "PostgreSQL" in capsys.readouterr().err
    assert not any(p.name != "x.sqlite3" for p in tmp_path.iterdir())  # no directories were made from a URL


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the engine process through /proc")
def test_the_server_restarts_a_killed_engine_process(long_checkpoint, tmp_path):
    """SIGKILL the engine child mid-stream (an OOM kill): the stream ends with a retryable 503 event, the
    server starts a new engine, later requests are served, and /metrics counts the restart."""
    db = tmp_path / "serve.sqlite3"
    with Store(db) as store:
        key, _ = store.create_key("acme")
    auth = {"Authorization": f"Bearer {key}"}
    proc, url = _start(long_checkpoint, db)
    try:
        stream = []
        t = stream_until(url, auth, 3, stream)
        (engine_pid,) = _children(proc.pid)
        os.kill(engine_pid, signal.SIGKILL)
        t.join(30)
        events = [line[6:] for line in stream[1:] if isinstance(line, str) and line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_unavailable"
        deadline = time.monotonic() + 90
        while httpx.get(url + "/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the engine was not restarted"
            time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", headers=auth, timeout=30,
                       json={"model": "long", "prompt": [5, 6], "max_tokens": 3})
        assert r.status_code == 200, r.text
        metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        assert 'muse_engine_restarts_total{model="long"} 1.0' in metrics
        assert _children(proc.pid) != [engine_pid]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
