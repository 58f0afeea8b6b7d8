"""Scheduler: which requests compute which tokens each engine step (plain bookkeeping, torch-free).

The engine step is schedule -> execute -> update:

    out = scheduler.schedule()                        # SchedulerOutput: what to compute, where
    res = runner.execute(out)                         # RunnerOutput: sampled tokens (the only GPU work)
    deltas = scheduler.update_from_output(out, res)   # RequestDeltas: new tokens, finish reasons

ONE rule for every request, no prefill/decode branches: its computed tokens catch up with its known
tokens (prompt + output, plus any draft tokens to verify), under a per-step token budget
(`max_num_batched_tokens`, so long prompts are prefilled in chunks) and at most `max_num_seqs` running
requests. Running requests are served first, oldest first (their decodes); then waiting requests are
admitted in arrival order, strictly first come first served. A request's logits are sampled only on
the step its computed tokens reach its known tokens (the last prefill chunk, or a decode).

When blocks run out, the most recently admitted running request is preempted: its blocks are freed
(they keep their hashes, so its recompute is often a prefix-cache hit), its computed tokens reset to 0
and it goes back to the FRONT of the waiting queue. The oldest running request is never preempted for
a younger one, and add_request rejects a request that could not fit the whole pool on its own, so
every step makes progress: no deadlock, no livelock.

Speculative decoding: the runner may propose draft tokens for a request (RunnerOutput.spec_token_ids);
the next step schedules them after the last known token, the runner verifies them and returns the
accepted drafts plus one token of its own (1..k+1 tokens), and num_computed_tokens is rolled back past
the rejected drafts. Their blocks stay allocated (the next tokens overwrite those slots) until the
request finishes. This module knows nothing about tensors, models, text or how drafts are proposed.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from muse.common.errors import ConfigError, ResourceError, UsageError
from muse.infer.kv_blocks import KVCacheManager
from muse.infer.request import Request, RequestStatus
from muse.infer.sampling_params import SamplingParams


@dataclass
class SchedulerConfig:
    """Limits of one engine: per-step work, concurrency, KV pool, stop token, context length.

    `EngineConfig` extends this class (these fields are declared once, here). The three that default
    to None are what an Engine derives when they are not given; a bare Scheduler needs num_blocks and
    max_model_len set."""

    num_blocks: int | None = None           # KV blocks in the pool; None: the engine sizes it from memory
    block_size: int = 16                    # token slots per block
    max_num_seqs: int = 64                  # running requests at most
    max_num_batched_tokens: int = 2048      # tokens computed per step, all requests together
    max_model_len: int | None = None        # prompt + output tokens of one request at most; None: the
                                            # engine takes the model's max_seq_len
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True     # False: a prompt is computed in one step or waits
    eos_token_id: int | None = None         # default eos for requests that do not set their own; an
                                            # engine fills in its tokenizer's end-of-text when None

    def __post_init__(self):
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if value is None and name in ("num_blocks", "max_model_len"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"scheduler {name} must be a positive integer, got {value!r}")
        if (not self.enable_chunked_prefill and self.max_model_len is not None
                and self.max_num_batched_tokens < self.max_model_len):
            # a request preempted near max_model_len recomputes all its tokens in one step
            raise ConfigError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                              f"max_model_len ({self.max_model_len}) when chunked prefill is off; "
                              f"raise it, lower max_model_len, or enable chunked prefill")

    def for_scheduler(self, **values) -> SchedulerConfig:
        """This config's scheduler fields (an EngineConfig's too) as a plain SchedulerConfig, `values`
        replacing some: how an engine hands over the limits it derived (num_blocks, max_model_len)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(SchedulerConfig)}
        return SchedulerConfig(**(own | values))


