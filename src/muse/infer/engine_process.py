"""EngineProcessClient: the engine's step loop in a process of its own, behind EngineClient's interface.

    client = EngineProcessClient(EngineSpec("runs/speedrun/base/latest", EngineConfig(max_num_seqs=32)))
    async for out in client.add_request(prompt_ids, SamplingParams(max_tokens=32)):
        ...
    await client.shutdown()

Why a process: `EngineClient` runs the loop in a thread of the caller's process, and everything in that
process shares one GIL. A server's event loop (HTTP parsing, JSON, detokenizing, accounting) then takes
turns with the engine's Python code (scheduling, plan building, sampling bookkeeping): on a 2-core
machine the engine thread of `muse serve` sat blocked ~8% of the time while the event loop ran, and
the server streamed 0.86x the tokens of the same engine driven directly (BENCHMARKS.md section 7). In
its own process the engine keeps a core to itself and the two overlap instead of alternating. vLLM
moved its engine core into a separate process for the same reason.

What crosses the process boundary (two one-way pipes, pickled tuples):
  parent -> child   ("add", rid, prompt_ids, params) | ("abort", rid) | ("stop",)
  child -> parent   ("ready", info) once, or ("failed", error) when the engine cannot be built;
                    ("acks", [(rid, None | error)]) for the adds taken in before a step;
                    ("step", [delta, ...], stats) after every step: per sample only what is new
                    (token ids, logprobs, prompt logprobs, the finish), never the whole output;
                    ("crashed", text) when the loop dies on a bug.
The parent rebuilds full `RequestOutput`s from the deltas with the engine's own `_Tracker`, so a
stream sees exactly what `EngineClient` would give it: cumulative token_ids, this step's
new_token_ids, one RequestOutput per step with changes, the last with finished=True.

The contract is EngineClient's (add_request with on_finish called exactly once per iterated stream,
abort, stats, dead / is_healthy, shutdown), with one difference: on_finish runs on this client's reader
thread instead of the engine's thread. If the engine process dies (a crash, the OOM killer, SIGKILL),
every stream fails with EngineDeadError, their on_finish callbacks get that error, and new requests are
refused. The child ignores SIGINT and SIGTERM (the server drains on them and stops the engine itself)
and exits when its parent goes away (its command pipe closes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import itertools
import os
import pickle
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from muse.common.errors import UsageError
from muse.common.logging import get_logger
from muse.infer.engine import (
    EngineConfig,
    EngineDeadError,
    EngineStats,
    RequestOutput,
    _Tracker,
    deliver_step,
    fail_streams,
    refusal,
    run_on_finish,
    stream_outputs,
)
from muse.infer.sampling_params import SamplingParams
from muse.infer.scheduler import RequestDelta

log = get_logger("muse.infer")


@dataclass(frozen=True)
class EngineSpec:
    """How the child process builds its engine: `Engine.from_checkpoint(checkpoint, config, ...)`."""

    checkpoint: str
    config: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    device: str = "cpu"
    dtype: str | None = None            # a torch dtype name ("bfloat16"); None: the checkpoint's
    stages: tuple[str, ...] = ("base",)
    threads: int | None = None          # torch intra-op threads in the child; None: torch's default


# ---- the child ----------------------------------------------------------------------------------------


def _picklable(e: BaseException) -> BaseException:
    """The error itself when it survives pickling (our MuseErrors do), else a RuntimeError saying what it was."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _child_main(cmds: Connection, outs: Connection) -> None:
    # The parent owns shutdown: Ctrl-C or a SIGTERM to the process group must not kill the engine
    # before the server has drained its requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        spec: EngineSpec = cmds.recv()
        import torch

        from muse.infer.engine import Engine

        if spec.threads:
            torch.set_num_threads(spec.threads)
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
    sent: dict[str, list[int]] = {}  # rid -> [prompt logprobs sent, logprobs sent of sample 0, 1, ...]
    while True:
        acks = []
        while cmds.poll(0):  # take every command that is there
            cmd = cmds.recv()
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                try:
                    engine.add_request(rid, prompt, params)
                except Exception as e:  # a user error: that request fails, the engine goes on
                    acks.append((rid, _picklable(e)))
                else:
                    acks.append((rid, None))
                    sent[rid] = [0] * (1 + params.n)
            elif cmd[0] == "abort":
                engine.abort(cmd[1])
            elif cmd[0] == "stop":
                return
        if acks:
            outs.send(("acks", acks))
        if not engine.has_unfinished_requests():  # nothing to step: sleep until a command comes
            cmds.poll(None)
            continue
        deltas = [d for o in engine.step() for d in _deltas(o, sent)]
        outs.send(("step", deltas, engine.stats()))


