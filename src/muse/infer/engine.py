"""Engine: the step loop (schedule -> execute -> update), and the two ways to drive it.

    engine = Engine(model, EngineConfig(max_num_seqs=64), tokenizer=tok)
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=64))
    while engine.has_unfinished_requests():
        for out in engine.step():            # RequestOutput of every request that changed
            ...

`LLM` is the synchronous facade for offline batches (`generate(prompts, params)`, with a progress
bar); `EngineClient` runs the same loop in a background thread for asyncio code (the server, eval,
RL rollouts): `async for out in client.add_request(ids, params)`, `client.abort(id)`, health and
stats. Outputs are merged per client request: the n samples of one request arrive as one
`RequestOutput` with n `CompletionOutput`s.

The engine works on token ids. Text appears only in `LLM` (encode str prompts, decode outputs) when
it has a tokenizer; stop strings, chat templates and detokenized streaming are the edges' business.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from muse.common.errors import ConfigError, ResourceError, UsageError
from muse.common.logging import get_logger, progress
from muse.infer.kv_blocks import cdiv
from muse.infer.paged_cache import PagedKVPool
from muse.infer.request import Request
from muse.infer.runner import ModelRunner
from muse.infer.sampler import TokenLogprob
from muse.infer.sampling_params import SamplingParams
from muse.infer.scheduler import RequestDelta, Scheduler, SchedulerConfig
from muse.infer.spec_decode import SpeculativeConfig

log = get_logger("muse.infer")

CPU_KV_CACHE_BYTES = 2 << 30   # default KV pool cap on CPU
GPU_KV_CACHE_FRACTION = 0.8    # default: this fraction of the accelerator's free memory


@dataclass
class EngineConfig:
    """Engine limits; the scheduler's plus how big the KV pool is and whether to speculate."""

    block_size: int = 16
    num_blocks: int | None = None           # None: sized from kv_cache_bytes
    kv_cache_bytes: int | None = None       # None: 80% of free accelerator memory; on CPU what max_num_seqs
                                            # full-length sequences need, at most 2 GiB
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None        # None: the model's max_seq_len
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    eos_token_id: int | None = None         # None: the tokenizer's <|endoftext|> (when there is one)
    speculative: SpeculativeConfig | None = None
    seed: int = 0                           # seeds of unseeded requests are drawn from this
    max_batched_query: int = 64             # attention: query lengths up to this share padded calls


@dataclass
class CompletionOutput:
    """One sample of a request: everything generated so far, and what this step added."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None        # "stop" | "length" | "abort" | None while running
    stop_reason: int | None = None          # the stop token id that ended it (None for eos)
    logprobs: list[TokenLogprob] | None = None
    text: str | None = None                 # LLM fills it when it has a tokenizer

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One client request: its n samples (`outputs`), prompt logprobs, usage."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprob] | None = None   # one per prompt token after the first
    num_cached_tokens: int = 0                          # prompt tokens served from the prefix cache
    finished: bool = False

    # n == 1 conveniences: the first (only) sample's fields
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass
class EngineStats:
    """A snapshot for metrics and health pages."""

    num_running: int
    num_waiting: int
    kv_usage: float
    num_blocks: int
    num_free_blocks: int
    prefix_cache_hit_rate: float            # hit tokens / queried tokens at admission
    num_preemptions: int
    spec_acceptance_rate: float | None      # accepted / proposed drafts (None: no drafts yet)
    num_steps: int
    num_requests_finished: int
    num_prompt_tokens: int
    num_generation_tokens: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Tracker:
    """Accumulates one client request's deltas (all n children) into a RequestOutput."""

    def __init__(self, request_id: str, prompt: list[int], n: int, want_logprobs: bool):
        self.out = RequestOutput(request_id, prompt, [CompletionOutput(i, logprobs=[] if want_logprobs else None)
                                                     for i in range(n)])
        self.num_finished = 0

    def apply(self, d: RequestDelta) -> None:
        c = self.out.outputs[d.index]
        c.token_ids.extend(d.new_token_ids)
        c.new_token_ids.extend(d.new_token_ids)
        if d.logprobs and c.logprobs is not None:
            c.logprobs.extend(d.logprobs)
        if d.prompt_logprobs:
            self.out.prompt_logprobs = (self.out.prompt_logprobs or []) + list(d.prompt_logprobs)
        self.out.num_cached_tokens = d.num_cached_tokens
        if d.finished and c.finish_reason is None:
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
            self.num_finished += 1
        self.out.finished = self.num_finished == len(self.out.outputs)

    def snapshot(self) -> RequestOutput:
        """A copy the caller may keep (the tracker goes on mutating its own); new_token_ids reset.

        Built field by field: dataclasses.replace (which rebuilds its field list on every call) was
        most of the engine's per-output cost. A new field of CompletionOutput or RequestOutput must
        be added here (tests/test_engine.py checks the field lists)."""
        o = self.out
        outs = []
        for c in o.outputs:
            outs.append(CompletionOutput(c.index, c.token_ids[:], c.new_token_ids, c.finish_reason, c.stop_reason,
                                         None if c.logprobs is None else c.logprobs[:], c.text))
            c.new_token_ids = []
        return RequestOutput(o.request_id, o.prompt_token_ids, outs,
                             None if o.prompt_logprobs is None else o.prompt_logprobs[:], o.num_cached_tokens,
                             o.finished)