@dataclass
class ScheduledRequest:
    """One request's work this step. Positions start_pos .. start_pos + len(token_ids) - 1."""

    request_id: str
    token_ids: list[int]             # tokens to compute this step; the last len(spec_token_ids) are drafts
    start_pos: int                   # position of token_ids[0] (= num_computed_tokens before the step)
    block_ids: list[int]             # the whole block table; covers every position up to the last one
    spec_token_ids: list[int]        # draft tokens to verify (the tail of token_ids)
    sample: bool                     # logits needed: sample at the last known token and at each draft
    is_new: bool                     # first step since admission or resumption: (re)build runner state
    all_token_ids: list[int] | None  # when is_new: prompt + output so far (for penalties); else None
    num_prompt_tokens: int           # positions below this are prompt (prompt logprobs)
    sampling_params: SamplingParams

    @property
    def num_scheduled_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    """What the runner computes this step, and the requests whose runner-side state it may drop."""

    requests: list[ScheduledRequest] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)   # preempted this step
    finished_request_ids: list[str] = field(default_factory=list)    # finished/aborted since last step

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.requests)

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass
class RunnerOutput:
    """What the runner computed. Logprob entries are opaque to the scheduler (the runner's format)."""

    # per request with sample=True: 1 token, or the accepted drafts + 1 when drafts were scheduled
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[Any]] = field(default_factory=dict)         # one entry per sampled token
    # logprobs of prompt tokens max(start_pos + 1, S) .. min(start_pos + len(token_ids), num_prompt_tokens - 1),
    # S = sampling_params.first_prompt_logprob (prompt_logprobs_start, default 1)
    prompt_logprobs: dict[str, list[Any]] = field(default_factory=dict)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)   # drafts for the next step
    # requests the runner failed on alone (it logged why): they finish with "error"
    failed: set[str] = field(default_factory=set)


