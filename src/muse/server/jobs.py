"""One HTTP generation request from admission to its ledger row: `Job` and its `Choice`s.

A Job runs one engine request per choice (prompts x n) in a task of its own, so a stream's response
body only reads `job.events` and a client that never reads a byte still gets its work accounted for.
Every engine request reports its final output through `on_finish` (on the engine's or the engine
client's thread), including when the client went away and the request was aborted; the job accounts
once all the choices it started have reported: settles the rate-limit and quota reservations to what
was really generated, writes the one ledger row, updates the metrics. That happens exactly once,
whatever path the request took (finished, stopped by a string, aborted, refused, engine dead).

This module knows the engine client's interface, the ledger and the metrics; not routes or HTTP.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from muse.common.errors import MuseError, ResourceError, UsageError
from muse.common.logging import get_logger
from muse.infer.engine import EngineDeadError, RequestOutput
from muse.infer.sampler import TokenLogprob
from muse.infer.sampling_params import SamplingParams
from muse.server.protocol import ApiError, invalid
from muse.server.records import ApiKey, UsageRecord
from muse.tokenizer.text import TextStream

if TYPE_CHECKING:
    from muse.server.state import AppState, ServedModel

log = get_logger("muse.server")


def usage_dict(prompt: int, completion: int, cached: int) -> dict:
    """OpenAI's `usage` object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


@dataclass
class Choice:
    """One engine request: a prompt and one of its n samples."""

    index: int
    prompt: list[int]
    params: SamplingParams
    text: TextStream
    rid: str = ""
    started: bool = False
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stopped_by_string: bool = False
    cached_tokens: int = 0


