"""Load test of several `muse serve` replicas on one PostgreSQL database (`serve_load.py --replicas ...`):
the store's own time per request, and the exactness of the ledger and of a quota shared by replicas.

One run builds serve_load.py's random llama and checkpoint, then:

  baseline  one server on an SQLite file, --streams closed-loop streaming clients, --duration seconds;
  replicas  --replicas servers (default 2) on one PostgreSQL database (--pg-url, or a throwaway cluster
            started with initdb/pg_ctl in a temporary directory, as the tests do), --streams clients
            EACH, bound to their replica as a load balancer with sticky connections would;
  burst     the key's quota is set to what it used plus 10 requests' worth, and 32 requests per replica
            are sent at once: exactly 10 may run.

Each server and the throwaway PostgreSQL run in sessions of their own, given the bench's own
scheduling priority (`share_priority`: under the measurement lock's raised autogroup they would
otherwise be starved by the bench's clients).

Every request is serve_load.py's (random prompt, ignore_eos, fixed max_tokens), on a key with a token
quota (so each request reserves and settles quota in the database) and no rate limits. The store's time
per request is the server's own histogram `muse_store_seconds_per_request` (app.RequestContext sums
the wall time of every store call an HTTP request makes, each from before it asks for a connection
until its result is in hand: the key, the admission (PostgreSQL: the key's check and the quota
reservation in one round trip), the ledger hand-off); its buckets have bounds at 2 ms and 10 ms, so
"p50 <= 2 ms" and "p99 <= 10 ms" are read off exactly (the fraction of requests at or under the bound),
and p50/p99 are interpolated in the bucket. `muse_store_op_seconds{op}` splits it by operation (the
second table). The ledger writer's commits are not in it: they run in the writer's thread, off the
request path.

While the replicas run, a control measures the round-trip floor in the same seconds (RoundTripProbe:
`SELECT 1` every 10 ms from a process that does nothing else): what reaching PostgreSQL costs on the
machine at that moment, whatever a store does.

Checks (any FAIL: exit 1): after each phase the ledger's token sums (read from the database, all
replicas together) equal the sums of the engines' counters; no request is left "running" and no
quota hold is left; the database's quota counter (quota_usage) equals the ledger; in the burst exactly
10 requests are admitted, the rest get 429 insufficient_quota, and the ledger then holds exactly the
quota.

  python bench/serve_load.py --replicas --streams 32 --duration 20
  python bench/serve_load.py --replicas --pg-url postgresql://muse@db/bench --streams 32
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from muse.common.paths import atomic_write_json  # noqa: E402
from muse.server.store import open_store  # noqa: E402
from serve_load import (  # noqa: E402
    PARTNER,
    LoadConfig,
    ServerProcess,
    closed_loop,
    counter,
    free_port,
    http_request,
    machine,
    make_checkpoint,
    make_prompt,
    parse_metrics,
    summarize,
)

HIST = "muse_store_seconds_per_request"
OP_HIST = "muse_store_op_seconds"
P50_GOAL_S, P99_GOAL_S = 0.002, 0.010
QUOTA = 10**12       # large: every request reserves and settles in the database, none is refused


@dataclass
class ReplicaConfig:
    replicas: int = 2
    streams: int = 32                 # closed-loop clients per server
    duration: float = 20.0
    prompt_len: int = 32
    max_tokens: int = 16
    depth: int = 2
    width: int = 128
    vocab_size: int = 4096
    max_seq_len: int = 256
    threads: int = 1
    engine_process: bool = True
    pg_url: str | None = None         # None: a throwaway cluster in a temporary directory
    skip_baseline: bool = False


# ---- priority ------------------------------------------------------------------------------------------

def share_priority(pid: int) -> None:
    """Give the session of `pid` (a server, the postmaster: each runs in a session of its own) the
    bench's own autogroup nice value. Linux shares CPU between sessions (autogroups); a bench whose
    session was raised to measure on a busy machine would otherwise starve the very servers and
    database it measures. No-op where autogroups do not exist or the value cannot be written."""
    try:
        mine = Path("/proc/self/autogroup").read_text().split("nice")[-1].strip()
        Path(f"/proc/{pid}/autogroup").write_text(mine)
    except (OSError, IndexError):
        pass


# ---- PostgreSQL ----------------------------------------------------------------------------------------

def _pg_bin(name: str) -> str:
    found = shutil.which(name) or (sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [None])[-1]
    if not found:
        raise SystemExit(f"PostgreSQL's {name} is not installed: install postgresql or pass --pg-url")
    return found


class ThrowawayPostgres:
    """initdb + pg_ctl in a temporary directory on a free port (as the `postgres` user when root, which
    PostgreSQL refuses to run as). fsync stays ON: the bench measures the store as it would run."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="muse-bench-pg-"))
        self.port = free_port()
        self._as = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "postgres", "--"]
        self._run([_pg_bin("initdb"), "-D", str(self.root / "data"), "-U", "muse", "-A", "trust", "-E", "UTF8",
                   "--locale=C"])
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run([_pg_bin("pg_ctl"), "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-o", opts,
                   "-w", "start"])
        self.url = f"postgresql://muse@127.0.0.1:{self.port}/postgres"
        share_priority(int((self.root / "data" / "postmaster.pid").read_text().split()[0]))

    def _run(self, cmd):
        subprocess.run(self._as + cmd, check=True, capture_output=True, cwd=self.root, timeout=120)

    def stop(self):
        try:
            self._run([_pg_bin("pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop"])
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


# ---- the round-trip floor ------------------------------------------------------------------------------

# A control measured in the same run: `SELECT 1` every 10 ms from a process that does nothing else, in
# a session of its own at the bench's priority. No store does less per round trip, so its latency is
# what this machine charges for reaching PostgreSQL at that moment (the database's and the caller's
# wake-ups under the load), whatever the store's own work.
PING_SCRIPT = r"""
import json, signal, sys, time
import psycopg
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
lat = []
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    print("ready", flush=True)
    while not stop:
        t0 = time.perf_counter()
        conn.execute("SELECT 1").fetchone()
        lat.append((time.time(), time.perf_counter() - t0))
        time.sleep(0.01)
print(json.dumps(lat))
"""


class RoundTripProbe:
    """PING_SCRIPT in a subprocess, connected when the constructor returns; stop(since, until) -> the
    round trips that started in that window (wall clock): {count, p50_ms, p99_ms, max_ms}."""

    def __init__(self, url: str):
        self.proc = subprocess.Popen([sys.executable, "-c", PING_SCRIPT, url], stdout=subprocess.PIPE,
                                     start_new_session=True)
        share_priority(self.proc.pid)
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the round-trip probe could not connect to PostgreSQL (exit {self.proc.wait()})")

    def stop(self, since: float, until: float) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        lat = sorted(dt for t, dt in json.loads(out or b"[]") if since <= t <= until)
        if not lat:
            return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
        q = lambda p: 1e3 * lat[min(len(lat) - 1, int(p * len(lat)))]  # noqa: E731
        return {"count": len(lat), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": 1e3 * lat[-1]}


# ---- the store's histogram -------------------------------------------------------------------------------

def store_histograms(text: str) -> dict[str, dict[float, float]]:
    """Prometheus text -> {"total": {le: cumulative count} of muse_store_seconds_per_request, and one more
    per operation of muse_store_op_seconds (its `op` label: authenticate, reserve, ledger, ...)}."""
    out: dict[str, dict[float, float]] = {"total": {}}
    for fam in text_string_to_metric_families(text):
        if fam.name in (HIST, OP_HIST):
            for s in fam.samples:
                if s.name == fam.name + "_bucket":
                    op = "total" if fam.name == HIST else s.labels["op"]
                    out.setdefault(op, {})[float(s.labels["le"])] = s.value
    return out


def hist_delta(after: dict, before: dict) -> dict:
    return {le: after[le] - before.get(le, 0.0) for le in after}


def hist_merge(hs: list[dict]) -> dict:
    out: dict[float, float] = {}
    for h in hs:
        for le, v in h.items():
            out[le] = out.get(le, 0.0) + v
    return out


def hist_summary(h: dict) -> dict:
    """count, fraction of requests <= 2 ms and <= 10 ms (exact), and p50/p99 interpolated in their bucket."""
    les = sorted(h)
    total = h.get(float("inf"), 0.0)
    if not total:
        return {"count": 0, "le_2ms": None, "le_10ms": None, "p50_ms": None, "p99_ms": None}

    def quantile(q: float) -> float:
        target, prev_le, prev_c = q * total, 0.0, 0.0
        for le in les:
            if h[le] >= target:
                if le == float("inf"):
                    return prev_le * 1e3  # beyond the last bound: report the bound (a lower bound)
                return 1e3 * (prev_le + (le - prev_le) * (target - prev_c) / max(h[le] - prev_c, 1e-12))
            prev_le, prev_c = le, h[le]
        return prev_le * 1e3

    return {"count": int(total), "le_2ms": h[P50_GOAL_S] / total, "le_10ms": h[P99_GOAL_S] / total,
            "p50_ms": quantile(0.5), "p99_ms": quantile(0.99)}


# ---- phases --------------------------------------------------------------------------------------------

async def _metrics(client: httpx.AsyncClient, server: ServerProcess, admin: dict) -> str:
    return (await client.get(server.url + "/metrics", headers=admin)).text


async def _wait_idle(client, servers, admin, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ms = [parse_metrics(await _metrics(client, s, admin)) for s in servers]
        if all(m.get("muse_running_requests") == 0 and m.get("muse_queue_depth") == 0 for m in ms):
            break
        await asyncio.sleep(0.05)
    for s in servers:  # each flushes its own ledger writer
        await client.get(s.url + "/admin/usage", headers=admin)


def db_checks(db, key_id: str, engines: dict, label: str, pg: bool) -> dict:
    store = open_store(db, create=False)
    try:
        rows = [r for r in store.usage() if r.partner == PARTNER]
        got = {"prompt_tokens": sum(r.prompt_tokens for r in rows),
               "completion_tokens": sum(r.completion_tokens for r in rows)}
        running = sum(r.status == "running" for r in rows)
        checks = {f"{label}: ledger equals the engines' counters": {
            "pass": got == engines, "detail": f"ledger {got}, engines {engines}"},
            f"{label}: nothing left running": {"pass": running == 0, "detail": f"{running} running rows"}}
        if pg:
            holds = store._rows("SELECT COUNT(*) FROM quota_holds")[0][0]
            counted = int(store._rows("SELECT COALESCE(SUM(tokens), 0) FROM quota_usage WHERE owner_id = ?",
                                      (key_id,))[0][0])
            billed = sum(r.total_tokens for r in rows if r.status != "running")
            checks[f"{label}: no quota hold left"] = {"pass": holds == 0, "detail": f"{holds} holds"}
            checks[f"{label}: the quota counter equals the ledger"] = {
                "pass": counted == billed, "detail": f"quota_usage {counted}, ledger {billed}"}
        return checks
    finally:
        store.close()


async def load_phase(servers, key: str, admin: dict, rc: ReplicaConfig, cfg: LoadConfig, vocab: int, tag: str,
                     ping_url: str | None = None):
    limits = httpx.Limits(max_connections=rc.streams * len(servers) + 8, max_keepalive_connections=rc.streams * len(servers) + 8)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0), limits=limits) as http:
        # warm-up: one short request per stream
        await asyncio.gather(*(http_request(http, s.url + "/v1/completions", headers,
                                            make_prompt(cfg, vocab, f"warm{tag}{j}", i, 0), 4)
                               for j, s in enumerate(servers) for i in range(rc.streams)))
        before = [store_histograms(await _metrics(http, s, admin)) for s in servers]

        async def one(j, s):
            return await closed_loop(lambda p: http_request(http, s.url + "/v1/completions", headers, p, rc.max_tokens),
                                     rc.streams, rc.duration, lambda i, k: make_prompt(cfg, vocab, f"{tag}{j}", i, k))

        probe = RoundTripProbe(ping_url) if ping_url else None
        since = time.time()
        try:
            results = await asyncio.gather(*(one(j, s) for j, s in enumerate(servers)))
        finally:
            floor = probe.stop(since, time.time()) if probe else None
        await _wait_idle(http, servers, admin)
        texts = [await _metrics(http, s, admin) for s in servers]
    after = [store_histograms(t) for t in texts]
    ops = sorted({op for h in after for op in h})
    hists = {op: hist_merge([hist_delta(a.get(op, {}), b.get(op, {})) for a, b in zip(after, before)]) for op in ops}
    hist = hists["total"]
    engines = {"prompt_tokens": sum(counter(parse_metrics(t), "muse_engine_prompt_tokens") for t in texts),
               "completion_tokens": sum(counter(parse_metrics(t), "muse_engine_generation_tokens") for t in texts)}
    per = [summarize(rs, wall) for rs, wall in results]
    return {"servers": len(servers), "streams_each": rc.streams, "per_server": per,
            "requests": sum(p["requests"] for p in per), "output_tok_s": sum(p["output_tok_s"] for p in per),
            "errors": {k: sum(p["errors"].get(k, 0) for p in per) for p in per for k in p["errors"]},
            "store": hist_summary(hist), "store_hist": {str(k): v for k, v in hist.items()},
            "store_ops": {op: hist_summary(h) for op, h in hists.items() if op != "total"}, "round_trip": floor,
            "_engines": engines}


async def burst(servers, db, key: str, key_id: str, admin: dict, rc: ReplicaConfig, cfg: LoadConfig, vocab: int) -> dict:
    """Quota = used + 10 requests' worth; 32 requests per replica at once: exactly 10 run."""
    each = rc.prompt_len + rc.max_tokens
    with open_store(db, create=False) as store:
        used = sum(r.total_tokens for r in store.usage(key_id=key_id))
        store.update_key(key_id, token_quota=used + 10 * each)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0),
                                 limits=httpx.Limits(max_connections=32 * len(servers) + 8)) as http:
        res = await asyncio.gather(*(http_request(http, s.url + "/v1/completions", headers,
                                                  make_prompt(cfg, vocab, "burst", j, i), rc.max_tokens)
                                     for j, s in enumerate(servers) for i in range(32)))
        await _wait_idle(http, servers, admin)
    ok = sum(r.error is None for r in res)
    refused = sum(r.error == "429" for r in res)
    with open_store(db, create=False) as store:
        total = sum(r.total_tokens for r in store.usage(key_id=key_id))
    return {"burst: exactly 10 of the requests admitted": {
                "pass": ok == 10 and refused == len(res) - 10,
                "detail": f"{ok} admitted, {refused} refused with 429, of {len(res)}"},
            "burst: the ledger holds exactly the quota": {
                "pass": total == used + 10 * each, "detail": f"ledger {total} tokens, quota {used + 10 * each}"}}


