"""Serve checkpoints over an OpenAI-compatible HTTP API, for partners holding API keys.

Every route except /health needs a key made with `muse keys create`; /metrics and /admin/* need the
admin key (MUSE_ADMIN_KEY, or --admin-key-file). Each request is checked against its key's models,
rate limits and token quota and leaves exactly one row in the usage ledger (`muse usage`). On
SIGTERM or Ctrl-C the server stops admitting, gives running requests --grace seconds, aborts the
rest and flushes the ledger. Routes and error codes: docs/serving.md.

One server keeps keys and ledger in an SQLite file. Several replicas behind a load balancer share a
PostgreSQL database (--db postgresql://...): each has a --replica-name, quotas are exact across them,
and the ledger, `muse usage` and the operator's pages cover every replica (docs/serving.md).
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

EXAMPLES = """examples:
  muse keys create --partner acme --rpm 60          # prints a key once
  muse serve runs/speedrun --port 8000
  muse serve runs/big --name big --model small=runs/small --max-num-seqs 128
  muse serve runs/speedrun --db postgresql://muse@db/muse --replica-name gpu0 --port 8000   # one of N replicas
  curl localhost:8000/v1/chat/completions -H "Authorization: Bearer $KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{"model": "speedrun", "messages": [{"role": "user", "content": "Speak, friend."}]}'
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run, stage or checkpoint directory of the first (default) model")
    p.add_argument("--stage", help="which stage of a run directory to serve (base, sft, dpo, grpo, ...; default: "
                                   "the stage trained last, docs/checkpoints.md); applies to every model")
    p.add_argument("--name", help="its model name in the API (default: the run directory's name)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=CKPT",
                   help="serve another model under NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", metavar="PATH|URL", help="keys and ledger: an SQLite file for one server, or a "
                                                    "postgresql://USER@HOST/DB URL shared by several replicas "
                                                    "(default $MUSE_SERVE_DB, else $MUSE_HOME/serve.sqlite3)")
    p.add_argument("--replica-name", metavar="NAME",
                   help="this server's name among the replicas of one PostgreSQL database: it labels ledger rows "
                        "and metrics, and holds a lease no other live replica may share (default HOSTNAME-PORT)")
    p.add_argument("--lease", type=float, default=None, metavar="S",
                   help="PostgreSQL store: seconds a dead replica's quota holds keep counting before they are "
                        "released and its running requests settled (default 15)")
    p.add_argument("--admin-key-file", metavar="PATH",
                   help="file holding the admin key (default: the MUSE_ADMIN_KEY environment variable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps, auto (default)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences each engine generates at once")
    p.add_argument("--max-model-len", type=int, help="context per request (default: the model's)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=os.name == "posix",
                   help="run each engine in a process of its own (default on POSIX), so that HTTP work and the "
                        "engine's Python code use two cores instead of sharing one GIL; --no-engine-process "
                        "runs it in a thread of the server")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--max-tokens", type=int, help="cap on a request's max_tokens (default: the context)")
    p.add_argument("--max-n", type=int, default=16, help="cap on the sequences one request generates (prompts x n)")
    p.add_argument("--max-logprobs", type=int, default=20, help="cap on logprobs / top_logprobs")
    p.add_argument("--max-running", type=int, default=256, help="sequences generating at once (a request holds prompts x n)")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="sequences queued for admission beyond --max-running; more get 503")
    p.add_argument("--docs", action="store_true",
                   help="serve /docs and /openapi.json without the admin key (default: /openapi.json needs it)")
    p.add_argument("--no-ui", dest="ui", action="store_false",
                   help="leave out the web pages at /ui/ (playground, usage, operator; docs/web.md)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds running requests get at shutdown")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _admin_key(args) -> str | None:
    from muse.common.errors import UsageError

    if args.admin_key_file:
        path = Path(args.admin_key_file)
        if not path.is_file():
            raise UsageError(f"--admin-key-file {path} does not exist")
        key = path.read_text().strip()
    else:
        key = os.environ.get("MUSE_ADMIN_KEY", "").strip() or None
    if key is not None and len(key) < 24:
        raise UsageError("the admin key is shorter than 24 characters; use a long random one "
                         "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return key


def _models(args) -> list[tuple[str, str]]:
    from muse.common.errors import UsageError

    first = Path(args.checkpoint)
    pairs = [(args.name or first.resolve().name, args.checkpoint)]
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--model {spec!r}: expected NAME=CHECKPOINT")
        pairs.append((name, path))
    names = [n for n, _ in pairs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UsageError(f"two models are named {dup!r}; give each a distinct --name / NAME=")
    return pairs


def run(args) -> int:
    from muse.common.errors import UsageError

    for flag in ("max_num_seqs", "max_body_bytes", "max_n", "max_running", "port"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    if args.max_waiting < 0 or args.max_logprobs < 0 or args.grace < 0:
        raise UsageError("--max-waiting, --max-logprobs and --grace must be >= 0")
    admin_key = _admin_key(args)
    pairs = _models(args)

    import uvicorn

    from muse.checkpoint import resolve_stage
    from muse.common.device import pick_device
    from muse.common.logging import get_logger
    from muse.infer.engine import Engine, EngineConfig
    from muse.infer.engine_process import EngineSpec
    from muse.server.app import ServedModel, ServerConfig, create_app, drain
    from muse.server.store import default_db_path, open_store, url_scheme

    log = get_logger("muse.server")
    db = args.db or default_db_path()  # a string as given: Path() would fold a URL's "//" and hide it
    shared = url_scheme(db) is not None
    if not shared and (args.replica_name or args.lease is not None):
        raise UsageError("--replica-name and --lease are for replicas sharing a PostgreSQL database "
                         "(--db postgresql://...); one server on an SQLite file needs neither")
    if args.lease is not None and not args.lease > 0:
        raise UsageError(f"--lease must be positive seconds, got {args.lease}")
    replica = (args.replica_name or f"{socket.gethostname()}-{args.port}") if shared else None
    if replica is not None and (len(replica) > 64 or not replica.isprintable() or not replica.strip()):
        raise UsageError("--replica-name must be a short printable name (at most 64 characters), e.g. gpu0")
    store = open_store(db, replica=replica, **({} if args.lease is None else {"lease_s": args.lease}))
    try:
        store.lock_for_server()
        recovered = store.recover_interrupted()
    except BaseException:
        store.close()
        raise
    if recovered:
        log.warning("the ledger held %d requests the last server did not finish (a crash); they are recorded "
                    "as 'interrupted' with the tokens known at the crash (docs/serving.md)", recovered)
    if not store.list_keys():
        log.warning("no API keys in %s yet: every request will be refused; create one with "
                    "`muse keys create --partner NAME%s`", store.where, f" --db {store.where}" if args.db else "")
    device = pick_device(args.device)
    served = []
    for name, path in pairs:
        cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
        ckpt = str(resolve_stage(path, args.stage, fast=True))  # loading it verifies every hash
        if args.engine_process:
            model = ServedModel.from_spec(name, EngineSpec(ckpt, cfg, device=str(device)))
        else:
            model = ServedModel.from_engine(name, Engine.from_checkpoint(ckpt, cfg, device=device))
        served.append(model)
        log.info("model %s: %s on %s, context %d, %d KV blocks%s", name, ckpt, device, model.max_model_len,
                 model.client.stats().num_blocks, " (engine process)" if args.engine_process else "")
    config = ServerConfig(admin_key=admin_key, max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens,
                          max_n=args.max_n, max_logprobs=args.max_logprobs, max_running=args.max_running,
                          max_waiting=args.max_waiting, shutdown_grace_s=args.grace, docs=args.docs)
    app = create_app(served, store, config, ui=args.ui, run_dirs=dict(pairs))
    state = app.state.muse

    class DrainingServer(uvicorn.Server):
        """The first SIGTERM/SIGINT starts a drain while the server keeps accepting connections: new
        requests get 503 shutting_down, running ones get --grace seconds, the rest are aborted and
        accounted; only then does uvicorn stop. A second signal skips what is left of the grace."""

        draining = False

        def handle_exit(self, sig, frame):
            if state.loop is None:  # a signal before start-up finished: nothing runs yet, stop at once
                return super().handle_exit(sig, frame)
            if self.draining:
                state.config.shutdown_grace_s = 0
                for j in list(state.jobs):
                    state.loop.call_soon_threadsafe(j.shut_down)
                return super().handle_exit(sig, frame)
            self.draining = True
            state.draining = True

            async def drain_then_exit():
                try:
                    await drain(state)
                finally:
                    self.should_exit = True
            state.loop.call_soon_threadsafe(lambda: state.loop.create_task(drain_then_exit()))

    # uvicorn's own deadline only covers writing out responses after the drain has accounted every job
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=10, access_log=False))
    log.info("serving %s on http://%s:%d (keys and ledger: %s%s)%s", ", ".join(n for n, _ in pairs), args.host,
             args.port, store.where, f", replica {replica}" if replica else "",
             f"; web pages at http://{args.host}:{args.port}/ui/" if args.ui else "")
    try:
        server.run()
    finally:
        store.close(timeout=10)
    return 0