class Job:
    """One generation request from admission to its ledger row. See the module docstring."""

    def __init__(self, state: AppState, *, key: ApiKey, model: ServedModel, endpoint: str, request_id: str,
                 choices: list[Choice], num_prompt_tokens: int, grant, reservation, arrived: float,
                 arrived_wall: float, sequences: int = 1):
        self.state, self.key, self.model, self.endpoint = state, key, model, endpoint
        self.request_id, self.choices = request_id, choices
        self.num_prompt_tokens = num_prompt_tokens
        self.grant, self.reservation = grant, reservation
        self.arrived, self.arrived_wall = arrived, arrived_wall
        self.events: asyncio.Queue = asyncio.Queue()    # (choice, delta_text, new_ids, logprobs, final) | Exception | None
        self.sequences = sequences                       # admission slots held
        self.ttft: float | None = None
        self.error: BaseException | None = None
        self.http_status: int | None = None              # what the client was sent, once known
        self.client_gone = False
        self._progress_at = 0.0
        self._lock = threading.Lock()
        self._finals: dict[int, object] = {}             # choice index -> RequestOutput | exception
        self._sealed = False
        self._accounted = False
        self.task: asyncio.Task | None = None
        self.done = asyncio.Event()
        self.usage: dict | None = None                   # set by the accounting, for the response
        self._itl = state.metrics.itl.labels(model.name)
        self.loop = asyncio.get_running_loop()

    # -- accounting (any thread) --
    def _on_finish(self, index: int):
        def cb(result) -> None:
            with self._lock:
                self._finals[index] = result
            self._maybe_account()
        return cb

    def seal(self) -> None:
        """No more engine requests will start; account once the started ones have finished."""
        with self._lock:
            self._sealed = True
        self._maybe_account()

    def _maybe_account(self) -> None:
        with self._lock:
            if self._accounted or not self._sealed:
                return
            if any(c.started and c.index not in self._finals for c in self.choices):
                return
            self._accounted = True
            finals = dict(self._finals)
        try:
            self._account(finals)
        except Exception:  # accounting must never take a request (or the engine thread) down
            log.exception("accounting of request %s failed", self.request_id)

    def _account(self, finals: dict) -> None:
        # Tokens the engine computed are what is billed: a stop string cuts the text, not the bill
        # for the (at most one step of) tokens generated before the engine heard of it.
        completion = cached = 0
        errors = []
        for out in finals.values():
            if isinstance(out, RequestOutput):
                completion += sum(len(c.token_ids) for c in out.outputs)
                cached += out.num_cached_tokens
            else:
                errors.append(out)
        ran = [out for out in finals.values() if isinstance(out, RequestOutput)]
        prompt = self.num_prompt_tokens if ran else 0
        total = prompt + completion
        self.usage = usage_dict(prompt, completion, cached)
        self.grant.settle(total)
        if self.reservation is not None:
            self.reservation.settle(total)
        err = self.error or (errors[0] if errors else None)
        if err is None and any(c.finish_reason == "error" for c in self.choices):
            err = failure_error(RequestFailedError())
        if err is SHUTTING_DOWN:  # aborted by the drain, not failed: the client is told to retry
            status, http_status = "aborted", self.http_status or err.status
        elif err is not None:
            status = "error"
            http_status = self.http_status or failure_error(err).status
        elif self.client_gone or any(c.finish_reason == "abort" for c in self.choices):
            status, http_status = "aborted", self.http_status or 499
        else:
            status, http_status = "ok", self.http_status or 200
        finish = next((c.finish_reason for c in self.choices if c.finish_reason), None)
        now = time.monotonic()
        self.state.store.record(self._record(status, http_status, prompt, completion, cached, finish, now))
        m = self.state.metrics
        m.prompt_tokens.labels(self.model.name).inc(prompt)
        m.completion_tokens.labels(self.model.name).inc(completion)
        m.latency.labels(self.model.name).observe(now - self.arrived)
        if self.ttft is not None:
            m.ttft.labels(self.model.name).observe(self.ttft)
        self.state.jobs.discard(self)
        try:
            self.loop.call_soon_threadsafe(self.done.set)
        except RuntimeError:  # the event loop is gone (interpreter shutdown): nobody waits
            pass

    def _record(self, status: str, http_status: int, prompt: int, completion: int, cached: int,
                finish: str | None, now: float) -> UsageRecord:
        return UsageRecord(
            request_id=self.request_id, key_id=self.key.key_id, partner=self.key.partner, model=self.model.name,
            endpoint=self.endpoint, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
            status=status, http_status=http_status, finish_reason=finish, created_at=self.arrived_wall,
            latency_s=now - self.arrived, ttft_s=self.ttft)

    def _note_progress(self, now: float) -> None:
        """Tell the ledger how far the job got, at most every PROGRESS_EVERY_S: after a crash the restarted
        server bills an interrupted request what its last committed progress says."""
        if now - self._progress_at >= PROGRESS_EVERY_S:
            self._progress_at = now
            self.state.store.progress(self.request_id, sum(len(c.token_ids) for c in self.choices),
                                      max((c.cached_tokens for c in self.choices), default=0))

    # -- running (event loop) --
    def start(self) -> None:
        # the ledger knows of the request before the engine does: a crash from here on leaves a row
        self.state.store.begin(self._record("running", 0, self.num_prompt_tokens, 0, 0, None, self.arrived))
        self.state.jobs.add(self)
        self.task = asyncio.create_task(self._run(), name=f"job-{self.request_id}")
        # a streamed job's failure reaches the client as an event; mark it retrieved for asyncio
        self.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _run(self) -> None:
        tasks = [asyncio.create_task(self._run_choice(c)) for c in self.choices]
        try:
            await asyncio.gather(*tasks)
        except BaseException as e:
            # Stop every sibling before sealing: a choice must not start after the accounting ran.
            # A cancelled choice's stream aborts its engine request on the way out.
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)
            if not isinstance(e, asyncio.CancelledError):
                self.error = self.error or e
                self.events.put_nowait(e)
            raise
        finally:
            self.state.admission.release(self.sequences)
            self.seal()
            self.events.put_nowait(None)

    async def _run_choice(self, c: Choice) -> None:
        c.rid = f"{self.request_id}-{c.index}"
        stream = self.model.client.add_request(c.prompt, c.params, c.rid, on_finish=self._on_finish(c.index))
        c.started = True  # no await since the stream began: the engine has the request (or refused it)
        last = time.monotonic()
        try:
            async for out in stream:
                o = out.outputs[0]
                if out.prompt_logprobs is not None:  # cumulative: a chunked prompt's arrive over several steps
                    c.prompt_logprobs = out.prompt_logprobs
                c.cached_tokens = out.num_cached_tokens
                new = [] if c.stopped_by_string else list(o.new_token_ids)
                lps = []
                if new and o.logprobs is not None:
                    lps = o.logprobs[len(o.logprobs) - len(new):]
                now = time.monotonic()
                if new:
                    if self.ttft is None:
                        self.ttft = now - self.arrived
                    else:
                        self._itl.observe(now - last)
                    last = now
                    c.token_ids.extend(new)
                    c.logprobs.extend(lps)
                    self._note_progress(now)
                delta = c.text.push(new)
                if c.text.stopped and not c.stopped_by_string:
                    c.stopped_by_string = True
                    self.model.client.abort(c.rid)   # its final output still comes through this stream
                final = bool(out.finished or (c.stopped_by_string and o.finish_reason))
                if final:
                    delta += c.text.finish()
                    c.finish_reason = "stop" if c.stopped_by_string else o.finish_reason
                # `final` travels with the event: a stream that reads several queued events of this choice
                # at once must send the finish once, after the last, not after each (c.finish_reason is
                # already set when it reads the earlier ones)
                await self.events.put((c, delta, new, lps, final))
        except (UsageError, ResourceError) as e:
            raise invalid(str(e), "prompt") from None

    def cancel(self) -> None:
        """The client went away: abort everything (accounting still happens, as "aborted")."""
        self.client_gone = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def shut_down(self) -> None:
        """The server stops before the job finished: abort it; a stream gets a 503 event, a plain request
        a 503, and the ledger row says so."""
        if self.task is not None and not self.task.done():
            self.error = self.error or SHUTTING_DOWN
            self.events.put_nowait(SHUTTING_DOWN)
            self.task.cancel()


PROGRESS_EVERY_S = 0.5

SHUTTING_DOWN = ApiError(503, "The server shut down before this request finished, so it was aborted; retry it.",
                         type="server_error", code="shutting_down", headers={"retry-after": "5"})


class RequestFailedError(RuntimeError):
    """The engine failed this one request (finish_reason "error"); other requests were unaffected."""


def failure_error(e: BaseException) -> ApiError:
    """What a client is told when its request failed while running. Never the exception's text: it may
    hold internals (paths, memory addresses); the log has the detail."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, EngineDeadError):
        return ApiError(503, "The engine stopped while serving this request; retry it (/health says when the "
                        "model is available again).", type="server_error", code="engine_unavailable",
                        headers={"retry-after": "2"})
    if isinstance(e, (UsageError, ResourceError)):
        return invalid(str(e), "prompt")
    if isinstance(e, MuseError):
        return invalid(str(e))
    return ApiError(500, "The server had an error while generating this request; other requests were not "
                    "affected. Retry, and report it with the x-request-id if it persists.", type="server_error")


def job_usage(job: Job) -> dict:
    """The usage the ledger recorded (set once the job is accounted; jobs are awaited before this)."""
    return job.usage or usage_dict(0, 0, 0)