async def _run(rc: ReplicaConfig, workdir: Path, log) -> dict:
    cfg = LoadConfig(concurrency=[rc.streams], duration=rc.duration, prompt_len=rc.prompt_len,
                     max_tokens=rc.max_tokens, threads=rc.threads, depth=rc.depth, width=rc.width,
                     vocab_size=rc.vocab_size, max_seq_len=rc.max_seq_len, engine_process=rc.engine_process)
    ckpt = make_checkpoint(workdir, cfg)
    from muse.tokenizer import Tokenizer

    vocab = Tokenizer.from_file(next(Path(ckpt).rglob("tokenizer.json"))).vocab_size  # BPE may train fewer
    admin_key = "bench-admin-" + os.urandom(16).hex()
    admin = {"Authorization": f"Bearer {admin_key}"}
    phases, checks = {}, {}
    if not rc.skip_baseline:
        db = workdir / "serve.sqlite3"
        with open_store(db) as store:
            key, k = store.create_key(PARTNER, token_quota=QUOTA, period="month")
        server = ServerProcess(ckpt, db, workdir, cfg, admin_key, name="sqlite")
        share_priority(server.proc.pid)
        try:
            await server.wait_healthy(120)
            phases["sqlite"] = await load_phase([server], key, admin, rc, cfg, vocab, "s")
            log(json.dumps({"phase": "sqlite", **phases["sqlite"]["store"]}))
        finally:
            server.stop()
        checks.update(db_checks(db, k.key_id, phases["sqlite"].pop("_engines"), "one server (SQLite)", False))
    pg = None if rc.pg_url else ThrowawayPostgres()
    url = rc.pg_url or pg.url
    try:
        with open_store(url) as store:
            key, k = store.create_key(PARTNER, token_quota=QUOTA, period="month")
        servers = [ServerProcess(ckpt, url, workdir, cfg, admin_key, name=f"r{i}", extra=("--replica-name", f"r{i}"))
                   for i in range(rc.replicas)]
        for s in servers:
            share_priority(s.proc.pid)
        try:
            for s in servers:
                await s.wait_healthy(180)
            phases["postgresql"] = await load_phase(servers, key, admin, rc, cfg, vocab, "p", ping_url=url)
            log(json.dumps({"phase": "postgresql", **phases["postgresql"]["store"]}))
            checks.update(db_checks(url, k.key_id, phases["postgresql"].pop("_engines"),
                                    f"{rc.replicas} replicas (PostgreSQL)", True))
            checks.update(await burst(servers, url, key, k.key_id, admin, rc, cfg, vocab))
        finally:
            codes = [s.stop() for s in servers]
        checks["replicas exited cleanly"] = {"pass": all(c in (0, -signal.SIGTERM) for c in codes),
                                             "detail": f"exit statuses {codes}"}
    finally:
        if pg is not None:
            pg.stop()
    st = phases["postgresql"]["store"]
    checks["store time p50 <= 2 ms (replicas)"] = {"pass": (st["le_2ms"] or 0) >= 0.5,
                                                   "detail": f"{100 * (st['le_2ms'] or 0):.1f}% of requests <= 2 ms"}
    checks["store time p99 <= 10 ms (replicas)"] = {"pass": (st["le_10ms"] or 0) >= 0.99,
                                                    "detail": f"{100 * (st['le_10ms'] or 0):.2f}% of requests <= 10 ms"}
    for ph in phases.values():
        if ph["errors"]:
            checks[f"no request failed ({ph['servers']} server(s))"] = {"pass": False, "detail": str(ph["errors"])}
    return {"phases": phases, "checks": checks}


