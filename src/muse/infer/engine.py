"""Engine: the step loop (schedule -> execute -> update), and the synchronous way to drive it.

    engine = Engine(model, EngineConfig(max_num_seqs=64), tokenizer=tok)
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=64))
    while engine.has_unfinished_requests():
        for out in engine.step():            # RequestOutput of every request that changed
            ...

`Engine.step_deltas()` is the step itself: per sample, only what is new this step (`RequestDelta`).
Deltas travel, state accumulates once: the engine clients (client.py: the in-thread
`ThreadEngineClient`; engine_process.py: `EngineProcessClient`) fold them into `RequestOutput`s with
one `OutputProcessor` on the caller's side. `Engine.step()` folds them itself, for synchronous callers:
`LLM`, the facade for offline batches (`generate(prompts, params)`, with a progress bar), benchmarks
and tests. Outputs are merged per client request: the n samples of one request arrive as one
`RequestOutput` with n `CompletionOutput`s.

No request can take the engine down: token ids are checked against the vocabulary at admission
(UsageError, nothing queued), and a request the runner fails on alone finishes with finish_reason
"error" while the others go on (runner.py). Only a failure common to every request (the forward
pass, the device) raises from a step.

The engine works on token ids. Text appears only in `LLM` (encode str prompts, decode outputs) when
it has a tokenizer; stop strings, chat templates and detokenized streaming are the edges' business.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Sequence
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
from muse.infer.seq_attention import check_backend
from muse.infer.spec_decode import SpeculativeConfig

log = get_logger("muse.infer")

CPU_KV_CACHE_BYTES = 2 << 30   # default KV pool cap on CPU
GPU_KV_CACHE_FRACTION = 0.8    # default: this fraction of the accelerator's free memory
HOST_PHASES = ("schedule", "prepare", "forward", "sample", "update", "output")  # EngineStats.host_seconds


@dataclass
class EngineConfig(SchedulerConfig):
    """Engine limits: the scheduler's (inherited: num_blocks, block_size, max_num_seqs,
    max_num_batched_tokens, max_model_len, enable_prefix_caching, enable_chunked_prefill, eos_token_id;
    the engine derives those left None) plus how big the KV pool is and whether to speculate."""

    kv_cache_bytes: int | None = None       # None: 80% of free accelerator memory; on CPU what max_num_seqs
                                            # full-length sequences need, at most 2 GiB (when num_blocks is None)
    speculative: SpeculativeConfig | None = None
    seed: int = 0                           # seeds of unseeded requests are drawn from this
    max_batched_query: int = 64             # attention: query lengths up to this share padded calls
    # how a step attends over the paged K/V pool (muse.infer.seq_attention): "paged-reference" (padded
    # groups over gathered blocks), "paged-contiguous" (one SDPA per sequence over a view of its blocks),
    # "paged-decode" (decode-only steps scored in place over runs of the pool, muse.infer.decode_attention),
    # "auto" (the second for steps of a few sequences, the third for big decode steps on CPU, else the first)
    attention_backend: str = "auto"  # also "flex" (compiled FlexAttention, CUDA) and "flex-eager" (its reference)
    # decode-only steps (one new token per request, no drafts) replayed as CUDA graphs, one per batch and
    # context bucket, captured when the engine starts (muse.infer.cuda_graph). Off by default until
    # bench/gpu.sh's graph steps have checked capture and replay on a device (the path is tested on CPU
    # eagerly, never yet captured); True needs a model on CUDA (a ConfigError elsewhere)
    cuda_graphs: bool = False
    # the same padded static decode path run eagerly, without capturing (any device): what the CPU tests
    # exercise; with a CUDA model it takes precedence over cuda_graphs (to tell a capture bug from a
    # padding bug)
    static_decode_eager: bool = False
    cuda_graph_batch_sizes: tuple[int, ...] | None = None  # batch buckets; None: 1, 2, 4, .. max_num_seqs

    def __post_init__(self):
        super().__post_init__()
        check_backend(self.attention_backend)
        sizes = self.cuda_graph_batch_sizes
        if sizes is not None:
            if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
                raise ConfigError(f"cuda_graph_batch_sizes must be positive integers, got {sizes!r}")
            self.cuda_graph_batch_sizes = tuple(sorted(set(sizes)))

    def static_decode(self, device: torch.device) -> str | None:
        """How decode-only steps run on `device`: None (eagerly, like every step), "eager" (the padded
        static path, not captured) or "graphs" (captured CUDA graphs)."""
        if self.static_decode_eager:
            return "eager"
        if self.cuda_graphs and device.type != "cuda":
            raise ConfigError(f"cuda_graphs=True needs a model on a CUDA device (this one is on {device.type}); "
                              f"leave it off, or use static_decode_eager")
        return "graphs" if self.cuda_graphs else None


@dataclass
class CompletionOutput:
    """One sample of a request: everything generated so far, and what this step added."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)
    # "stop" | "length" | "abort" | "error" (the engine failed on this request alone; the others were
    # unaffected: a server answers it with a 5xx) | None while running
    finish_reason: str | None = None
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
    # With SamplingParams.prompt_logprobs: entry j is the logprob of prompt token S + j given the tokens
    # before it, for positions S .. len(prompt) - 1, S = prompt_logprobs_start (default 1: one entry per
    # prompt token after the first). None when nothing was asked for or no position is >= S.
    prompt_logprobs: list[TokenLogprob] | None = None
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

    @property
    def failed(self) -> bool:
        """Some sample finished with "error": the engine failed on this request (and on it alone)."""
        return any(c.finish_reason == "error" for c in self.outputs)


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
    # how decode-only steps run: "graphs" (CUDA graphs), "eager" (the padded static path, not
    # captured), "off" (like every other step); steps that took that path; bytes the graphs hold
    attention_backend: str = ""             # EngineConfig.attention_backend ("auto": per step, see seq_attention)
    static_decode: str = "off"
    num_static_steps: int = 0
    cuda_graph_bytes: int = 0
    # host seconds spent in each phase of the step loop, summed over every step so far: "schedule"
    # (Scheduler.schedule), "prepare" (runner state, flattening, the attention plan or static inputs),
    # "forward" (launching the model; on an accelerator also waiting for it), "sample" (sampling,
    # logprobs, drafts and their bookkeeping), "update" (Scheduler.update_from_output), "output"
    # (counting, and folding deltas into RequestOutputs in step()). Wall-clock time (time.perf_counter:
    # a thread-CPU clock measured ~4 us a call on the 2-vCPU VM, ~10 calls a step); left out of ==
    host_seconds: dict[str, float] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class EngineDeadError(RuntimeError):
    """The engine stopped (a crash, or its client was shut down): streams fail with this and new
    requests are refused. The message is safe to show a client; the details are in the log."""

    retryable = False