@dataclass
class RequestDelta:
    """What happened to one request this step, for the engine to stream to its client."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None     # "stop" | "length" | "abort" | "error" | None (still running)
    stop_reason: int | None = None       # the stop token id that ended it (None for eos)
    logprobs: list[Any] | None = None
    prompt_logprobs: list[Any] | None = None
    parent_id: str | None = None         # n > 1: the client's request id; index says which sample
    index: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0           # prefix-cache hits at admission, for usage reporting

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_usage: float                      # fraction of KV blocks held by requests
    num_free_blocks: int
    prefix_cache_queried_tokens: int     # known tokens of admitted requests
    prefix_cache_hit_tokens: int         # of which were found in the prefix cache
    num_preemptions: int
    num_draft_tokens: int                # drafts scheduled for verification
    num_accepted_tokens: int             # drafts accepted


class Scheduler:
    """Waiting queue, running list and KV manager; see the module docstring for the policy."""

    def __init__(self, config: SchedulerConfig):
        if config.num_blocks is None or config.max_model_len is None:
            raise ConfigError("a Scheduler needs num_blocks and max_model_len; set them (an Engine derives "
                              "them from memory and the model)")
        self.config = config
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []        # in admission order: the last is preempted first
        self._arrivals = itertools.count()
        self._finished_ids: list[str] = []      # for the next SchedulerOutput
        self._abort_deltas: list[RequestDelta] = []
        self._counters = dict.fromkeys(("queried", "hits", "preemptions", "drafts", "accepted"), 0)

    # ----- requests in and out -------------------------------------------------------------------
    def add_request(self, request: Request) -> list[str]:
        """Queue a request (fanned out into its children when n > 1); returns the ids queued.

        Raises UsageError for an empty or too long prompt or a duplicate id, and ResourceError when
        prompt + max_tokens could not fit the whole KV pool even alone.
        """
        cfg, prompt_len = self.config, request.num_prompt_tokens
        if prompt_len == 0:
            raise UsageError(f"request {request.request_id} has an empty prompt; send at least one token")
        if min(request.prompt_token_ids) < 0:
            raise UsageError(f"request {request.request_id} has a negative token id")
        if prompt_len >= cfg.max_model_len:
            raise UsageError(f"prompt of request {request.request_id} has {prompt_len} tokens, but the "
                             f"model's max length is {cfg.max_model_len} (prompt + output); shorten it")
        max_tokens = min(request.max_tokens, cfg.max_model_len - prompt_len)
        # the last sampled token is never computed, so a request holds at most prompt + max_tokens - 1
        need = self.kv.num_blocks_needed(prompt_len + max_tokens - 1)
        if need > cfg.num_blocks:
            raise ResourceError(f"request {request.request_id}: prompt ({prompt_len} tokens) + max_tokens "
                                f"({max_tokens}) needs {need} KV blocks of {cfg.block_size} tokens but "
                                f"the pool has {cfg.num_blocks}; lower max_tokens or give the KV cache "
                                f"more memory")
        children = request.fan_out()
        for child in children:
            if child.request_id in self.requests:
                raise UsageError(f"request id {child.request_id} is already in use; ids must be unique")
        for child in children:
            child.max_tokens = max_tokens
            if child.eos_token_id is None:
                child.eos_token_id = cfg.eos_token_id
            child.arrival_index = next(self._arrivals)
            child.status = RequestStatus.WAITING
            self.requests[child.request_id] = child
            self.waiting.append(child)
        return [c.request_id for c in children]

    def abort(self, request_id: str) -> list[str]:
        """Abort a request, or every child of an n > 1 parent id; returns the ids aborted.

        Blocks are freed now; each aborted id appears in the next update's deltas (finish "abort") and
        in the next SchedulerOutput's finished ids. Unknown or already finished ids are ignored.
        """
        if request_id in self.requests:
            targets = [self.requests[request_id]]
        else:
            targets = [r for r in self.requests.values() if r.parent_id == request_id]
        for req in targets:
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            self._abort_deltas.append(self._delta(req, [], None, None))
        return [r.request_id for r in targets]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self._abort_deltas)

    def reset_prefix_cache(self) -> int:
        """Forget every prefix-cache entry (after a weight update the cached K/V are stale); returns how
        many. Running requests keep their blocks and finish on them, but nothing they computed is
        reused by a later request (kv_blocks.KVCacheManager.reset_prefix_cache)."""
        return self.kv.reset_prefix_cache()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def stats(self) -> SchedulerStats:
        c = self._counters
        return SchedulerStats(len(self.running), len(self.waiting), self.kv.usage, self.kv.num_free_blocks,
                              c["queried"], c["hits"], c["preemptions"], c["drafts"], c["accepted"])

    # ----- the step --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = cfg.max_num_batched_tokens

        # 1. running requests, oldest first
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_known = req.num_tokens - req.num_computed_tokens
            # without chunked prefill num_known is 1 here: admission computed the whole prompt
            num_new = min(num_known + len(req.spec_token_ids), budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                out.preempted_request_ids.append(victim.request_id)
                if victim is req:
                    break
            else:
                out.requests.append(self._scheduled(req, num_new, is_new=False))
                budget -= num_new
                i += 1

        # 2. waiting requests, in arrival order (preempted ones were put back at the front).
        # After a preemption this step the pool is full: admitting would only preempt again.
        while (self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs
               and not out.preempted_request_ids):
            req = self.waiting[0]
            hits, num_hit_tokens = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_hit_tokens
            if num_new > budget:
                if not cfg.enable_chunked_prefill:
                    break  # the whole prompt waits for a step with room for it
                num_new = budget
            if not self.kv.allocate_slots(req, num_new, hits):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_hit_tokens
            if req.num_cached_tokens < 0:  # first admission: what the user is billed as cached
                req.num_cached_tokens = num_hit_tokens
            self._counters["queried"] += req.num_tokens
            self._counters["hits"] += num_hit_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.requests.append(self._scheduled(req, num_new, is_new=True))
            budget -= num_new
        return out

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: RunnerOutput) -> list[RequestDelta]:
        """Advance every scheduled request by what the runner computed; returns what changed."""
        deltas, self._abort_deltas = self._abort_deltas, []
        failed = runner_output.failed
        for s in scheduler_output.requests:
            req = self.requests.get(s.request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted (or finished) while the step ran
            if failed and s.request_id in failed:  # its tokens of this step (if any) are dropped
                self.running.remove(req)
                self._finish(req, RequestStatus.FINISHED_ERROR)
                deltas.append(self._delta(req, [], None, None))
                continue
            sampled = runner_output.sampled_token_ids.get(s.request_id, [])
            num_drafts = len(s.spec_token_ids)
            if (s.sample and not 1 <= len(sampled) <= num_drafts + 1) or (not s.sample and sampled):
                raise RuntimeError(f"runner returned {len(sampled)} tokens for {s.request_id}; expected "
                                   f"{f'1..{num_drafts + 1}' if s.sample else 'none'}")
            # computed everything scheduled, minus the rejected drafts (their K/V slots are garbage)
            req.num_computed_tokens = s.start_pos + len(s.token_ids)
            if s.sample:
                req.num_computed_tokens -= num_drafts + 1 - len(sampled)
                req.spec_token_ids = []
                self._counters["drafts"] += num_drafts
                self._counters["accepted"] += len(sampled) - 1
            status = None
            new_tokens: list[int] = []
            for tok in sampled:
                req.append_output(tok)
                new_tokens.append(tok)
                status = req.check_stop()
                if status is not None:
                    break  # tokens after a stop are dropped
            prompt_lps = self._new_prompt_logprobs(req, s, runner_output.prompt_logprobs.get(s.request_id))
            logprobs = runner_output.logprobs.get(s.request_id)
            if status is not None:
                self.running.remove(req)
                self._finish(req, status)
            elif s.sample and s.request_id in runner_output.spec_token_ids:
                room = req.max_tokens - req.num_output_tokens - 1  # drafts never outrun max_tokens
                req.spec_token_ids = list(runner_output.spec_token_ids[s.request_id][:max(room, 0)])
            if new_tokens or status is not None or prompt_lps:
                deltas.append(self._delta(req, new_tokens, logprobs[:len(new_tokens)] if logprobs else None,
                                          prompt_lps))
        return deltas

    # ----- helpers ---------------------------------------------------------------------------------
    def _scheduled(self, req: Request, num_new: int, is_new: bool) -> ScheduledRequest:
        start = req.num_computed_tokens
        tokens = req.all_token_ids[start:start + num_new]
        drafts = req.spec_token_ids[:num_new - len(tokens)]
        return ScheduledRequest(
            request_id=req.request_id, token_ids=tokens + drafts, start_pos=start,
            block_ids=self.kv.block_ids(req.request_id), spec_token_ids=drafts,
            sample=start + len(tokens) == req.num_tokens, is_new=is_new,
            all_token_ids=list(req.all_token_ids) if is_new else None,
            num_prompt_tokens=req.num_prompt_tokens, sampling_params=req.sampling_params)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        self._counters["preemptions"] += 1

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """Mark finished and free its blocks; the caller has taken it off running/waiting."""
        req.status = status
        self.kv.free(req)
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)

    def _new_prompt_logprobs(self, req: Request, s: ScheduledRequest, entries: list | None) -> list | None:
        """The prompt-logprob entries not reported before (a preempted request recomputes its prompt)."""
        if not entries:
            return None
        # entries[j] is the logprob of prompt token first + j (the runner's rule, RunnerOutput.prompt_logprobs)
        first = max(s.start_pos + 1, s.sampling_params.first_prompt_logprob)
        fresh = entries[max(0, req.num_prompt_logprobs_sent + 1 - first):]
        req.num_prompt_logprobs_sent = max(req.num_prompt_logprobs_sent, first - 1 + len(entries))
        return fresh or None

    def _delta(self, req: Request, new_tokens: list[int], logprobs, prompt_logprobs) -> RequestDelta:
        return RequestDelta(req.request_id, new_tokens, req.status.finish_reason, req.stop_reason, logprobs,
                            prompt_logprobs, req.parent_id, req.index, req.num_prompt_tokens,
                            max(req.num_cached_tokens, 0))

    def check_invariants(self) -> None:
        """For tests: KV invariants plus every running request holding blocks for its computed tokens."""
        self.kv.check_invariants()
        if len(self.running) > self.config.max_num_seqs:
            raise AssertionError(f"{len(self.running)} running > max_num_seqs {self.config.max_num_seqs}")
        for req in self.running:
            if req.status != RequestStatus.RUNNING or req.num_computed_tokens > req.num_tokens:
                raise AssertionError(f"bad running request {req}")
            if len(self.kv.block_ids(req.request_id)) < self.kv.num_blocks_needed(req.num_computed_tokens):
                raise AssertionError(f"{req} holds too few blocks")
        for req in self.waiting:
            if req.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED) or self.kv.block_ids(
                    req.request_id) or req.num_computed_tokens:
                raise AssertionError(f"bad waiting request {req}")
        if len(self.requests) != len(self.running) + len(self.waiting):
            raise AssertionError("request table out of sync with the queues")
