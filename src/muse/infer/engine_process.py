"""EngineProcessClient: the engine's step loop in a process of its own, under supervision.

    client = EngineProcessClient(EngineSpec("runs/speedrun/base/latest", EngineConfig(max_num_seqs=32)))
    async for out in client.add_request(prompt_ids, SamplingParams(max_tokens=32)):
        ...
    await client.shutdown()

Why a process: `ThreadEngineClient` runs the loop in a thread of the caller's process, and everything in
that process shares one GIL. A server's event loop (HTTP parsing, JSON, detokenizing, accounting) then
takes turns with the engine's Python code (scheduling, plan building, sampling bookkeeping): on a 2-core
machine the engine thread of `muse serve` sat blocked ~8% of the time while the event loop ran, and
the server streamed 0.86x the tokens of the same engine driven directly (BENCHMARKS.md section 7). In
its own process the engine keeps a core to itself and the two overlap instead of alternating. vLLM
moved its engine core into a separate process for the same reason.

What crosses the process boundary (two one-way pipes, pickled tuples):
  parent -> child   ("add", rid, prompt_ids, params) | ("abort", rid) | ("reset", token) | ("stop",)
  child -> parent   ("ready", info) once, or ("failed", error) when the engine cannot be built;
                    ("refused", [(rid, error)]) for adds the engine did not take;
                    ("step", [delta, ...], stats) after every step: Engine.step_deltas() as they are
                    (each RequestDelta as the tuple of its fields, a sixth of the pickling time);
                    ("reset", token, entries dropped); ("crashed", traceback) when the loop dies.
The parent folds the deltas once, with an `OutputProcessor`, so a stream sees exactly what
`ThreadEngineClient` would give it.

The contract is `client.EngineClient`'s; on_finish runs on this client's reader thread. Supervision: if
the engine process dies (a bug, the OOM killer, SIGKILL), every request in flight fails with
`EngineRestartingError` (retryable: the same request sent again once the client is healthy is served),
and the reader starts a new process after a backoff (doubling per recent crash); while it loads, new
requests are refused with the same retryable error. More than `max_restarts` deaths within
`restart_window_s` and the client gives up: `dead`, every request refused with EngineDeadError. Crash
details go to the log, never to clients. The child ignores SIGINT and SIGTERM (the server drains on
them and stops the engine itself) and exits when its parent goes away (its command pipe closes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import itertools
import operator
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from muse.common.errors import UsageError
from muse.common.logging import get_logger
from muse.infer.client import OnFinish, StreamTable, run_on_finish, settle, stream_outputs
from muse.infer.engine import (
    EngineConfig,
    EngineDeadError,
    EngineRestartingError,
    EngineStats,
    OutputProcessor,
    RequestOutput,
)
from muse.infer.sampling_params import SamplingParams
from muse.infer.scheduler import RequestDelta

log = get_logger("muse.infer")

# A RequestDelta on the wire: the tuple of its fields, in declaration order (RequestDelta(*t) rebuilds it).
_wire = operator.attrgetter(*(f.name for f in dataclasses.fields(RequestDelta)))


@dataclass(frozen=True)
class EngineSpec:
    """How the child process builds its engine: `Engine.from_checkpoint(checkpoint, config, ...)`."""

    checkpoint: str
    config: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    device: str = "cpu"
    dtype: str | None = None            # a torch dtype name ("bfloat16"); None: the checkpoint's
    stages: tuple[str, ...] = ("base",)
    threads: int | None = None          # torch intra-op threads in the child; None: default_threads()


# ---- the child ----------------------------------------------------------------------------------------


def default_threads(device: str, torch_default: int, env: dict) -> int | None:
    """The child's intra-op threads when the spec names none: on CPU one fewer than torch's default (its
    core count), at least 1, so that the parent (the server's event loop) keeps a core; None (torch's own
    choice) on accelerators or when OMP_NUM_THREADS / MKL_NUM_THREADS say otherwise.

    Why: torch's OpenMP threads spin between parallel regions and each region waits for its slowest
    thread. With as many threads as cores, any other busy process (the server's HTTP work, a client on
    the same machine) deschedules one of them and every small op of the step then waits out a scheduler
    time slice. Measured on 2 cores (BENCHMARKS.md section 8): `muse eval` of 200 multiple-choice
    questions against `muse serve` took 52 s with 2 engine threads, 3.4 s with 1; the profile had the
    engine process busy the whole time, half of it in the tiny ops of token_logprobs."""
    if device != "cpu" or env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS"):
        return None
    return max(1, torch_default - 1)


def _picklable(e: BaseException) -> BaseException:
    """The error itself when it survives pickling (our MuseErrors do), else a RuntimeError naming its type."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"the engine refused the request ({type(e).__name__})")