def _pool_blocks(model, config: EngineConfig, max_model_len: int) -> int:
    if config.num_blocks is not None:
        return config.num_blocks
    param = next(model.parameters())
    per_block = PagedKVPool.bytes_per_block(model.config, config.block_size, param.dtype)
    if config.speculative is not None and config.speculative.draft_model is not None:
        draft = config.speculative.draft_model
        per_block += PagedKVPool.bytes_per_block(draft.config, config.block_size, next(draft.parameters()).dtype)
    budget = config.kv_cache_bytes
    if budget is None:
        if param.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(param.device)
            # memory the caching allocator holds but nothing uses (e.g. a previous engine's pool)
            free += torch.cuda.memory_reserved(param.device) - torch.cuda.memory_allocated(param.device)
            budget = int(free * GPU_KV_CACHE_FRACTION)
        else:
            want = config.max_num_seqs * cdiv(max_model_len, config.block_size) * per_block
            budget = min(want, CPU_KV_CACHE_BYTES)
    return budget // per_block


class Engine:
    """Scheduler + ModelRunner + per-request output trackers; see the module docstring."""

    def __init__(self, model, config: EngineConfig | None = None, *, tokenizer=None):
        config = config or EngineConfig()
        self.model, self.config, self.tokenizer = model.eval(), config, tokenizer
        max_model_len = config.max_model_len or model.config.max_seq_len
        if max_model_len > model.config.max_seq_len:
            raise ConfigError(f"max_model_len ({max_model_len}) is longer than the model's max_seq_len "
                              f"({model.config.max_seq_len}); lower it")
        num_blocks = _pool_blocks(model, config, max_model_len)
        if num_blocks < cdiv(max_model_len, config.block_size):
            raise ResourceError(f"the KV cache holds {num_blocks} blocks of {config.block_size} tokens, less "
                                f"than one sequence of max_model_len {max_model_len}; give it more memory "
                                f"(kv_cache_bytes / num_blocks) or lower max_model_len")
        eos = config.eos_token_id
        if eos is None and tokenizer is not None:
            eos = tokenizer.eot_id
        self.eos_token_id = eos
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
            enable_chunked_prefill=config.enable_chunked_prefill, eos_token_id=eos))
        self.runner = ModelRunner(model, num_blocks=num_blocks, block_size=config.block_size,
                                  max_model_len=max_model_len, eos_token_id=eos, seed=config.seed,
                                  speculative=config.speculative, max_batched_query=config.max_batched_query,
                                  vocab_limit=None if tokenizer is None else tokenizer.vocab_size)
        self.num_blocks, self.max_model_len = num_blocks, max_model_len
        self._trackers: dict[str, _Tracker] = {}
        self._counts = dict.fromkeys(("steps", "finished", "prompt", "generated"), 0)

    @classmethod
    def from_checkpoint(cls, path, config: EngineConfig | None = None, *, device="cpu",
                        dtype: torch.dtype | None = None, stages=("base",)) -> Engine:
        from muse.checkpoint import load

        model, tokenizer, _ = load(path, device=device, dtype=dtype, stages=stages)
        return cls(model, config, tokenizer=tokenizer)

    # ----- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams | None = None) -> None:
        """Queue a request; UsageError / ResourceError when it cannot be served (nothing is queued)."""
        params = params or SamplingParams()
        request_id = str(request_id)
        if request_id in self._trackers:
            raise UsageError(f"request id {request_id} is already in use; ids must be unique")
        prompt = [int(t) for t in prompt_token_ids]
        bad = [t for t in prompt if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise UsageError(f"request {request_id} has token id {bad[0]} outside the vocabulary "
                             f"(0..{self.model.config.vocab_size - 1})")
        self.scheduler.add_request(Request(request_id, prompt, params))
        self._trackers[request_id] = _Tracker(request_id, prompt, params.n, params.logprobs is not None)
        self._counts["prompt"] += len(prompt) * params.n

    def abort(self, request_id: str) -> None:
        """Abort a request (all its samples); its last output (finish "abort") comes with the next step."""
        self.scheduler.abort(str(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ----- the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One schedule -> execute -> update cycle; the RequestOutput of every request that changed."""
        so = self.scheduler.schedule()
        ro = self.runner.execute(so)
        deltas = self.scheduler.update_from_output(so, ro)
        self._counts["steps"] += 1
        changed: dict[str, _Tracker] = {}
        for d in deltas:
            rid = d.parent_id or d.request_id
            tracker = self._trackers.get(rid)
            if tracker is None:
                continue
            tracker.apply(d)
            self._counts["generated"] += len(d.new_token_ids)
            changed[rid] = tracker
        outs = []
        for rid, tracker in changed.items():
            outs.append(tracker.snapshot())
            if tracker.out.finished:
                del self._trackers[rid]
                self._counts["finished"] += 1
        return outs

    def stats(self) -> EngineStats:
        s, c = self.scheduler.stats(), self._counts
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_usage=s.kv_usage,
            num_blocks=self.num_blocks, num_free_blocks=s.num_free_blocks,
            prefix_cache_hit_rate=s.prefix_cache_hit_tokens / max(s.prefix_cache_queried_tokens, 1),
            num_preemptions=s.num_preemptions,
            spec_acceptance_rate=s.num_accepted_tokens / s.num_draft_tokens if s.num_draft_tokens else None,
            num_steps=c["steps"], num_requests_finished=c["finished"], num_prompt_tokens=c["prompt"],
            num_generation_tokens=c["generated"])


class LLM:
    """Synchronous offline generation: many prompts in, one RequestOutput per prompt out (in order)."""

    def __init__(self, model_or_path, config: EngineConfig | None = None, *, tokenizer=None,
                 device="cpu", dtype: torch.dtype | None = None):
        if isinstance(model_or_path, torch.nn.Module):
            self.engine = Engine(model_or_path, config, tokenizer=tokenizer)
        else:
            self.engine = Engine.from_checkpoint(model_or_path, config, device=device, dtype=dtype)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 show_progress: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (token-id lists, or strings when the LLM has a tokenizer).

        `params` is one SamplingParams for all prompts or one per prompt. A prompt the engine cannot
        serve raises before anything runs, naming its index.
        """
        engine = self.engine
        params = params or SamplingParams()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise UsageError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts; pass one, or one each")
        ids = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise UsageError("text prompts need a tokenizer; pass tokenizer= or token id lists")
                ids.append(self.tokenizer.encode(p))
            else:
                ids.append(list(p))
        rids = [f"llm-{next(self._ids)}" for _ in prompts]
        added = []
        try:
            for i, (rid, prompt, sp) in enumerate(zip(rids, ids, per_prompt)):
                try:
                    engine.add_request(rid, prompt, sp)
                except (UsageError, ResourceError) as e:
                    raise type(e)(f"prompt {i}: {e}") from None
                added.append(rid)
        except BaseException:
            for rid in added:
                engine.abort(rid)
            while any(rid in engine._trackers for rid in added):
                engine.step()  # flushes the aborts: their blocks and trackers are released
            raise
        results: dict[str, RequestOutput] = {}
        bar = progress(total=len(rids), desc="generate", unit="req") if show_progress else None
        try:
            while len(results) < len(rids):
                for out in engine.step():
                    if out.finished and out.request_id in added:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        outs = [results[rid] for rid in rids]
        if self.tokenizer is not None:
            for out in outs:
                for c in out.outputs:
                    c.text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        return outs


def _put_all(items) -> None:
    for q, item in items:
        q.put_nowait(item)


def deliver_step(streams: dict, lock: threading.Lock, outs: list[RequestOutput]) -> None:
    """Hand one step's outputs to the streams listening for them (`streams`: request id -> (event loop,
    asyncio.Queue), guarded by `lock`): one hand-over per event loop, not one per request (each
    call_soon_threadsafe wakes the loop, and a loop serving many streams pays for every wake-up)."""
    batches: dict[asyncio.AbstractEventLoop, list] = {}
    with lock:
        for out in outs:
            target = streams.get(out.request_id)
            if target is not None:
                batches.setdefault(target[0], []).append((target[1], out))
    for loop, items in batches.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that event loop is closed: nobody is listening
            pass


def run_on_finish(cb: Callable, rid: str, result) -> None:
    """Call a request's on_finish callback; a broken callback is logged, never raised into the loop
    (engine thread or reader) that reports every other request."""
    try:
        cb(result)
    except Exception:
        log.exception("on_finish callback of request %s failed", rid)


def fail_streams(targets, err: BaseException) -> None:
    """End each stream (an (event loop, asyncio.Queue) pair) with `err`: the engine stopped."""
    for loop, q in targets:
        try:
            loop.call_soon_threadsafe(q.put_nowait, err)
        except RuntimeError:  # that event loop is closed: nobody is listening
            pass


def refusal(client) -> EngineDeadError | None:
    """Why `client` takes no new request (its engine died, or it was shut down), or None.
    `client` has `dead`, `error` and `_stop` (EngineClient, EngineProcessClient)."""
    if client.dead:
        return EngineDeadError(f"the engine stopped after an error: {client.error!r}")
    if client._stop:
        return EngineDeadError("the engine client was shut down")
    return None


async def stream_outputs(client, rid: str, q: asyncio.Queue,
                         ack: concurrent.futures.Future) -> AsyncIterator[RequestOutput]:
    """A request's RequestOutputs as they arrive on `q`, once the engine took the request (`ack`; its
    exception, e.g. a refused prompt, is raised by the first iteration). An exception put on `q` ends
    the stream with it. However the stream ends, it leaves `client._streams`; a consumer that leaves
    before the last output (break, cancellation) aborts the request. Shared by EngineClient and
    EngineProcessClient: `client` has `_lock`, `_streams`, `dead` and `abort`."""
    finished = False
    try:
        await asyncio.wrap_future(ack)
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
        with client._lock:
            client._streams.pop(rid, None)
        if not finished and not client.dead:
            client.abort(rid)


class EngineDeadError(RuntimeError):
    """The engine's step loop crashed; every stream fails with this and new requests are refused."""


class EngineClient:
    """An Engine driven by a background thread, for asyncio callers.

        client = EngineClient(engine)
        async for out in client.add_request(prompt_ids, SamplingParams(max_tokens=32)):
            print(out.outputs[0].new_token_ids)
        client.abort(request_id)      # thread-safe; the stream ends with finish_reason "abort"
        client.stats(), client.is_healthy, client.dead
        await client.shutdown()

    The thread owns the engine: requests and aborts are handed over through a queue and applied
    between steps (the contract allows both there). Outputs go back to each stream's event loop with
    call_soon_threadsafe. A stream abandoned by its consumer (break, cancel) aborts its request.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._on_finish: dict[str, Callable] = {}   # engine thread only
        self._lock = threading.Lock()
        self._stop = False
        self.error: BaseException | None = None
        self._ids = itertools.count()
        self._stats = engine.stats()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="muse-engine", daemon=True)
        self._thread.start()

    # ----- state --------------------------------------------------------------------------------------
    @property
    def dead(self) -> bool:
        return self.error is not None

    @property
    def is_healthy(self) -> bool:
        return not self.dead and not self._stop and self._thread.is_alive()

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step (cheap; never blocks on the engine)."""
        return self._stats

    # ----- requests -----------------------------------------------------------------------------------
    async def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                          request_id: str | None = None, *,
                          on_finish: Callable[[RequestOutput | BaseException], None] | None = None,
                          ) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs until the request finishes (the last one has finished=True).

        UsageError / ResourceError (bad prompt, too long) are raised by the first iteration.

        `on_finish` is called exactly once per stream that was iterated at all: with the request's
        final RequestOutput (finish reasons "stop", "length" or "abort"; every token it generated),
        also when the stream's consumer went away first; or with the exception that kept the request
        from running (refused at admission, a dead engine). Usage ledgers hang on it. It runs on the
        engine thread (or the caller's, for errors raised before the hand-over); keep it short and
        thread-safe.
        """
        def refuse(e: BaseException):
            if on_finish is not None:
                on_finish(e)
            return e

        if (closed := refusal(self)) is not None:
            raise refuse(closed)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._streams:
                raise refuse(UsageError(f"request id {rid} is already streaming; ids must be unique"))
            self._streams[rid] = (asyncio.get_running_loop(), q)
        ack: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("add", rid, list(prompt_token_ids), params, ack, on_finish))
        async with contextlib.aclosing(stream_outputs(self, rid, q, ack)) as outs:
            async for out in outs:
                yield out

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, returns at once; its stream ends with finish_reason "abort")."""
        self._send(("abort", str(request_id)))

    async def shutdown(self) -> None:
        """Stop the loop thread (running requests are aborted; their streams fail)."""
        self._stop = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # ----- the engine thread ----------------------------------------------------------------------------
    def _send(self, cmd) -> None:
        self._cmds.put(cmd)
        self._wake.set()

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
                _, rid, prompt, params, ack, on_finish = cmd
                try:
                    self.engine.add_request(rid, prompt, params)
                except Exception as e:  # a user error: that request fails, the engine goes on
                    if on_finish is not None:  # before the ack: the caller may look the moment it wakes
                        self._on_finish[rid] = on_finish
                        self._finished(rid, e)
                    ack.set_exception(e)
                else:
                    if on_finish is not None:
                        self._on_finish[rid] = on_finish
                    ack.set_result(None)
            elif cmd[0] == "abort":
                self.engine.abort(cmd[1])

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._stats = self.engine.stats()
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outs = self.engine.step()
                self._stats = self.engine.stats()
                for out in outs:
                    if out.finished:
                        self._finished(out.request_id, out)
                deliver_step(self._streams, self._lock, outs)
        except BaseException as e:  # a bug or an accelerator failure: fail loudly, refuse new work
            log.exception("engine loop crashed")
            self.error = e
        err = EngineDeadError(f"the engine stopped: {self.error!r}" if self.error else "the engine was shut down")
        with self._lock:
            streams = list(self._streams.values())
        for rid in list(self._on_finish):  # before the streams hear of it, as for finished requests
            self._finished(rid, err)
        fail_streams(streams, err)
        # requests still queued in _cmds: fail their acknowledgements
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add" and not cmd[4].done():
                if cmd[5] is not None:
                    self._on_finish[cmd[1]] = cmd[5]
                    self._finished(cmd[1], err)
                cmd[4].set_exception(err)