def _deltas(o: RequestOutput, sent: dict[str, list[int]]) -> list[tuple]:
    """What is new in `o` since the last step, one tuple per sample (the RequestDelta fields)."""
    counts = sent[o.request_id]
    plp = None
    if o.prompt_logprobs is not None and len(o.prompt_logprobs) > counts[0]:
        plp = o.prompt_logprobs[counts[0]:]
        counts[0] = len(o.prompt_logprobs)
    out = []
    for c in o.outputs:
        lp = None
        if c.logprobs is not None and len(c.logprobs) > counts[1 + c.index]:
            lp = c.logprobs[counts[1 + c.index]:]
            counts[1 + c.index] = len(c.logprobs)
        out.append((c.index, c.new_token_ids, c.finish_reason, c.stop_reason, lp, plp, o.num_cached_tokens))
        plp = None  # prompt logprobs belong to the request: send them once
    if o.finished:
        del sent[o.request_id]
    return [(o.request_id, *d) for d in out]


# ---- the parent ---------------------------------------------------------------------------------------


class EngineProcessClient:
    """An Engine in a child process, for asyncio callers; the interface of `EngineClient`."""

    def __init__(self, spec: EngineSpec):
        # A fresh interpreter (`python -m muse.infer.engine_process`), not multiprocessing: fork would copy
        # a process that may hold threads and CUDA state, and spawn re-runs the caller's __main__ script.
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])  # the directory that holds `muse`
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "muse.infer.engine_process", str(cmd_r), str(out_w)],
                                          pass_fds=(cmd_r, out_w), env=env)
        finally:
            os.close(cmd_r)
            os.close(out_w)
        self._cmds = Connection(cmd_w, readable=False)
        self._outs = Connection(out_r, writable=False)
        self.spec = spec
        self._cmds.send(spec)
        try:
            msg = self._outs.recv()
        except EOFError:
            raise EngineDeadError(f"the engine process exited while loading {spec.checkpoint} "
                                  f"(exit code {self._proc.wait()})") from None
        if msg[0] == "failed":
            self._proc.wait()
            raise msg[1]
        info = msg[1]
        self.tokenizer = info["tokenizer"]
        self.max_model_len: int = info["max_model_len"]
        self.num_blocks: int = info["num_blocks"]
        self._stats: EngineStats = info["stats"]
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the four dicts below (event-loop threads and the reader)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._trackers: dict[str, _Tracker] = {}
        self._acks: dict[str, concurrent.futures.Future] = {}
        self._on_finish: dict[str, Callable] = {}
        self._stop = False
        self._closed = False  # set by the reader when it stops: nothing registered later would be answered
        self.error: BaseException | None = None
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._read_loop, name="muse-engine-reader", daemon=True)
        self._reader.start()

    # ----- state --------------------------------------------------------------------------------------
    @property
    def dead(self) -> bool:
        return self.error is not None

    @property
    def is_healthy(self) -> bool:
        return not self.dead and not self._stop and self._proc.poll() is None and self._reader.is_alive()

    def stats(self) -> EngineStats:
        """The engine's snapshot sent with its latest step (never blocks)."""
        return self._stats

    # ----- requests -----------------------------------------------------------------------------------
    async def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                          request_id: str | None = None, *,
                          on_finish: Callable[[RequestOutput | BaseException], None] | None = None,
                          ) -> AsyncIterator[RequestOutput]:
        """As EngineClient.add_request; `on_finish` runs on this client's reader thread."""
        params = params or SamplingParams()

        def refuse(e: BaseException):
            if on_finish is not None:
                on_finish(e)
            return e

        if (closed := refusal(self)) is not None:
            raise refuse(closed)
        rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        prompt = [int(t) for t in prompt_token_ids]
        q: asyncio.Queue = asyncio.Queue()
        ack: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                refused: BaseException | None = self.error or EngineDeadError("the engine client was shut down")
            elif rid in self._streams or rid in self._trackers:
                refused = UsageError(f"request id {rid} is already streaming; ids must be unique")
            else:
                refused = None
                self._streams[rid] = (asyncio.get_running_loop(), q)
                self._trackers[rid] = _Tracker(rid, prompt, params.n, params.logprobs is not None)
                self._acks[rid] = ack
                if on_finish is not None:
                    self._on_finish[rid] = on_finish
        if refused is not None:
            raise refuse(refused)
        if not self._send(("add", rid, prompt, params)):
            self._fail_pending(rid, EngineDeadError("the engine process is gone"))
        async with contextlib.aclosing(stream_outputs(self, rid, q, ack)) as outs:
            async for out in outs:
                yield out

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, returns at once; its stream ends with finish_reason "abort")."""
        self._send(("abort", str(request_id)))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine process (running requests are dropped; their streams fail)."""
        await asyncio.get_running_loop().run_in_executor(None, self.close, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """shutdown() for synchronous callers: blocks until the process and the reader are done."""
        self._stop = True
        self._send(("stop",))
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:  # stuck in a step: it holds nothing worth waiting for
            log.warning("the engine process did not stop within %.0f s; killing it", timeout)
            self._proc.kill()
            self._proc.wait()
        self._reader.join()
        self._cmds.close()
        self._outs.close()

    # ----- plumbing -----------------------------------------------------------------------------------
    def _send(self, msg) -> bool:
        try:
            with self._send_lock:
                self._cmds.send(msg)
            return True
        except (OSError, ValueError):  # the child is gone (the reader reports why)
            return False

    def _finished(self, rid: str, result) -> None:
        with self._lock:
            cb = self._on_finish.pop(rid, None)
        if cb is not None:
            run_on_finish(cb, rid, result)

    def _fail_pending(self, rid: str, err: BaseException) -> None:
        """A request the engine never took: its callback, then its acknowledgement."""
        self._finished(rid, err)
        with self._lock:
            self._trackers.pop(rid, None)
            ack = self._acks.pop(rid, None)
        if ack is not None and not ack.done():
            ack.set_exception(err)

    def _read_loop(self) -> None:
        err: BaseException | None = None
        try:
            while True:
                msg = self._outs.recv()
                if msg[0] == "step":
                    self._on_step(msg[1])
                    self._stats = msg[2]
                elif msg[0] == "acks":
                    for rid, e in msg[1]:
                        if e is None:
                            with self._lock:
                                ack = self._acks.pop(rid, None)
                            if ack is not None:
                                ack.set_result(None)
                        else:  # before the ack: the caller may look the moment it wakes
                            self._fail_pending(rid, e)
                elif msg[0] == "crashed":
                    log.error("the engine process crashed:\n%s", msg[1])
                    err = EngineDeadError(f"the engine process crashed: {msg[1].strip().splitlines()[-1]}")
                    break
        except (EOFError, OSError):
            if not self._stop:
                try:
                    code = self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    code = None
                err = EngineDeadError(f"the engine process exited unexpectedly (exit code {code})")
        except BaseException as e:  # a bug here: fail loudly, refuse new work
            log.exception("the engine reader crashed")
            err = EngineDeadError(f"the engine reader crashed: {e!r}")
        if err is not None:
            self.error = err
        else:
            err = EngineDeadError("the engine was shut down")
        with self._lock:
            self._closed = True
            pending = list(self._acks)
            rids = list(self._on_finish)
            streams = list(self._streams.values())
        for rid in pending:
            self._fail_pending(rid, err)
        for rid in rids:  # before the streams hear of it, as for finished requests
            self._finished(rid, err)
        fail_streams(streams, err)

    def _on_step(self, deltas: list[tuple]) -> None:
        changed: dict[str, _Tracker] = {}
        with self._lock:
            for rid, index, new, reason, stop, lp, plp, cached in deltas:
                tracker = self._trackers.get(rid)
                if tracker is None:
                    continue
                tracker.apply(RequestDelta(rid, new, reason, stop, lp, plp, index=index, num_cached_tokens=cached))
                changed[rid] = tracker
            outs = []
            for rid, tracker in changed.items():
                outs.append(tracker.snapshot())
                if tracker.out.finished:
                    del self._trackers[rid]
        for out in outs:
            if out.finished:
                self._finished(out.request_id, out)
        deliver_step(self._streams, self._lock, outs)


if __name__ == "__main__":  # the child: python -m muse.infer.engine_process CMD_FD OUT_FD
    _child_main(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