class EngineRestartingError(EngineDeadError):
    """The engine process died and its client is starting a new one: this request is lost, but the
    same request sent again once the client is healthy is served (a server answers 503 + Retry-After)."""

    retryable = True


class RequestTracker:
    """Accumulates one client request's deltas (all n samples) into a RequestOutput."""

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


class OutputProcessor:
    """Folds per-step RequestDeltas into RequestOutputs: the one place state accumulates, on the
    caller's side of the engine. Not thread-safe: its owner guards it."""

    def __init__(self):
        self._trackers: dict[str, RequestTracker] = {}

    def add(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self._trackers[request_id] = RequestTracker(request_id, prompt, params.n, params.logprobs is not None)

    def discard(self, request_id: str) -> None:
        """Stop following a request (refused, or failed by the client): its later deltas are ignored."""
        self._trackers.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._trackers

    def request_ids(self) -> list[str]:
        return list(self._trackers)

    def process(self, deltas: Iterable[RequestDelta]) -> list[RequestOutput]:
        """One RequestOutput per followed request that changed, in first-delta order; finished
        requests are dropped after their last one."""
        changed: dict[str, RequestTracker] = {}
        for d in deltas:
            rid = d.parent_id or d.request_id
            tracker = self._trackers.get(rid)
            if tracker is None:
                continue
            tracker.apply(d)
            changed[rid] = tracker
        outs = []
        for rid, tracker in changed.items():
            outs.append(tracker.snapshot())
            if tracker.out.finished:
                del self._trackers[rid]
        return outs


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


@dataclass
class _Live:
    """A client request the engine has not finished: what step() needs to fold its deltas."""

    prompt: list[int]
    params: SamplingParams
    unfinished: int                          # samples still running


class Engine:
    """Scheduler + ModelRunner; see the module docstring."""

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
        self.scheduler = Scheduler(config.for_scheduler(num_blocks=num_blocks, max_model_len=max_model_len,
                                                        eos_token_id=eos))
        self.runner = ModelRunner(model, num_blocks=num_blocks, block_size=config.block_size,
                                  max_model_len=max_model_len, eos_token_id=eos, seed=config.seed,
                                  speculative=config.speculative, max_batched_query=config.max_batched_query,
                                  vocab_limit=None if tokenizer is None else tokenizer.vocab_size,
                                  attention_backend=config.attention_backend,
                                  static_decode=config.static_decode(next(model.parameters()).device),
                                  static_batch_sizes=config.cuda_graph_batch_sizes, max_num_seqs=config.max_num_seqs)
        self.num_blocks, self.max_model_len = num_blocks, max_model_len
        self.vocab_size: int = model.config.vocab_size
        self._live: dict[str, _Live] = {}
        self._folded = OutputProcessor()  # step()'s trackers (step_deltas() callers fold their own)
        self._counts = dict.fromkeys(("steps", "finished", "prompt", "generated"), 0)
        self._host = dict.fromkeys(("schedule", "update", "output"), 0.0)  # the runner times the rest

    @classmethod
    def from_checkpoint(cls, path, config: EngineConfig | None = None, *, device="cpu",
                        dtype: torch.dtype | None = None, stages=("base",)) -> Engine:
        from muse.checkpoint import load

        model, tokenizer, _ = load(path, device=device, dtype=dtype, stages=stages)
        return cls(model, config, tokenizer=tokenizer)

    # ----- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams | None = None) -> None:
        """Queue a request; UsageError / ResourceError when it cannot be served (nothing is queued).

        Every token id the request carries (prompt, stop_token_ids) must be in the vocabulary: they
        index tensors, and one out-of-range id would fail the step of every request batched with it."""
        params = params or SamplingParams()
        request_id = str(request_id)
        if request_id in self._live:
            raise UsageError(f"request id {request_id} is already in use; ids must be unique")
        prompt = [int(t) for t in prompt_token_ids]
        self._check_vocab(request_id, "prompt", prompt)
        self._check_vocab(request_id, "stop_token_ids", params.stop_token_ids)
        self.scheduler.add_request(Request(request_id, prompt, params))
        self._live[request_id] = _Live(prompt, params, params.n)
        self._counts["prompt"] += len(prompt) * params.n

    def _check_vocab(self, request_id: str, what: str, ids: Sequence[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            raise UsageError(f"request {request_id}: {what} has token id {bad}, outside the vocabulary "
                             f"(0..{self.vocab_size - 1})")

    def abort(self, request_id: str) -> None:
        """Abort a request (all its samples); its last output (finish "abort") comes with the next step."""
        self.scheduler.abort(str(request_id))

    def has_request(self, request_id: str) -> bool:
        """The request was added and has not delivered its final output yet."""
        return str(request_id) in self._live

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def reset_prefix_cache(self) -> int:
        """Forget the prefix cache (call it after changing the model's weights); returns the entries
        dropped. Running requests finish on the K/V they have (scheduler.reset_prefix_cache)."""
        return self.scheduler.reset_prefix_cache()

    # ----- the step ----------------------------------------------------------------------------------
    def step_deltas(self) -> list[RequestDelta]:
        """One schedule -> execute -> update cycle: per sample that changed, what is new (token ids,
        logprobs, prompt logprobs, the finish). `parent_id or request_id` is the client's request id.

        A request the runner failed on alone gets a last delta with finish_reason "error"; an
        exception from here is an engine failure (every request is lost). Use this or step(), not both."""
        deltas = self._advance()
        t0 = time.perf_counter()
        self._retire(deltas)
        self._host["output"] += time.perf_counter() - t0
        return deltas

    def step(self) -> list[RequestOutput]:
        """step_deltas() folded: the RequestOutput of every request that changed (cumulative token ids,
        this step's new_token_ids; the last one has finished=True)."""
        deltas = self._advance()
        t0 = time.perf_counter()
        for d in deltas:
            rid = d.parent_id or d.request_id
            if rid not in self._folded and rid in self._live:
                live = self._live[rid]
                self._folded.add(rid, live.prompt, live.params)
        self._retire(deltas)
        outs = self._folded.process(deltas)
        self._host["output"] += time.perf_counter() - t0
        return outs

    def _advance(self) -> list[RequestDelta]:
        t0 = time.perf_counter()
        so = self.scheduler.schedule()
        t1 = time.perf_counter()
        ro = self.runner.execute(so)
        t2 = time.perf_counter()
        deltas = self.scheduler.update_from_output(so, ro)
        self._host["schedule"] += t1 - t0
        self._host["update"] += time.perf_counter() - t2
        self._counts["steps"] += 1
        return deltas

    def _retire(self, deltas: list[RequestDelta]) -> None:
        """Count the step's tokens; forget the client requests whose last sample finished."""
        for d in deltas:
            self._counts["generated"] += len(d.new_token_ids)
            if d.finish_reason is not None:
                rid = d.parent_id or d.request_id
                live = self._live.get(rid)
                if live is None:
                    continue
                live.unfinished -= 1
                if live.unfinished == 0:
                    del self._live[rid]
                    self._counts["finished"] += 1

    def stats(self) -> EngineStats:
        s, c = self.scheduler.stats(), self._counts
        host = {**self._host, **self.runner.host_seconds}
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_usage=s.kv_usage,
            num_blocks=self.num_blocks, num_free_blocks=s.num_free_blocks,
            prefix_cache_hit_rate=s.prefix_cache_hit_tokens / max(s.prefix_cache_queried_tokens, 1),
            num_preemptions=s.num_preemptions,
            spec_acceptance_rate=s.num_accepted_tokens / s.num_draft_tokens if s.num_draft_tokens else None,
            num_steps=c["steps"], num_requests_finished=c["finished"], num_prompt_tokens=c["prompt"],
            num_generation_tokens=c["generated"], attention_backend=self.runner.attention_backend,
            static_decode=self.runner.static_decode or "off",
            num_static_steps=self.runner.num_static_steps,
            cuda_graph_bytes=0 if self.runner.decode_graphs is None else self.runner.decode_graphs.graph_bytes,
            host_seconds={k: host[k] for k in HOST_PHASES})


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
            while any(engine.has_request(rid) for rid in added):
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
