"""Load test of `muse serve`: streaming clients over HTTP vs the same workload on the engine directly.

One run builds a random llama (--depth/--width) and a BPE tokenizer trained on made-up words, saves
them as a checkpoint, creates an API key in a fresh serving database and starts the real server as a
subprocess (`python -m muse serve CKPT --db DB --port P --max-num-seqs N`, MUSE_ADMIN_KEY set so
/metrics and /admin/usage answer). Then, for each --concurrency C, while the server sits idle:

  engine-direct  C closed-loop clients drive an in-process `ThreadEngineClient` over the same checkpoint,
                 built exactly as `muse serve` builds its engine (same EngineConfig, same device,
                 same torch threads): no HTTP, no JSON, no detokenizing, no keys or ledger;
  http           C closed-loop clients (asyncio + httpx, streaming SSE, keep-alive connections) send
                 POST /v1/completions to the server on loopback.

Closed loop: each client sends its next request the moment the previous one finished, for
--duration seconds; requests running at the deadline finish and count. Every request is a fresh
random token-id prompt of --prompt-len tokens (no prefix-cache hits), greedy, `ignore_eos` and a
fixed --max-tokens, so every request generates exactly max_tokens in both modes; HTTP requests ask
for `stream_options.include_usage` and their token count is the usage chunk's.

Metrics follow vLLM's benchmark_serving: TTFT = request sent -> first chunk with content;
TPOT = (latency - TTFT) / (output tokens - 1) per request; ITL = the gaps between content chunks
(one chunk per engine step that produced text; a token that ends inside a UTF-8 character adds no
chunk); latency = request sent -> end of stream. Output tok/s = output tokens of completed requests /
(first request sent -> last request done). Errors are counted by HTTP status, "stream_error" (an
error event mid-stream), "incomplete" (no [DONE]), "short" (fewer than max_tokens), or the
exception's name.

After each level the server is checked: every KV block free (muse_kv_cache_free_blocks = the pool
size from the server's start-up log line) and the ledger's token sums (/admin/usage, which flushes
the ledger first) equal to the engine's counters (muse_engine_prompt_tokens /
muse_engine_generation_tokens) exactly; after shutdown, the database file itself has one row per
request sent and the same sums. Any FAIL makes the exit status 1.

Where the CPU went (Linux, from /proc/PID/task/TID/schedstat): cores kept busy by the engine's
thread(s), the server's event loop (the HTTP layer: cProfile it with --profile-server) and the
clients, with CPU ms per output token; and for the engine's loop thread the fraction of the run it
was running, runnable but waiting for a CPU (an oversubscribed machine), or blocked (the GIL, or no
work). These say whether a ratio below 1 is the HTTP layer's CPU, the GIL, or a busy machine.

CPU budget: the server runs in its own session (setsid). Linux's autogroup scheduling (on by default
on desktop and many server kernels) shares CPU fairly between sessions, not threads, so on a busy
machine engine-direct's process and the server each get one session's share, and the clients' CPU
comes out of the bench's own share, as if they ran on another machine. --same-session puts the
server in the bench's session instead: the clients' parsing then competes with the server for one
budget, which on a small busy machine costs the HTTP side a lot more than the HTTP layer itself does.

Threads: `muse serve` has no thread flag, so the server gets OMP_NUM_THREADS=MKL_NUM_THREADS=--threads
(torch takes its intra-op thread count from them) and the bench process calls torch.set_num_threads.
The clients run in the bench process; on a small machine they take CPU the server could have used.

  python bench/serve_load.py                                      # 1, 8, 32 streams, 15 s each
  python bench/serve_load.py --concurrency 32 --duration 30 --json-out serve.json
  python bench/serve_load.py --profile-server server.prof         # CPU profile of the server's event loop
  python bench/serve_load.py --soak 120                           # hostile soak: bench/serve_soak.py
  python bench/serve_load.py --replicas --streams 32              # 2 replicas on PostgreSQL: serve_replicas.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

import httpx  # noqa: E402
import torch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from muse.checkpoint import resolve_stage, save_checkpoint  # noqa: E402  (resolve_stage: as `muse serve` picks)
from muse.common.device import pick_device  # noqa: E402
from muse.common.paths import atomic_write_json  # noqa: E402
from muse.infer.client import EngineClient, ThreadEngineClient  # noqa: E402
from muse.infer.engine import Engine, EngineConfig  # noqa: E402
from muse.infer.sampling_params import SamplingParams  # noqa: E402
from muse.model import ModelConfig, build_model  # noqa: E402
from muse.server.store import Store  # noqa: E402
from muse.tokenizer import train_bpe  # noqa: E402
from muse.tokenizer.special import SPECIAL_IDS  # noqa: E402

MODEL_NAME = "bench"
PARTNER = "bench"
PERCENTILES = (50, 90, 99)
PROFILED_SERVER = """
import cProfile, sys, time
from muse.cli.main import main
prof = cProfile.Profile(time.thread_time)
prof.enable()
try:
    main(sys.argv[1:])
