"""Soak test of `muse serve` under hostile traffic (issue 11's goal): many streaming clients for minutes, a
share of them hanging up at random points and a share sending malformed requests.

The server is the real `muse serve` subprocess that bench/serve_load.py starts (same checkpoint
builder, same checks). --clients closed-loop clients send requests back to back for --duration
seconds; each request is, by a seeded draw:

  complete   (the rest)     a streamed completion read to [DONE], or a plain one read whole;
  hang-up    (--hangup)     the request is sent whole, then the client closes the connection: before
                            any response (a plain request with a 20-300 ms timeout) or after 1-8
                            streamed chunks;
  malformed  (--malformed)  bad JSON, an unknown field, out-of-vocabulary stop_token_ids, a lone
                            surrogate, 1,000-deep nesting, too many sequences, a wrong type.

Pass criteria, checked after the run: no 5xx and no error event mid-stream anywhere; the engine never
restarted (muse_engine_restarts); every KV block free; the ledger holds one row per request sent
(/admin/usage) and its token sums equal the engine's counters; after shutdown the database file agrees.

  python bench/serve_soak.py                                  # 64 clients, 120 s, 30% hang-ups, 10% malformed
  python bench/serve_load.py --soak 120                       # the same, from serve_load's entry point
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402

from muse.server.store import Store  # noqa: E402
from serve_load import (  # noqa: E402
    PARTNER,
    LoadConfig,
    ServerProcess,
    check_db,
    check_server,
    counter,
    machine,
    make_checkpoint,
    parse_metrics,
)

MALFORMED = [
    b'{"model": "bench", "prompt": "hi", "max_tokens": 4',                                  # truncated JSON
    b'{"model": "bench", "prompt": "hi", "max_tokens": 4, "temprature": 1}',                # unknown field
    b'{"model": "bench", "prompt": "hi", "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [999999]}',
    b'{"model": "bench", "prompt": "a\\ud800b", "max_tokens": 4}',                          # lone surrogate
    b'{"model": "bench", "prompt": "hi", "metadata": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001,
    b'{"model": "bench", "prompt": [[5, 6]], "n": 99, "max_tokens": 4}',                   # too many sequences
    b'{"model": "bench", "prompt": "hi", "max_tokens": "four"}',
    b'[1, 2, 3]',
]


class Tally:
    def __init__(self):
        self.kinds: Counter = Counter()
        self.statuses: Counter = Counter()
        self.problems: Counter = Counter()
        self.sent = 0


async def one_request(http: httpx.AsyncClient, url: str, headers: dict, rng: random.Random, cfg, tally: Tally) -> None:
    draw = rng.random()
    prompt = [rng.randrange(16, 4000) for _ in range(rng.randint(8, 64))]
    body = {"model": "bench", "prompt": prompt, "max_tokens": rng.randint(4, cfg.max_tokens), "temperature": 0,
            "ignore_eos": True}
    tally.sent += 1
    if draw < cfg.malformed:
        tally.kinds["malformed"] += 1
        r = await http.post(url, content=rng.choice(MALFORMED), headers={**headers, "content-type": "application/json"})
        tally.statuses[r.status_code] += 1
        if r.status_code != 400:
            tally.problems[f"malformed got {r.status_code}"] += 1
        return
    if draw < cfg.malformed + cfg.hangup:
        tally.kinds["hang-up"] += 1
        if rng.random() < 0.5:   # before any response: a plain request whose client gives up
            try:
                # only the read times out: the request always arrives whole
                r = await http.post(url, json=body, headers=headers,
                                    timeout=httpx.Timeout(30.0, read=rng.uniform(0.02, 0.3)))
                tally.statuses[r.status_code] += 1
            except httpx.TimeoutException:
                pass
            return
        chunks = rng.randint(1, 8)   # mid-stream: read a few chunks, then close the connection
        async with http.stream("POST", url, json={**body, "stream": True}, headers=headers) as r:
            tally.statuses[r.status_code] += 1
            n = 0
            async for _ in r.aiter_lines():
                n += 1
                if n >= chunks:
                    break
        return
    tally.kinds["complete"] += 1
    if rng.random() < 0.7:
        async with http.stream("POST", url, json={**body, "stream": True}, headers=headers) as r:
            tally.statuses[r.status_code] += 1
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        if not lines or lines[-1] != "data: [DONE]":
            tally.problems["stream without [DONE]"] += 1
        if any('"error"' in line for line in lines):
            tally.problems["error event mid-stream"] += 1
    else:
        r = await http.post(url, json=body, headers=headers)
        tally.statuses[r.status_code] += 1
        if r.status_code != 200:
            tally.problems[f"plain request got {r.status_code}"] += 1


async def soak(cfg, workdir: Path, log) -> dict:
    load = LoadConfig(concurrency=[cfg.clients], max_num_seqs=cfg.clients, max_seq_len=256, depth=cfg.depth,
                      width=cfg.width, vocab_size=4096, threads=1, device="cpu", seed=cfg.seed)
    ckpt = make_checkpoint(workdir, load)
    db = workdir / "serve.sqlite3"
    with Store(db) as store:
        key, _ = store.create_key(PARTNER)
    admin_key = "soak-admin-" + os.urandom(16).hex()
    admin = {"Authorization": f"Bearer {admin_key}"}
    server = ServerProcess(ckpt, db, workdir, load, admin_key)
    tally, checks = Tally(), {}
    url, headers = server.url + "/v1/completions", {"Authorization": f"Bearer {key}"}
    try:
        await server.wait_healthy(load.server_timeout)
        limits = httpx.Limits(max_connections=cfg.clients * 2, max_keepalive_connections=cfg.clients)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=30.0), limits=limits) as http:
            deadline = time.monotonic() + cfg.duration

            async def client(i: int) -> None:
                rng = random.Random(f"{cfg.seed}-{i}")
                while time.monotonic() < deadline:
                    try:
                        await one_request(http, url, headers, rng, cfg, tally)
                    except httpx.HTTPError as e:
                        tally.problems[f"client error {type(e).__name__}"] += 1

            t0 = time.monotonic()
            await asyncio.gather(*(client(i) for i in range(cfg.clients)))
            wall = time.monotonic() - t0
            level = await check_server(http, server, admin, server.num_blocks or 0, timeout=30)
            m = parse_metrics((await http.get(server.url + "/metrics", headers=admin)).text)
        restarts = counter(m, "muse_engine_restarts")
        fivexx = sum(n for s, n in tally.statuses.items() if s >= 500)
        checks["no 5xx"] = {"pass": fivexx == 0, "detail": f"{fivexx} responses >= 500"}
        checks["no problems"] = {"pass": not tally.problems, "detail": dict(tally.problems) or "none"}
        checks["engine never restarted"] = {"pass": restarts == 0, "detail": f"{restarts} restarts"}
        checks["kv blocks free"] = level["kv_blocks_free"]
        checks["ledger equals engine"] = level["ledger_equals_engine"]
        rows = level["_ledger"]["requests"]
        checks["one ledger row per request"] = {"pass": rows == tally.sent,
                                                "detail": f"{rows} rows for {tally.sent} requests sent"}
        engine_counts = level["_engine"]
    finally:
        code = server.stop()
    tb = "Traceback" in server.log_path.read_text(errors="replace")
    checks["server exited cleanly"] = {"pass": code in (0, -signal.SIGTERM) and not tb,
                                       "detail": f"exit status {code}" + (", a traceback in its log" if tb else "")}
    checks["ledger file after shutdown"] = check_db(db, engine_counts, tally.sent)
    return {"requests": tally.sent, "kinds": dict(tally.kinds), "statuses": {str(k): v for k, v in tally.statuses.items()},
            "wall_s": wall, "checks": checks, "passed": all(c["pass"] for c in checks.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=120.0, help="seconds")
    p.add_argument("--hangup", type=float, default=0.3, help="share of requests whose client hangs up")
    p.add_argument("--malformed", type=float, default=0.1, help="share of malformed requests")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", metavar="PATH")
    cfg = p.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="muse-soak-") as d:
        report = asyncio.run(soak(cfg, Path(d), log))
    report.update(config=vars(cfg), machine=info)
    for name, c in report["checks"].items():
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {name}: {c['detail']}")
    print(json.dumps({k: report[k] for k in ("requests", "kinds", "statuses", "wall_s")}))
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