def _child_main(cmds: Connection, outs: Connection) -> None:
    # The parent owns shutdown: Ctrl-C or a SIGTERM to the process group must not kill the engine
    # before the server has drained its requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        spec: EngineSpec = cmds.recv()
        import torch

        from muse.infer.engine import Engine

        threads = spec.threads or default_threads(spec.device, torch.get_num_threads(), os.environ)
        if threads:
            torch.set_num_threads(threads)
        dtype = getattr(torch, spec.dtype) if spec.dtype else None
        engine = Engine.from_checkpoint(spec.checkpoint, spec.config, device=spec.device, dtype=dtype,
                                        stages=spec.stages)
    except BaseException as e:
        outs.send(("failed", _picklable(e)))
        return
    # Everything built so far (torch's modules, the model) lives as long as the process: keep it out of
    # the cyclic collector's full passes, which otherwise walk it a few times per minute of serving.
    gc.collect()
    gc.freeze()
    outs.send(("ready", {"tokenizer": engine.tokenizer, "max_model_len": engine.max_model_len,
                         "num_blocks": engine.num_blocks, "stats": engine.stats()}))
    try:
        _serve(engine, cmds, outs)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent went away
    except BaseException:
        try:
            outs.send(("crashed", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None


def _serve(engine, cmds, outs) -> None:
    while True:
        refused = []
        while cmds.poll(0):  # take every command that is there
            cmd = cmds.recv()
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                try:
                    engine.add_request(rid, prompt, params)
                except Exception as e:  # a user error: that request fails, the engine goes on
                    refused.append((rid, _picklable(e)))
            elif cmd[0] == "abort":
                engine.abort(cmd[1])
            elif cmd[0] == "reset":
                outs.send(("reset", cmd[1], engine.reset_prefix_cache()))
            elif cmd[0] == "stop":
                return
        if refused:
            outs.send(("refused", refused))
        if not engine.has_unfinished_requests():  # nothing to step: sleep until a command comes
            cmds.poll(None)
            continue
        deltas = engine.step_deltas()
        outs.send(("step", [_wire(d) for d in deltas], engine.stats()))


# ---- the parent ---------------------------------------------------------------------------------------


class _Child:
    """One engine process and the two pipes to it."""

    def __init__(self, spec: EngineSpec):
        # A fresh interpreter (`python -m muse.infer.engine_process`), not multiprocessing: fork would copy
        # a process that may hold threads and CUDA state, and spawn re-runs the caller's __main__ script.
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])  # the directory that holds `muse`
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "muse.infer.engine_process", str(cmd_r), str(out_w)],
                                         pass_fds=(cmd_r, out_w), env=env)
        finally:
            os.close(cmd_r)
            os.close(out_w)
        self.cmds = Connection(cmd_w, readable=False)
        self.outs = Connection(out_r, writable=False)
        try:
            self.cmds.send(spec)
            msg = self.outs.recv()
        except (EOFError, OSError):
            self.close_pipes()
            raise EngineDeadError(f"the engine process exited while loading {spec.checkpoint} "
                                  f"(exit code {self.proc.wait()})") from None
        if msg[0] == "failed":
            self.proc.wait()
            self.close_pipes()
            raise msg[1]
        self.info: dict = msg[1]

    def stop(self, timeout: float) -> None:
        """Ask the process to stop; kill it if it does not within `timeout` s."""
        try:
            self.cmds.send(("stop",))
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:  # stuck in a step: it holds nothing worth waiting for
            log.warning("the engine process did not stop within %.0f s; killing it", timeout)
            self.proc.kill()
            self.proc.wait()

    def close_pipes(self) -> None:
        self.cmds.close()
        self.outs.close()


class RestartPolicy:
    """When a dead engine process is started again: after `backoff_s`, doubled for each other death in
    the last `window_s` (at most `max_backoff_s`); never once more than `max_restarts` died in the window."""

    def __init__(self, max_restarts: int = 5, window_s: float = 300.0, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0):
        self.max_restarts, self.window_s = max_restarts, window_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._deaths: collections.deque[float] = collections.deque()

    def record_death(self, now: float | None = None) -> float | None:
        """A death now: seconds to wait before starting again, or None to give up."""
        now = time.monotonic() if now is None else now
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - self.window_s:
            self._deaths.popleft()
        if len(self._deaths) > self.max_restarts:
            return None
        return min(self.backoff_s * 2 ** (len(self._deaths) - 1), self.max_backoff_s)