finally:
    prof.disable()
    prof.dump_stats({path})
"""


@dataclass
class LoadConfig:
    """One run's settings; `main()` maps the flags onto these one to one."""

    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    duration: float = 15.0                # seconds of closed-loop load per level and mode
    prompt_len: int = 128
    max_tokens: int = 64
    threads: int = 1                      # torch intra-op threads, server and engine-direct alike
    depth: int = 4
    width: int = 256
    vocab_size: int = 4096
    max_seq_len: int = 512
    max_num_seqs: int | None = None       # None: the largest concurrency
    device: str = "cpu"
    seed: int = 0
    warmup: bool = True                   # one short wave per level and mode before timing
    same_session: bool = False            # run the server in the bench's session (shares its CPU budget)
    engine_process: bool = True           # `muse serve`'s default; False: --no-engine-process (engine thread)
    profile_server: str | None = None     # run the server under cProfile, writing here at shutdown
    server_timeout: float = 120.0         # seconds to wait for /health


@dataclass
class RequestResult:
    ttft: float | None = None             # seconds
    latency: float | None = None
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None


# ---- the model, checkpoint and server ---------------------------------------------------------------

def make_checkpoint(root: Path, cfg: LoadConfig) -> Path:
    """A random llama and a BPE of cfg.vocab_size ids trained on made-up words, saved under root/run."""
    rng = random.Random(cfg.seed)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiou"] + ["th", "sh", "ch", "qu", "ng"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    texts = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(300)]
    tok = train_bpe(texts, vocab_size=cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    mcfg = ModelConfig.from_depth(cfg.depth, tok.vocab_size, d_model=cfg.width, max_seq_len=cfg.max_seq_len)
    model = build_model(mcfg).eval()
    return save_checkpoint(root / "run" / "base", 1, model=model, tokenizer=tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m muse serve` in a subprocess, its log in a file; `url`, `num_blocks`, `stop()`."""

    def __init__(self, ckpt: Path, db: Path | str, workdir: Path, cfg: LoadConfig, admin_key: str, *,
                 name: str = "server", extra: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        env = {**os.environ, "MUSE_ADMIN_KEY": admin_key, "OMP_NUM_THREADS": str(cfg.threads),
               "MKL_NUM_THREADS": str(cfg.threads), "MUSE_LOG_LEVEL": "INFO", "MUSE_NO_PROGRESS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
        # profiled: cProfile with a CPU-time clock on the main thread only, i.e. the event loop (the HTTP
        # layer); a wall clock would bill it for epoll's idle waits and for waiting on the GIL
        run = (["-c", PROFILED_SERVER.format(path=repr(cfg.profile_server))] if cfg.profile_server
               else ["-m", "muse"])
        cmd = [sys.executable, *run, "serve", str(ckpt), "--name", MODEL_NAME, "--db", str(db),
               "--port", str(self.port), "--device", cfg.device, "--max-num-seqs", str(max_num_seqs(cfg)),
               "--log-level", "warning", "--grace", "5", "--engine-process" if cfg.engine_process else "--no-engine-process",
               *extra]
        self._log = open(self.log_path, "wb")
        # its own session, unless asked otherwise: see "CPU budget" in the module docstring
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=not cfg.same_session)
        self.num_blocks: int | None = None
        self.profiled = bool(cfg.profile_server)

    def log_tail(self, n: int = 20) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    async def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if (await c.get(self.url + "/health", timeout=2)).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s:\n"
                                       f"{self.log_tail()}")
                await asyncio.sleep(0.1)
        # "model bench: ... context 512, 2048 KV blocks" (muse.cli.serve's start-up line)
        m = re.search(rf"model {MODEL_NAME}: .* context \d+, (\d+) KV blocks", self.log_path.read_text())
        self.num_blocks = int(m.group(1)) if m else None

    def stop(self) -> int:
        """SIGTERM (graceful: the ledger is flushed), then SIGKILL if it hangs; the exit status.

        uvicorn re-raises the signal it caught once its graceful shutdown is done, so a clean exit
        reads -SIGTERM here, not 0. A profiled server gets SIGINT instead: re-raised, that is a
        KeyboardInterrupt, which lets cProfile write its file on the way out."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if self.profiled else signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def max_num_seqs(cfg: LoadConfig) -> int:
    return cfg.max_num_seqs or max(cfg.concurrency)


# ---- clients -------------------------------------------------------------------------------------------

def make_prompt(cfg: LoadConfig, vocab: int, tag: str, client: int, index: int) -> list[int]:
    """The same prompt for the same (tag, client, index) in both modes; distinct otherwise."""
    rng = random.Random(f"{cfg.seed}-{tag}-{client}-{index}")
    lo = len(SPECIAL_IDS)  # special tokens (ids 0..15) stay out of prompts
    return [rng.randrange(lo, vocab) for _ in range(cfg.prompt_len)]


async def closed_loop(send, concurrency: int, duration: float, prompt) -> tuple[list[RequestResult], float]:
    """`concurrency` clients, each awaiting `send(prompt(client, i))` back to back until the deadline."""
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def client(i: int) -> list[RequestResult]:
        out = []
        while time.perf_counter() < deadline:
            out.append(await send(prompt(i, len(out))))
        return out

    lists = await asyncio.gather(*(client(i) for i in range(concurrency)))
    return [r for rs in lists for r in rs], time.perf_counter() - t0


async def one_wave(send, concurrency: int, prompt) -> list[RequestResult]:
    """One request per client, all at once (the warm-up)."""
    return list(await asyncio.gather(*(send(prompt(i, 0)) for i in range(concurrency))))


async def engine_request(client: EngineClient, prompt: list[int], params: SamplingParams) -> RequestResult:
    r = RequestResult()
    t0 = last = time.perf_counter()
    try:
        async for out in client.add_request(prompt, params):
            o = out.outputs[0]
            if o.new_token_ids:
                now = time.perf_counter()
                if r.ttft is None:
                    r.ttft = now - t0
                else:
                    r.itl.append(now - last)
                last = now
            if out.finished:
                r.output_tokens = len(o.token_ids)
    except Exception as e:  # noqa: BLE001 - counted, not raised: one bad request must not end the run
        r.error = type(e).__name__
    r.latency = time.perf_counter() - t0
    if r.error is None and r.output_tokens != params.max_tokens:
        r.error = "short"
    return r


async def http_request(client: httpx.AsyncClient, url: str, headers: dict, prompt: list[int],
                       max_tokens: int) -> RequestResult:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    r = RequestResult()
    t0 = last = time.perf_counter()
    done = False
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                await resp.aread()
                r.error = str(resp.status_code)
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    r.error = "stream_error"
                    continue
                if obj.get("usage"):
                    r.output_tokens = obj["usage"]["completion_tokens"]
                if any(ch.get("text") for ch in obj.get("choices", ())):
                    now = time.perf_counter()
                    if r.ttft is None:
                        r.ttft = now - t0
                    else:
                        r.itl.append(now - last)
                    last = now
    except Exception as e:  # noqa: BLE001 - counted, not raised
        r.error = type(e).__name__
    r.latency = time.perf_counter() - t0
    if r.error is None and not done:
        r.error = "incomplete"
    if r.error is None and r.output_tokens != max_tokens:
        r.error = "short"
    return r


# ---- summaries -------------------------------------------------------------------------------------------

def percentiles(xs: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 in milliseconds, linear interpolation (numpy's default, as benchmark_serving)."""
    if not xs:
        return {f"p{p}": None for p in PERCENTILES}
    s = sorted(xs)
    out = {}
    for p in PERCENTILES:
        k = (len(s) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(s) - 1)
        out[f"p{p}"] = 1e3 * (s[lo] + (s[hi] - s[lo]) * (k - lo))
    return out


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "output_tokens": tokens, "wall_s": wall,
        "output_tok_s": tokens / wall if wall > 0 else 0.0,
        "requests_s": len(ok) / wall if wall > 0 else 0.0,
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": percentiles([(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
                                if r.ttft is not None and r.output_tokens > 1]),
        "itl_ms": percentiles([g for r in ok for g in r.itl]),
        "latency_ms": percentiles([r.latency for r in ok]),
        "errors": dict(Counter(r.error for r in results if r.error is not None)),
    }


def thread_times(pid: int, children: bool = False) -> dict[int, tuple[float, float]]:
    """(CPU seconds, seconds runnable but waiting for a CPU) of each thread of `pid`, and with `children`
    of its child processes too (`muse serve`'s engine process), by thread id, from
    /proc/PID/task/TID/schedstat; {} where /proc is missing."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            cpu_ns, wait_ns = (task / "schedstat").read_text().split()[:2]
            kids = (task / "children").read_text().split() if children else []
        except (OSError, ValueError):  # the thread ended meanwhile, or no schedstats in this kernel
            continue
        out[int(task.name)] = (int(cpu_ns) / 1e9, int(wait_ns) / 1e9)
        for kid in kids:
            out.update(thread_times(int(kid), children=True))
    return out


class CpuMeter:
    """Where the threads of process `pid` (and with `children`, of its child processes: the engine
    process of `muse serve`) spent a run, as fractions of its wall time.

    "main": the main thread's CPU (the server's event loop, i.e. the HTTP layer; or engine-direct's
    consumers); "other": every other thread's CPU (the engine's loop thread doing schedule -> execute
    -> update, in the server's engine process by default; intra-op workers with more than one torch
    thread; the engine process's reader thread and the ledger writer); "engine": the busiest other
    thread (the engine's loop thread) and "engine_runq" the time it was runnable but
    waiting for a CPU. The rest of the engine thread's time it was blocked: waiting for the GIL, or
    idle with no request to run.
    """

    def __init__(self, pid: int, children: bool = False):
        self.pid, self.children = pid, children
        self.t0, self.start = time.perf_counter(), thread_times(pid, children)

    def stop(self) -> dict[str, float]:
        end, wall = thread_times(self.pid, self.children), time.perf_counter() - self.t0
        used = {tid: (cpu - self.start.get(tid, (0.0, 0.0))[0], wait - self.start.get(tid, (0.0, 0.0))[1])
                for tid, (cpu, wait) in end.items()}
        main = used.pop(self.pid, (0.0, 0.0))
        engine = max(used.values(), default=(0.0, 0.0))
        return {"main": main[0] / wall, "other": sum(c for c, _ in used.values()) / wall,
                "engine": engine[0] / wall, "engine_runq": engine[1] / wall}


# ---- server checks -----------------------------------------------------------------------------------------

def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value} for the bench model's samples (and unlabelled ones)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("model", MODEL_NAME) == MODEL_NAME and set(s.labels) <= {"model"}:
                out[s.name] = s.value
    return out


def counter(m: dict[str, float], name: str) -> int:
    return int(m.get(name + "_total", m.get(name, -1)))


async def server_steps(client: httpx.AsyncClient, server: ServerProcess, admin: dict) -> int:
    """Engine steps the server's engine has run so far (/metrics)."""
    return counter(parse_metrics((await client.get(server.url + "/metrics", headers=admin)).text), "muse_engine_steps")


async def check_server(client: httpx.AsyncClient, server: ServerProcess, admin: dict, num_blocks: int,
                       timeout: float = 5.0) -> dict:
    """Idle server: every KV block free, ledger token sums == the engine's counters."""
    deadline = time.monotonic() + timeout
    while True:  # every client has its [DONE]; the engine's stats snapshot may lag a step behind
        m = parse_metrics((await client.get(server.url + "/metrics", headers=admin)).text)
        idle = m.get("muse_running_requests") == 0 and m.get("muse_queue_depth") == 0
        if (idle and m.get("muse_kv_cache_free_blocks") == num_blocks) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    usage = (await client.get(server.url + "/admin/usage", headers=admin)).json()["data"]
    ledger = {k: sum(g[k] for g in usage) for k in ("requests", "prompt_tokens", "completion_tokens")}
    engine = {"prompt_tokens": counter(m, "muse_engine_prompt_tokens"),
              "completion_tokens": counter(m, "muse_engine_generation_tokens")}
    free = int(m.get("muse_kv_cache_free_blocks", -1))
    return {
        "kv_blocks_free": {"pass": free == num_blocks, "detail": f"{free} of {num_blocks} blocks free"},
        "ledger_equals_engine": {
            "pass": all(ledger[k] == engine[k] for k in engine),
            "detail": (f"ledger prompt {ledger['prompt_tokens']} / completion {ledger['completion_tokens']}; "
                       f"engine prompt {engine['prompt_tokens']} / generation {engine['completion_tokens']}")},
        "_ledger": ledger, "_engine": engine,
    }


def check_db(db: Path, engine_counts: dict, sent: int) -> dict:
    """After shutdown: the database file has one row per request sent and the engine's token sums."""
    store = Store(db, create=False)
    try:
        rows = store.usage_summary(partner=PARTNER)
    finally:
        store.close()
    got = {k: sum(g[k] for g in rows) for k in ("requests", "prompt_tokens", "completion_tokens")}
    ok = got["requests"] == sent and all(got[k] == engine_counts[k] for k in engine_counts)
    return {"pass": ok, "detail": f"{got['requests']} rows for {sent} requests sent; prompt {got['prompt_tokens']}, "
                                  f"completion {got['completion_tokens']} (engine {engine_counts['prompt_tokens']}, "
                                  f"{engine_counts['completion_tokens']})"}


# ---- the run ----------------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "loadavg_before": os.getloadavg()}


async def _run(cfg: LoadConfig, workdir: Path, log) -> dict:
    device = pick_device(cfg.device)
    ckpt = make_checkpoint(workdir, cfg)
    db = workdir / "serve.sqlite3"
    store = Store(db)
    key, _ = store.create_key(PARTNER)
    store.close()
    admin_key = "bench-admin-" + os.urandom(16).hex()
    admin = {"Authorization": f"Bearer {admin_key}"}

    # the engine exactly as `muse serve` builds it (muse.cli.serve.run)
    engine = Engine.from_checkpoint(resolve_stage(ckpt, fast=True), EngineConfig(max_num_seqs=max_num_seqs(cfg)),
                                    device=device)
    vocab = engine.tokenizer.vocab_size
    direct = ThreadEngineClient(engine)
    server = ServerProcess(ckpt, db, workdir, cfg, admin_key)
    rows, checks, sent = [], {}, 0
    limits = httpx.Limits(max_connections=max(cfg.concurrency) + 4, max_keepalive_connections=max(cfg.concurrency) + 4)
    try:
        await server.wait_healthy(cfg.server_timeout)
        num_blocks = server.num_blocks
        if num_blocks is None:
            log("could not read the pool size from the server's log; using engine-direct's (same config)")
            num_blocks = engine.num_blocks
        elif num_blocks != engine.num_blocks:
            log(f"the server has {num_blocks} KV blocks, engine-direct {engine.num_blocks}: not the same engine!")
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0, ignore_eos=True)
        short = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        url = server.url + "/v1/completions"
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0), limits=limits) as http:
            for c in cfg.concurrency:
                def prompt(tag, c=c):
                    return lambda i, j: make_prompt(cfg, vocab, f"{tag}{c}", i, j)

                def engine_send(p):
                    return engine_request(direct, p, params)

                def http_send(p):
                    return http_request(http, url, headers, p, cfg.max_tokens)

                if cfg.warmup:  # one wave of short requests: allocator, attention shapes, connections
                    await one_wave(lambda p: engine_request(direct, p, short), c, prompt("warm-e"))
                meter, steps0 = CpuMeter(os.getpid()), direct.stats().num_steps
                eng_results, eng_wall = await closed_loop(engine_send, c, cfg.duration, prompt("run"))
                eng_cpu, eng_steps = meter.stop(), direct.stats().num_steps - steps0
                eng = summarize(eng_results, eng_wall)
                log(json.dumps({"mode": "engine-direct", "concurrency": c, **eng}))
                if cfg.warmup:
                    warm = await one_wave(lambda p: http_request(http, url, headers, p, 4), c, prompt("warm-h"))
                    sent += len(warm)
                steps0 = await server_steps(http, server, admin)
                meter, server_meter = CpuMeter(os.getpid()), CpuMeter(server.proc.pid, children=True)
                http_results, http_wall = await closed_loop(http_send, c, cfg.duration, prompt("run"))
                client_cpu, server_cpu = meter.stop(), server_meter.stop()
                http_steps = await server_steps(http, server, admin) - steps0
                sent += len(http_results)
                hs = summarize(http_results, http_wall)
                log(json.dumps({"mode": "http", "concurrency": c, **hs}))
                cpu = {"engine-direct": {"engine_threads": eng_cpu["other"], "consumers_loop": eng_cpu["main"],
                                         "engine_thread": eng_cpu["engine"], "engine_thread_runq": eng_cpu["engine_runq"]},
                       "http": {"server_engine_threads": server_cpu["other"], "server_event_loop": server_cpu["main"],
                                "engine_thread": server_cpu["engine"], "engine_thread_runq": server_cpu["engine_runq"],
                                "clients": client_cpu["main"] + client_cpu["other"]}}
                # engine steps each mode ran: output tokens per step says how full its batches were
                hs["engine_steps"], eng["engine_steps"] = http_steps, eng_steps
                rows.append({"concurrency": c, "http": hs, "engine": eng, "cpu_cores": cpu,
                             "ratio": hs["output_tok_s"] / eng["output_tok_s"] if eng["output_tok_s"] else 0.0})
                level = await check_server(http, server, admin, num_blocks)
                for name in ("kv_blocks_free", "ledger_equals_engine"):
                    checks[f"{name} after {c} streams"] = level[name]
                engine_counts = level["_engine"]
        checks["engine-direct: every KV block free"] = {
            "pass": engine.scheduler.kv.num_free_blocks == engine.num_blocks,
            "detail": f"{engine.scheduler.kv.num_free_blocks} of {engine.num_blocks} blocks free"}
    finally:
        code = server.stop()
        await direct.shutdown()
    tb = "Traceback" in server.log_path.read_text(errors="replace")
    checks["server exited cleanly"] = {"pass": code in (0, -signal.SIGTERM) and not tb,
                                       "detail": f"exit status {code}" + (", a traceback in its log" if tb else "")}
    if rows:
        checks["ledger file after shutdown"] = check_db(db, engine_counts, sent)
    return {"rows": rows, "checks": checks, "num_blocks": num_blocks,
            "model": {"depth": cfg.depth, "width": cfg.width, "vocab": vocab, "max_seq_len": cfg.max_seq_len,
                      "params": sum(p.numel() for p in engine.model.parameters())}}


def run_load(cfg: LoadConfig, *, workdir: str | os.PathLike | None = None, log=None) -> dict:
    """Run the whole benchmark; a report dict with "rows", "checks", "passed", "config", "machine".

    Sets torch's thread count to cfg.threads for the run and restores it afterwards.
    """
    if cfg.max_tokens < 2 or cfg.prompt_len < 1 or cfg.duration < 0 or not cfg.concurrency:
        raise ValueError("need max_tokens >= 2 (TPOT needs two tokens), prompt_len >= 1, duration >= 0 "
                         "and at least one concurrency")
    if cfg.prompt_len + cfg.max_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt_len + max_tokens ({cfg.prompt_len + cfg.max_tokens}) is longer than "
                         f"max_seq_len ({cfg.max_seq_len}); raise --max-seq-len")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    info = machine()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="muse-serve-load-", dir=workdir) as tmp:
            report = asyncio.run(_run(cfg, Path(tmp), log))
    finally:
        torch.set_num_threads(threads)
    info["loadavg_after"] = os.getloadavg()
    report.update(config=asdict(cfg), machine=info, passed=all(c["pass"] for c in report["checks"].values()))
    return report


def _pcts(d: dict) -> str:
    return " / ".join("-" if d[k] is None else f"{d[k]:.0f}" if d[k] >= 10 else f"{d[k]:.1f}" for k in d)


def markdown(report: dict, argv: list[str]) -> str:
    cfg, mach, mod = report["config"], report["machine"], report["model"]
    la = lambda t: ", ".join(f"{x:.2f}" for x in t)  # noqa: E731
    lines = [f"Command: `python bench/serve_load.py {' '.join(argv)}`", "",
             f"Machine: {mach['cpus']} CPUs ({mach['cpu']}), Python {mach['python']}, torch {mach['torch']}, "
             f"{cfg['threads']} torch thread(s) in the server and engine-direct; load average {la(mach['loadavg_before'])} "
             f"before, {la(mach['loadavg_after'])} after.",
             f"Model: random llama, depth {mod['depth']}, d_model {mod['width']}, vocab {mod['vocab']}, "
             f"max_seq_len {mod['max_seq_len']} ({mod['params'] / 1e6:.1f}M params), {cfg['device']}; "
             f"max_num_seqs {cfg['max_num_seqs'] or max(cfg['concurrency'])}, {report['num_blocks']} KV blocks; "
             f"prompts {cfg['prompt_len']} random tokens, max_tokens {cfg['max_tokens']}, greedy, ignore_eos; "
             f"{cfg['duration']:g} s closed loop per level and mode; server in "
             f"{'the bench' if cfg['same_session'] else 'its own'} session, its engine "
             f"{'in a process of its own' if cfg.get('engine_process', True) else 'in a thread (--no-engine-process)'}.", "",
             "| streams | requests | HTTP tok/s | engine-direct tok/s | HTTP / engine | TTFT p50/p90/p99 ms "
             "| TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        h, e = r["http"], r["engine"]
        errs = ", ".join(f"{k}: {v}" for k, v in h["errors"].items()) or "0"
        lines.append(f"| {r['concurrency']} | {h['requests']} | {h['output_tok_s']:.0f} | {e['output_tok_s']:.0f} "
                     f"| **{r['ratio']:.2f}** | {_pcts(h['ttft_ms'])} | {_pcts(h['tpot_ms'])} | {_pcts(h['itl_ms'])} "
                     f"| {errs} |")
    lines += ["", "Engine-direct, same workload (no HTTP):", "",
              "| streams | requests | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms | errors |",
              "|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        e = r["engine"]
        errs = ", ".join(f"{k}: {v}" for k, v in e["errors"].items()) or "0"
        lines.append(f"| {r['concurrency']} | {e['requests']} | {_pcts(e['ttft_ms'])} | {_pcts(e['tpot_ms'])} "
                     f"| {_pcts(e['itl_ms'])} | {errs} |")
    lines += ["", "CPU during the timed runs (from /proc): cores kept busy (thread CPU time / wall time), in "
              "brackets CPU ms per output token:", "",
              "| streams | engine-direct: engine thread(s) | engine-direct: consumers' loop | HTTP: server engine "
              "thread(s) | HTTP: server event loop | HTTP: clients (bench process) |", "|---:|---:|---:|---:|---:|---:|"]

    def cell(cores: float, tok_s: float) -> str:
        return f"{cores:.2f} ({1e3 * cores / tok_s:.2f})" if tok_s else f"{cores:.2f}"

    for r in report["rows"]:
        e, h = r["cpu_cores"]["engine-direct"], r["cpu_cores"]["http"]
        et, ht = r["engine"]["output_tok_s"], r["http"]["output_tok_s"]
        lines.append(f"| {r['concurrency']} | {cell(e['engine_threads'], et)} | {cell(e['consumers_loop'], et)} "
                     f"| {cell(h['server_engine_threads'], ht)} | {cell(h['server_event_loop'], ht)} "
                     f"| {cell(h['clients'], ht)} |")
    lines += ["", "The engine's loop thread, fractions of the run's wall time: running / runnable but waiting for a "
              "CPU / blocked (on the GIL, or idle without requests):", "",
              "| streams | engine-direct | HTTP server |", "|---:|---:|---:|"]
    for r in report["rows"]:
        parts = []
        for mode in ("engine-direct", "http"):
            x = r["cpu_cores"][mode]
            blocked = max(0.0, 1.0 - x["engine_thread"] - x["engine_thread_runq"])
            parts.append(f"{x['engine_thread']:.2f} / {x['engine_thread_runq']:.2f} / {blocked:.2f}")
        lines.append(f"| {r['concurrency']} | {parts[0]} | {parts[1]} |")
    lines += ["", "Engine steps during the timed runs, and output tokens per step (how full the batches were):", "",
              "| streams | engine-direct steps | tokens / step | HTTP steps | tokens / step |", "|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        e, h = r["engine"], r["http"]
        lines.append(f"| {r['concurrency']} | {e['engine_steps']} | {e['output_tokens'] / max(e['engine_steps'], 1):.1f} "
                     f"| {h['engine_steps']} | {h['output_tokens'] / max(h['engine_steps'], 1):.1f} |")
    lines += ["", "Checks:", ""]
    lines += [f"- {'PASS' if c['pass'] else 'FAIL'} {name}: {c['detail']}" for name, c in report["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--soak"]:  # the hostile-traffic soak lives in serve_soak.py (it reuses this file's server)
        import serve_soak

        return serve_soak.main(["--duration", *argv[1:2], *argv[2:]] if argv[1:2] else argv[1:])
    if argv[:1] == ["--replicas"]:  # replicas on one PostgreSQL database: serve_replicas.py (this file's pieces)
        import serve_replicas

        return serve_replicas.main(argv[1:])
    d = LoadConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=d.concurrency, help="streams per level")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of load per level and mode")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len, help="tokens per prompt (random ids)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens each request generates")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (server and engine-direct)")
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--width", type=int, default=d.width, help="d_model")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine batch (default: the largest concurrency)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--same-session", action="store_true",
                   help="keep the server in the bench's session (one CPU budget for server and clients)")
    p.add_argument("--no-engine-process", dest="engine_process", action="store_false",
                   help="serve with the engine in a thread of the server (muse serve --no-engine-process)")
    p.add_argument("--profile-server", metavar="PATH", help="profile the server's main thread (the event loop, "
                   "i.e. the HTTP layer) with cProfile on a CPU-time clock and write the stats here")
    p.add_argument("--json-out", metavar="PATH", help="write the whole report as JSON")
    args = p.parse_args(argv)
    cfg = LoadConfig(**{k: v for k, v in vars(args).items() if k != "json_out"})
    if cfg.profile_server:
        cfg.profile_server = str(Path(cfg.profile_server).resolve())
    report = run_load(cfg)
    print(markdown(report, argv))
    if args.json_out:
        atomic_write_json(args.json_out, report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
