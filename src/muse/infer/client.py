"""Engine clients: the interface asyncio callers depend on (`EngineClient`), the in-thread implementation
(`ThreadEngineClient`), and the stream plumbing both implementations share.

    client: EngineClient = ThreadEngineClient(engine)     # or EngineProcessClient(spec): engine_process.py
    async for out in client.add_request(prompt_ids, SamplingParams(max_tokens=32)):
        print(out.outputs[0].new_token_ids)
    client.abort(request_id)
    client.stats(), client.is_healthy, client.dead, client.restarts
    await client.reset_prefix_cache()                      # after a weight update (RL)
    await client.shutdown()

The server, eval and RL rollouts depend on the `EngineClient` Protocol, never on one class (vLLM's
convention: the name is the interface). Every implementation folds the engine's per-step deltas once,
with an `OutputProcessor`, on its side of the engine.

Hand-overs from the engine's side (its thread, or a reader thread) to a stream are items put on the
stream's asyncio.Queue with call_soon_threadsafe: RequestOutputs, or an exception that ends the stream
(a refused request, a dead engine). Nothing the consumer does (break, cancel, closing the event loop)
can make a hand-over raise on the engine's side: there is no future shared between the two sides that
a cancellation could cancel under the engine's feet.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from muse.common.errors import UsageError
from muse.common.logging import get_logger
from muse.infer.engine import Engine, EngineDeadError, EngineStats, OutputProcessor, RequestOutput
from muse.infer.sampling_params import SamplingParams

log = get_logger("muse.infer")

OnFinish = Callable[[RequestOutput | BaseException], None]


@runtime_checkable
class EngineClient(Protocol):
    """An engine driven for asyncio callers. Implementations: ThreadEngineClient (this module),
    EngineProcessClient (engine_process.py).

    add_request streams RequestOutputs until the request finishes (the last has finished=True; a
    sample that the engine failed on alone has finish_reason "error", see RequestOutput.failed).
    UsageError / ResourceError (a bad prompt, too long) and EngineDeadError (the engine stopped;
    `retryable` says whether sending it again later may work) are raised by the iteration. A consumer
    that leaves early (break, cancel) aborts its request. `on_finish` is called exactly once per
    stream that was iterated at all: with the final RequestOutput (also when the consumer left first),
    or with the exception that ended the request; keep it short and thread-safe.
    """

    tokenizer: Any          # the checkpoint's tokenizer (None without one)
    max_model_len: int

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, *, on_finish: OnFinish | None = None,
                    ) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None:
        """Thread-safe, returns at once; the stream ends with finish_reason "abort"."""

    def stats(self) -> EngineStats:
        """The latest snapshot (never blocks on the engine)."""

    @property
    def is_healthy(self) -> bool:
        """Taking requests now (False while dead, shut down, or restarting)."""

    @property
    def dead(self) -> bool:
        """Stopped for good after a failure: every request is refused."""

    @property
    def restarts(self) -> int:
        """Times the engine was restarted after dying (a metric)."""

    async def reset_prefix_cache(self) -> int:
        """Forget the prefix cache (after a weight update); returns the entries dropped."""

    async def shutdown(self) -> None:
        """Stop the engine; running requests are dropped, their streams fail with EngineDeadError."""


# ---- shared plumbing ------------------------------------------------------------------------------------


def _put_all(items) -> None:
    for q, item in items:
        q.put_nowait(item)


def run_on_finish(cb: OnFinish, rid: str, result) -> None:
    """Call a request's on_finish callback; a broken callback is logged, never raised into the loop
    (engine thread or reader) that reports every other request."""
    try:
        cb(result)
    except Exception:
        log.exception("on_finish callback of request %s failed", rid)


def settle(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result=None,
           error: BaseException | None = None) -> None:
    """Resolve an asyncio future from another thread. On the loop's own thread, and only if nobody
    cancelled it meanwhile: a cancelled waiter must never raise into the engine's side."""
    def resolve():
        if not fut.done():
            fut.set_result(result) if error is None else fut.set_exception(error)
    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # that event loop is closed: nobody is waiting
        pass