class EngineProcessClient:
    """An Engine in a supervised child process, for asyncio callers; implements client.EngineClient.

    The constructor starts the process and waits until the engine is built (its errors, e.g. a missing
    checkpoint, are the constructor's). `restart` sets when and how often a dead process is replaced.
    """

    def __init__(self, spec: EngineSpec, *, restart: RestartPolicy | None = None):
        self.spec = spec
        self.restart_policy = restart or RestartPolicy()
        self._child = _Child(spec)
        info = self._child.info
        self.tokenizer = info["tokenizer"]
        self.max_model_len: int = info["max_model_len"]
        self.num_blocks: int = info["num_blocks"]
        self._stats: EngineStats = info["stats"]
        self.restarts = 0
        self._send_lock = threading.Lock()  # the pipe to the child, and which child it is (_gen)
        self._lock = threading.Lock()       # the request state below (event-loop threads and the reader)
        self._gen = 0                       # which child the requests in flight were sent to
        self._ready = True                  # False while a dead child is being replaced, and for good at the end
        self._outputs = OutputProcessor()
        self._on_finish: dict[str, OnFinish] = {}
        self._resets: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._streams = StreamTable()
        self._stop = False
        self._stopping = threading.Event()  # wakes the reader from a restart backoff
        self.error: EngineDeadError | None = None
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._supervise, name="muse-engine-reader", daemon=True)
        self._reader.start()

    # ----- state --------------------------------------------------------------------------------------
    @property
    def dead(self) -> bool:
        return self.error is not None

    @property
    def is_healthy(self) -> bool:
        return (self._ready and not self.dead and not self._stop and self._child.proc.poll() is None
                and self._reader.is_alive())

    @property
    def pid(self) -> int:
        """The engine process's id (it changes when the process is restarted)."""
        return self._child.proc.pid

    @property
    def exit_code(self) -> int | None:
        """The engine process's exit code; None while it runs."""
        return self._child.proc.poll()

    def stats(self) -> EngineStats:
        """The engine's snapshot sent with its latest step (never blocks)."""
        return self._stats

    def _refusal(self) -> EngineDeadError | None:
        if self.error is not None:  # a fresh one: raising one instance again and again grows its traceback
            return type(self.error)(*self.error.args)
        if self._stop:
            return EngineDeadError("the engine client was shut down")
        if not self._ready:
            return EngineRestartingError("the engine is restarting after a failure; send the request again "
                                         "in a few seconds")
        return None

    # ----- requests -----------------------------------------------------------------------------------
    async def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                          request_id: str | None = None, *, on_finish: OnFinish | None = None,
                          ) -> AsyncIterator[RequestOutput]:
        """See client.EngineClient.add_request; `on_finish` runs on this client's reader thread."""
        params = params or SamplingParams()

        def refuse(e: BaseException):
            if on_finish is not None:
                on_finish(e)
            return e

        if (closed := self._refusal()) is not None:
            raise refuse(closed)
        rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        prompt = [int(t) for t in prompt_token_ids]
        q = self._streams.open(rid)
        if q is None:
            raise refuse(UsageError(f"request id {rid} is already streaming; ids must be unique"))
        with self._lock:
            refused = self._refusal()
            if refused is None and rid in self._outputs:  # its stream left; its abort is under way
                refused = UsageError(f"request id {rid} is already streaming; ids must be unique")
            if refused is None:
                self._outputs.add(rid, prompt, params)
                if on_finish is not None:
                    self._on_finish[rid] = on_finish
                gen = self._gen
        if refused is not None:
            self._streams.close(rid)
            raise refuse(refused)
        if not self._send(("add", rid, prompt, params), gen):  # that child is gone: the reader says why
            self._fail(rid, EngineRestartingError("the engine process died; send the request again in a "
                                                  "few seconds"))

        async with contextlib.aclosing(stream_outputs(self._streams, rid, q, self.abort)) as outs:
            async for out in outs:
                yield out

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, returns at once; its stream ends with finish_reason "abort")."""
        self._send(("abort", str(request_id)))

    async def reset_prefix_cache(self) -> int:
        """Forget the engine's prefix cache, between two steps; returns the entries dropped."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        token = next(self._ids)
        with self._lock:
            if (refused := self._refusal()) is not None:
                raise refused
            self._resets[token] = (loop, fut)
            gen = self._gen
        if not self._send(("reset", token), gen):
            with self._lock:
                self._resets.pop(token, None)
            raise EngineRestartingError("the engine process died; try again in a few seconds")
        return await fut

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine process (running requests are dropped; their streams fail)."""
        await asyncio.get_running_loop().run_in_executor(None, self.close, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """shutdown() for synchronous callers: blocks until the process and the reader are done."""
        self._stop = True
        self._stopping.set()
        with self._send_lock:
            child = self._child
        child.stop(timeout)
        self._reader.join()
        self._child.close_pipes()

    # ----- plumbing -----------------------------------------------------------------------------------
    def _send(self, msg, gen: int | None = None) -> bool:
        """Send to the current child; False when it is gone, or is not child `gen` (a request registered
        for a child that died was failed with it, and must not run on its successor)."""
        with self._send_lock:
            if gen is not None and gen != self._gen:
                return False
            try:
                self._child.cmds.send(msg)
                return True
            except (OSError, ValueError):
                return False

    def _fail(self, rid: str, err: BaseException) -> None:
        """End one request the engine will not finish: its callback, then its stream."""
        with self._lock:
            self._outputs.discard(rid)
            cb = self._on_finish.pop(rid, None)
        if cb is not None:
            run_on_finish(cb, rid, err)
        self._streams.deliver([(rid, err)])

    def _fail_all(self, err: EngineDeadError, *, for_good: bool) -> None:
        """Every request in flight fails with `err`: callbacks first, then the streams. New requests are
        refused until a new child is ready (or for good)."""
        with self._lock:
            self._ready = False
            if for_good and self.error is None and not self._stop:
                self.error = err
            self._outputs = OutputProcessor()
            callbacks = [(rid, self._on_finish.pop(rid)) for rid in list(self._on_finish)]
            resets, self._resets = list(self._resets.values()), {}
        for rid, cb in callbacks:
            run_on_finish(cb, rid, err)
        for loop, fut in resets:
            settle(loop, fut, error=err)
        self._streams.fail_all(err)

    def _supervise(self) -> None:
        try:
            while True:
                self._read(self._child)
                if self._stop:
                    self._fail_all(EngineDeadError("the engine client was shut down"), for_good=True)
                    return
                if not self._replace_child():
                    return
        except BaseException:  # a bug here: fail loudly, refuse new work
            log.exception("the engine reader crashed")
            self._fail_all(EngineDeadError("the engine client failed; see the server log"), for_good=True)

    def _read(self, child: _Child) -> None:
        """Handle the child's messages until it stops or dies (its pipe closes, or it reports a crash)."""
        try:
            while True:
                msg = child.outs.recv()
                if msg[0] == "step":
                    self._stats = msg[2]  # first: an on_finish may look at the stats
                    self._on_step(msg[1])
                elif msg[0] == "refused":
                    for rid, e in msg[1]:
                        self._fail(rid, e)
                elif msg[0] == "reset":
                    with self._lock:
                        waiter = self._resets.pop(msg[1], None)
                    if waiter is not None:
                        settle(*waiter, msg[2])
                elif msg[0] == "crashed":
                    log.error("the engine process crashed:\n%s", msg[1])
                    return
        except (EOFError, OSError):
            if not self._stop:
                try:
                    code = child.proc.wait(5)
                except subprocess.TimeoutExpired:
                    code = None
                log.error("the engine process exited unexpectedly (exit code %s)", code)

    def _replace_child(self) -> bool:
        """The child died: fail what it was running, start a new one (after a backoff; a start that
        fails counts as a death). False when the policy gives up, or the client is closing."""
        self._fail_all(EngineRestartingError("the engine process died while serving this request; send it "
                                             "again in a few seconds"), for_good=False)
        while True:
            self._child.proc.kill()  # a child that reported a crash may still be exiting
            self._child.proc.wait()
            self._child.close_pipes()
            delay = self.restart_policy.record_death()
            if delay is None:
                p = self.restart_policy
                log.error("the engine process died %d times within %.0f s; giving up", p.max_restarts + 1, p.window_s)
                self._fail_all(EngineDeadError("the engine stopped after repeated failures; see the server log"),
                               for_good=True)
                return False
            if self._stopping.wait(delay):
                return False
            try:
                child = _Child(self.spec)
            except Exception:
                log.exception("starting a new engine process failed")
                continue
            with self._send_lock, self._lock:
                if self._stop:  # closed while it loaded: close() already stopped the old one
                    stopping = child
                else:
                    stopping = None
                    self._child, self._gen = child, self._gen + 1
                    self._stats = child.info["stats"]
                    self.restarts += 1
                    self._ready = True
            if stopping is not None:
                stopping.stop(5.0)
                stopping.close_pipes()
                return False
            log.warning("the engine process was restarted (restart %d)", self.restarts)
            return True

    def _on_step(self, wire: list[tuple]) -> None:
        deltas = [RequestDelta(*t) for t in wire]
        with self._lock:
            outs = self._outputs.process(deltas)
            finals = [(o, self._on_finish.pop(o.request_id, None)) for o in outs if o.finished]
        for out, cb in finals:
            if cb is not None:
                run_on_finish(cb, out.request_id, out)
        self._streams.deliver_outputs(outs)


if __name__ == "__main__":  # the child: python -m muse.infer.engine_process CMD_FD OUT_FD
    _child_main(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