def run(rc: ReplicaConfig, *, workdir=None, log=None) -> dict:
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    info = machine()
    with tempfile.TemporaryDirectory(prefix="muse-serve-replicas-", dir=workdir) as tmp:
        os.chmod(tmp, 0o755)
        report = asyncio.run(_run(rc, Path(tmp), log))
    info["loadavg_after"] = os.getloadavg()
    report.update(config=asdict(rc), machine=info, passed=all(c["pass"] for c in report["checks"].values()))
    return report


def markdown(report: dict, argv: list[str]) -> str:
    rc, m = report["config"], report["machine"]
    la = lambda t: ", ".join(f"{x:.2f}" for x in t)  # noqa: E731
    lines = [f"Command: `python bench/serve_load.py --replicas {' '.join(argv)}`", "",
             f"Machine: {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, torch {m['torch']}; load average "
             f"{la(m['loadavg_before'])} before, {la(m['loadavg_after'])} after. PostgreSQL "
             f"{'at ' + rc['pg_url'].split('@')[-1] if rc['pg_url'] else 'throwaway cluster on this machine (fsync on)'}.",
             f"Model: random llama depth {rc['depth']}, d_model {rc['width']}; prompts {rc['prompt_len']} random tokens, "
             f"max_tokens {rc['max_tokens']}, ignore_eos, streamed; {rc['duration']:g} s closed loop, "
             f"{rc['streams']} streams per server; every request on a key with a token quota.", "",
             "| store | servers | streams | requests | output tok/s | store ms/request p50 | p99 | <= 2 ms | <= 10 ms | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, ph in report["phases"].items():
        st = ph["store"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        pct = lambda v, d: "-" if v is None else f"{100 * v:.{d}f}%"  # noqa: E731
        lines.append(f"| {name} | {ph['servers']} | {ph['streams_each'] * ph['servers']} | {ph['requests']} | "
                     f"{ph['output_tok_s']:.0f} | {fmt(st['p50_ms'])} | {fmt(st['p99_ms'])} | {pct(st['le_2ms'], 1)} | "
                     f"{pct(st['le_10ms'], 2)} | {ph['errors'] or 0} |")
    lines += ["", "The store's time by operation (per request that made it; ms):", "",
              "| store | operation | requests | p50 | p99 | <= 2 ms |", "|---|---|---:|---:|---:|---:|"]
    for name, ph in report["phases"].items():
        for op, st in ph.get("store_ops", {}).items():
            if st["count"]:
                lines.append(f"| {name} | {op} | {st['count']} | {st['p50_ms']:.2f} | {st['p99_ms']:.2f} | "
                             f"{100 * st['le_2ms']:.1f}% |")
    for name, ph in report["phases"].items():
        rt = ph.get("round_trip")
        if rt and rt["count"]:
            lines += ["", f"Round-trip floor ({name}, the same seconds): `SELECT 1` every 10 ms from an otherwise idle "
                          f"process, {rt['count']} round trips: p50 {rt['p50_ms']:.2f} ms, p99 {rt['p99_ms']:.2f} ms, "
                          f"max {rt['max_ms']:.1f} ms."]
    lines += ["", "Checks:", ""]
    lines += [f"- {'PASS' if c['pass'] else 'FAIL'} {n}: {c['detail']}" for n, c in report["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d = ReplicaConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=d.replicas, help="servers sharing the PostgreSQL database")
    p.add_argument("--streams", type=int, default=d.streams, help="closed-loop streams per server")
    p.add_argument("--duration", type=float, default=d.duration)
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--no-engine-process", dest="engine_process", action="store_false")
    p.add_argument("--pg-url", help="an existing PostgreSQL database (default: a throwaway cluster)")
    p.add_argument("--skip-baseline", action="store_true", help="leave out the one-server SQLite phase")
    p.add_argument("--json-out", metavar="PATH")
    args = p.parse_args(argv)
    rc = ReplicaConfig(**{k: v for k, v in vars(args).items() if k != "json_out"})
    report = run(rc)
    print(markdown(report, argv))
    if args.json_out:
        atomic_write_json(args.json_out, report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