class StreamTable:
    """The open streams of one client: request id -> (event loop, asyncio.Queue). Thread-safe; the
    engine's side hands items over with one wake-up per event loop per step, not one per request
    (each call_soon_threadsafe wakes the loop, and a loop serving many streams pays for every one)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}

    def open(self, rid: str) -> asyncio.Queue | None:
        """A new stream on the running event loop; None when `rid` is already streaming."""
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._streams:
                return None
            self._streams[rid] = (asyncio.get_running_loop(), q)
        return q

    def close(self, rid: str) -> None:
        with self._lock:
            self._streams.pop(rid, None)

    def __contains__(self, rid: str) -> bool:
        with self._lock:
            return rid in self._streams

    def deliver(self, items: Sequence[tuple[str, RequestOutput | BaseException]]) -> None:
        """Put each (request id, item) on its stream, if it is still open."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for rid, item in items:
                target = self._streams.get(rid)
                if target is not None:
                    batches.setdefault(target[0], []).append((target[1], item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def deliver_outputs(self, outs: Sequence[RequestOutput]) -> None:
        self.deliver([(o.request_id, o) for o in outs])

    def fail_all(self, err: BaseException) -> None:
        """End every open stream with `err`."""
        with self._lock:
            rids = list(self._streams)
        self.deliver([(rid, err) for rid in rids])


async def stream_outputs(streams: StreamTable, rid: str, q: asyncio.Queue,
                         abort: Callable[[str], None]) -> AsyncIterator[RequestOutput]:
    """Request `rid`'s RequestOutputs as they arrive on its queue `q`; an exception put on `q` ends the
    stream with it. However the stream ends, it leaves `streams`; a consumer that left before the last
    output (break, cancellation) aborts the request (`abort(rid)`), so its blocks are freed."""
    finished = False
    try:
        while True:
            item = await q.get()
            if isinstance(item, BaseException):
                finished = True
                raise item
            finished = item.finished
            yield item
            if finished:
                return
    finally:
        streams.close(rid)
        if not finished:
            abort(rid)


# ---- the engine in a thread -----------------------------------------------------------------------------


class ThreadEngineClient:
    """An Engine driven by a background thread of this process (tests, notebooks, library use; `muse
    serve` runs the engine in a process of its own, engine_process.py). See EngineClient for the contract.

    The thread owns the engine: requests, aborts and resets are handed over through a queue and applied
    between steps. on_finish runs on the engine thread (or the caller's, for a request refused before
    the hand-over). A crash of the step loop is final (`dead`; its state may be corrupt): streams fail
    with EngineDeadError and new requests are refused; `restarts` stays 0.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._cmd_lock = threading.Lock()   # _closed and the queue: nothing is queued after the last drain
        self._closed = False
        self._wake = threading.Event()
        self._streams = StreamTable()
        self._outputs = OutputProcessor()             # engine thread only
        self._on_finish: dict[str, OnFinish] = {}     # engine thread only
        self._stop = False
        self.error: BaseException | None = None
        self._ids = itertools.count()
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._loop, name="muse-engine", daemon=True)
        self._thread.start()

    # ----- state --------------------------------------------------------------------------------------
    @property
    def dead(self) -> bool:
        return self.error is not None

    @property
    def is_healthy(self) -> bool:
        return not self.dead and not self._stop and self._thread.is_alive()

    @property
    def restarts(self) -> int:
        return 0

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step (cheap; never blocks on the engine)."""
        return self._stats

    def _refusal(self) -> EngineDeadError | None:
        if self.dead:
            return EngineDeadError("the engine stopped after an internal error; see the server log")
        if self._stop or self._closed:
            return EngineDeadError("the engine client was shut down")
        return None

    # ----- requests -----------------------------------------------------------------------------------
    async def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                          request_id: str | None = None, *, on_finish: OnFinish | None = None,
                          ) -> AsyncIterator[RequestOutput]:
        """See EngineClient.add_request."""
        def refuse(e: BaseException):
            if on_finish is not None:
                on_finish(e)
            return e

        if (closed := self._refusal()) is not None:
            raise refuse(closed)
        rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        q = self._streams.open(rid)
        if q is None:
            raise refuse(UsageError(f"request id {rid} is already streaming; ids must be unique"))
        if not self._send(("add", rid, list(prompt_token_ids), params or SamplingParams(), on_finish)):
            self._streams.close(rid)
            raise refuse(self._refusal() or EngineDeadError("the engine client was shut down"))

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
        if not self._send(("reset", loop, fut)):
            raise self._refusal() or EngineDeadError("the engine client was shut down")
        return await fut

    async def shutdown(self) -> None:
        """Stop the loop thread (running requests are dropped; their streams fail)."""
        self._stop = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # ----- the engine thread ----------------------------------------------------------------------------
    def _send(self, cmd) -> bool:
        with self._cmd_lock:
            if self._closed:
                return False
            self._cmds.put(cmd)
        self._wake.set()
        return True

    def _finished(self, rid: str, result) -> None:
        cb = self._on_finish.pop(rid, None)
        if cb is not None:
            run_on_finish(cb, rid, result)

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params, on_finish = cmd
                try:
                    self.engine.add_request(rid, prompt, params)
                except Exception as e:  # a user error: that request fails, the engine goes on
                    if on_finish is not None:  # before the stream hears: it may look the moment it wakes
                        run_on_finish(on_finish, rid, e)
                    self._streams.deliver([(rid, e)])
                else:
                    self._outputs.add(rid, prompt, params)
                    if on_finish is not None:
                        self._on_finish[rid] = on_finish
            elif cmd[0] == "abort":
                self.engine.abort(cmd[1])
            elif cmd[0] == "reset":
                try:
                    dropped = self.engine.reset_prefix_cache()
                except BaseException:  # a bug: its caller hears of it, then the loop stops
                    settle(cmd[1], cmd[2], error=EngineDeadError("resetting the prefix cache failed"))
                    raise
                settle(cmd[1], cmd[2], dropped)

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._stats = self.engine.stats()
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outs = self._outputs.process(self.engine.step_deltas())
                self._stats = self.engine.stats()
                for out in outs:
                    if out.finished:
                        self._finished(out.request_id, out)
                self._streams.deliver_outputs(outs)
        except BaseException as e:  # a bug or an accelerator failure: fail loudly, refuse new work
            log.exception("engine loop crashed")
            self.error = e
        err = self._refusal() or EngineDeadError("the engine was shut down")
        with self._cmd_lock:
            self._closed = True
        # every on_finish before the streams hear of it, as for finished requests
        for rid in list(self._on_finish):
            self._finished(rid, err)
        while True:  # commands queued before _closed: fail what waits for an answer
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add" and cmd[4] is not None:
                run_on_finish(cmd[4], cmd[1], err)
            elif cmd[0] == "reset":
                settle(cmd[1], cmd[2], error=err)
        self._streams.fail_all(err)
