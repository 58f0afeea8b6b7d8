"""ModelRunner: executes one SchedulerOutput on the model and returns a RunnerOutput.

The only part of the engine that touches tensors. Per step:
  1. drop the state of finished and preempted requests; (re)build it for `is_new` ones;
  2. flatten every scheduled request's tokens into ONE (1, N) batch and build the step's attention
     over the paged K/V pool with the configured backend (seq_attention.make_step: paged_cache.py's
     reference plan, one SDPA per sequence over views of its blocks, or decodes scored in place by
     decode_attention.py): prefill chunks, decodes and draft verifications of any number of requests
     in one forward pass;
  3. compute logits only at the rows that need them: each sampling request's last known token and
     its drafts, and the positions whose next token is a prompt token for prompt_logprobs requests;
  4. sample (sampler.py), or verify drafts by rejection sampling (spec_decode.py); logprobs of the
     sampled tokens and of the prompt tokens, from the raw model distribution;
  5. propose drafts for the next step, if speculative decoding is on.
Decode-only steps (every request computes one token, no drafts) may take a padded static path
instead of step 2's ragged batch (cuda_graph.py: replayed as a CUDA graph, or run eagerly); steps
3-5 are the same for both. `host_seconds` adds up, per phase, the host time of every step: "prepare"
(request state, flattening, the attention plan or the static inputs), "forward" (launching the model,
and on an accelerator waiting for it), "sample" (steps 3-5 and their bookkeeping).
Steps 1-2 are the same for every request (token ids and positions, checked at admission), so a
failure there is the engine's and raises. Steps 3-5 read each request's own settings: when they raise,
they are run again request by request, and the requests that fail alone are reported in
`RunnerOutput.failed` (the scheduler finishes them with "error") while the others go on.

Runner-side request state is the token list (prompt + output as the runner knows it, for penalties
and proposals), the sampling seed, and the draft distributions awaiting verification. It knows
nothing about scheduling policy: it executes every SchedulerOutput exactly as given (the scheduler
registers prefix-cache blocks at schedule time, so dropping part of a step would corrupt them).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

import torch

from muse.common.device import synchronize
from muse.common.errors import ConfigError, ResourceError
from muse.common.logging import get_logger
from muse.infer.cuda_graph import DecodeGraphs, powers_of_two_up_to
from muse.infer.paged_cache import PagedKVPool, PagedStep, SeqSpan, StepPlan, long_tensor
from muse.infer.sampler import (
    SamplingBatch,
    SamplingRow,
    is_plain_greedy,
    sample,
    target_probs,
    token_logprobs,
)
from muse.infer.sampling_params import SamplingParams
from muse.infer.scheduler import RunnerOutput, ScheduledRequest, SchedulerOutput
from muse.infer.seq_attention import check_backend, make_step
from muse.infer.spec_decode import (
    DraftInput,
    DraftModelProposer,
    NgramProposer,
    SpeculativeConfig,
    rejection_sample,
)

log = get_logger("muse.infer")


def is_decode_only(so: SchedulerOutput) -> bool:
    """Every scheduled request computes exactly one token and has no drafts (a decode, or a prompt's
    one-token chunk): the steps the static decode path (cuda_graph.py) may run."""
    return all(len(s.token_ids) == 1 and not s.spec_token_ids for s in so.requests)


@dataclass
class _RequestState:
    token_ids: list[int]                    # prompt + output known to the runner
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    stop_ids: tuple[int, ...]               # masked below min_tokens
    max_tokens: int                         # generation limit (clamped to the model's length)
    draft_probs: torch.Tensor | None = None  # (k, V) proposal distributions of the pending drafts

    @property
    def plain_greedy(self) -> bool:
        """This step's token is the argmax of the raw logits (sampler.is_plain_greedy)."""
        return is_plain_greedy(self.params, len(self.token_ids) - self.num_prompt_tokens, self.stop_ids)


class ModelRunner:
    """Owns the paged K/V pool and executes scheduler steps on `model`."""

    def __init__(self, model, *, num_blocks: int, block_size: int, max_model_len: int,
                 eos_token_id: int | None = None, seed: int = 0,
                 speculative: SpeculativeConfig | None = None, max_batched_query: int = 64,
                 vocab_limit: int | None = None, attention_backend: str = "paged-reference",
                 static_decode: str | None = None, static_batch_sizes: tuple[int, ...] | None = None,
                 max_num_seqs: int = 64):
        """static_decode: None (every step eager, through `attention_backend`), "eager" (decode-only
        steps through the padded static path, run eagerly: any device) or "graphs" (the same, captured
        as CUDA graphs here, up front); static_batch_sizes: its batch buckets (None: 1, 2, 4, ..
        max_num_seqs)."""
        if static_decode not in (None, "eager", "graphs"):
            raise ConfigError(f"static_decode must be None, 'eager' or 'graphs', got {static_decode!r}")
        self.model = model
        self.attention_backend = check_backend(attention_backend)
        cfg = model.config
        if max_model_len > cfg.max_seq_len:
            raise ConfigError(f"max_model_len ({max_model_len}) is longer than the model's max_seq_len "
                              f"({cfg.max_seq_len}); lower it")
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.attention_backend == "flex" and self.device.type == "cpu":
            # a compile error surfaces mid-run, at a step whose sizes trigger it, and would end every request
            raise ConfigError("the compiled flex attention backend is not for CPU: torch's CPU flex template can "
                              "fail to compile mid-run (torch 2.13), and it measured no faster than 'auto' "
                              "(BENCHMARKS.md section 5); use 'auto', or 'flex-eager' to check the flex mask")
        self.vocab_size = cfg.vocab_size
        # a model whose vocabulary was padded past the tokenizer's must never sample the padding ids
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < cfg.vocab_size else None
        self.block_size, self.max_model_len = block_size, max_model_len
        self.eos_token_id = eos_token_id
        self.max_batched_query = max_batched_query
        self.n_rep = cfg.n_head // cfg.n_kv_head  # query heads per k/v head (how StepPlan groups)
        # the static decode path's padding rows write one block past the scheduler's (cuda_graph.py)
        extra = 0 if static_decode is None else 1
        self.pool = PagedKVPool.for_model(cfg, num_blocks + extra, block_size, self.device, self.dtype)
        self.static_decode = static_decode
        self.decode_graphs = None
        if static_decode is not None:
            try:
                self.decode_graphs = DecodeGraphs(model, self.pool, max_model_len=max_model_len,
                                                  batch_sizes=static_batch_sizes or powers_of_two_up_to(max_num_seqs),
                                                  capture=static_decode == "graphs")
            except ResourceError:
                raise
            except Exception:
                if static_decode != "graphs":
                    raise
                # a capture that fails for another reason (a kernel that cannot be captured on this
                # device or torch) must not take the engine down: decode steps run eagerly, the stats
                # say so (static_decode "off"), the log has the traceback
                log.warning("capturing the decode CUDA graphs failed; decode steps run eagerly "
                            "(EngineConfig.cuda_graphs=False silences this)", exc_info=True)
                self.static_decode = None
        self.host_seconds = dict.fromkeys(("prepare", "forward", "sample"), 0.0)
        self.num_static_steps = 0  # steps that ran the static decode path
        self.states: dict[str, _RequestState] = {}
        self._rng = random.Random(seed)  # seeds for unseeded requests
        self.proposer = None
        if speculative is not None:
            if speculative.method == "ngram":
                self.proposer = NgramProposer(speculative.num_tokens, speculative.ngram_min,
                                              speculative.ngram_max)
            else:
                draft = speculative.draft_model
                if draft.config.vocab_size != cfg.vocab_size:
                    raise ConfigError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from "
                                      f"the target's ({cfg.vocab_size}); drafts must use the same tokenizer")
                if draft.config.max_seq_len < max_model_len:
                    raise ConfigError(f"the draft model's max_seq_len ({draft.config.max_seq_len}) is shorter "
                                      f"than max_model_len ({max_model_len})")
                self.proposer = DraftModelProposer(draft, speculative.num_tokens, num_blocks, block_size,
                                                   self.device, max_batched_query)

    # ----- request state -----------------------------------------------------------------------------
    def _state(self, s: ScheduledRequest) -> _RequestState:
        if s.is_new:
            p = s.sampling_params
            stop = tuple(p.stop_token_ids)
            if self.eos_token_id is not None and not p.ignore_eos:
                stop += (self.eos_token_id,)
            limit = sys.maxsize if p.max_tokens is None else p.max_tokens
            self.states[s.request_id] = _RequestState(
                token_ids=list(s.all_token_ids), num_prompt_tokens=s.num_prompt_tokens, params=p,
                seed=p.seed if p.seed is not None else self._rng.getrandbits(63), stop_ids=stop,
                max_tokens=min(limit, self.max_model_len - s.num_prompt_tokens))
        return self.states[s.request_id]

    def _row(self, st: _RequestState, position: int, history: list[int]) -> SamplingRow:
        return SamplingRow(st.params, st.seed, position, st.num_prompt_tokens, history, st.stop_ids)

    # ----- the step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        t0 = time.perf_counter()
        for rid in so.finished_request_ids + so.preempted_request_ids:
            self.states.pop(rid, None)
        res = RunnerOutput()
        if not so.requests:
            return res
        spans, ids, rows = [], [], []   # rows: flat indices whose logits we need
        prompt_jobs = []                 # (request, state, first logits row, target token ids)
        sample_jobs = []                 # (request, state, first logits row)
        off = 0
        for s in so.requests:
            st = self._state(s)
            T = len(s.token_ids)
            spans.append(SeqSpan(s.start_pos, T, s.block_ids))
            ids.extend(s.token_ids)
            if s.sampling_params.prompt_logprobs is not None:
                # prompt tokens first..end get a logprob this step; token k's comes from position k - 1
                first = max(s.start_pos + 1, s.sampling_params.first_prompt_logprob)
                end = min(s.start_pos + T, st.num_prompt_tokens - 1)
                if end >= first:
                    prompt_jobs.append((s, len(rows), st.token_ids[first:end + 1]))
                    rows.extend(range(off + first - 1 - s.start_pos, off + end - s.start_pos))
            if s.sample:
                k = len(s.spec_token_ids)
                sample_jobs.append((s, st, len(rows)))
                rows.extend(range(off + T - 1 - k, off + T))
            off += T
        max_position = max(s.start + s.num_tokens for s in spans) - 1
        if max_position >= self.max_model_len:
            raise RuntimeError(f"position {max_position} >= max_model_len {self.max_model_len}")
        key = None
        if self.decode_graphs is not None and is_decode_only(so):
            key = self.decode_graphs.load(ids, spans)  # None: more rows than the largest bucket
        step = input_ids = None
        if key is not None:  # the static path: every request is row i of the (B, V) logits
            t1 = time.perf_counter()
            logits = self.decode_graphs.run(key)  # on CUDA the graph's own output: used up in this call
            n = len(spans)
            logits = logits[:n] if rows == list(range(n)) else logits.index_select(0, long_tensor(rows, self.device))
            self.num_static_steps += 1
        else:
            input_ids = long_tensor(ids, self.device)
            logits_indices = long_tensor(rows, self.device)
            step = make_step(self.attention_backend, self.pool, spans, max_batched_query=self.max_batched_query,
                             n_rep=self.n_rep, logits_indices=logits_indices)
            t1 = time.perf_counter()
            logits = self.model(input_ids[None], kv_cache=step)[0]  # (L, V)
        if self.vocab_limit is not None:
            logits[:, self.vocab_limit:] = float("-inf")
        if isinstance(self.proposer, DraftModelProposer):  # the draft's own pool follows the target's step
            plan = step.plan if isinstance(step, PagedStep) else StepPlan(
                spans, self.block_size, self.device, max_batched_query=self.max_batched_query, n_rep=self.n_rep)
            self.proposer.mirror(long_tensor(ids, self.device) if input_ids is None else input_ids, plan)
        synchronize(self.device)  # on an accelerator: the device's time counts as "forward", not "sample"
        t2 = time.perf_counter()

        # Everything up to here is the same for every request (validated ids and positions): a failure
        # is the engine's, and raises. What follows reads each request's own settings; a failure there
        # is retried request by request (`_isolate`), so it fails only the requests that cause it.
        undo = [(st, len(st.token_ids), st.draft_probs) for _, st, _ in sample_jobs]
        try:
            self._finish_step(prompt_jobs, sample_jobs, logits, res)
        except Exception as e:
            for st, n, draft_probs in undo:
                del st.token_ids[n:]
                st.draft_probs = draft_probs
            res = self._isolate(so, prompt_jobs, sample_jobs, logits, e)
        host = self.host_seconds
        host["prepare"] += t1 - t0
        host["forward"] += t2 - t1
        host["sample"] += time.perf_counter() - t2
        return res

    def _finish_step(self, prompt_jobs, sample_jobs, logits: torch.Tensor, res: RunnerOutput) -> None:
        """Prompt logprobs, sampling or draft verification, logprobs, next drafts: into `res`."""
        for s, first, targets in prompt_jobs:
            n = len(targets)
            res.prompt_logprobs[s.request_id] = token_logprobs(
                logits[first:first + n], targets, [s.sampling_params.prompt_logprobs] * n)
        plain = [j for j in sample_jobs if not j[0].spec_token_ids]
        spec = [j for j in sample_jobs if j[0].spec_token_ids]
        if plain:
            self._sample_plain(plain, logits, res)
        if spec:
            self._verify(spec, logits, res)
        if self.proposer is not None:
            self._propose(sample_jobs, res)

    def _isolate(self, so: SchedulerOutput, prompt_jobs, sample_jobs, logits: torch.Tensor,
                 error: Exception) -> RunnerOutput:
        """The step's second half again, one request at a time: the requests that fail alone are listed
        in `failed` (the scheduler finishes them with "error"), the others get what the batched call
        would have given them (sampling depends on a row's own logits, seed and position only)."""
        res = RunnerOutput()
        prompt_of = {j[0].request_id: j for j in prompt_jobs}
        sample_of = {j[0].request_id: j for j in sample_jobs}
        ok = 0
        for s in so.requests:
            rid = s.request_id
            pj, sj = prompt_of.get(rid), sample_of.get(rid)
            if pj is None and sj is None:
                continue
            one = RunnerOutput()
            undo = None if sj is None else (len(sj[1].token_ids), sj[1].draft_probs)
            try:
                self._finish_step([pj] if pj else [], [sj] if sj else [], logits, one)
            except Exception:
                if undo is not None:
                    del sj[1].token_ids[undo[0]:]
                    sj[1].draft_probs = undo[1]
                log.warning("request %s failed in the runner; it alone finishes with 'error'", rid, exc_info=True)
                res.failed.add(rid)
                continue
            ok += 1
            for mine, theirs in ((res.sampled_token_ids, one.sampled_token_ids), (res.logprobs, one.logprobs),
                                 (res.prompt_logprobs, one.prompt_logprobs), (res.spec_token_ids, one.spec_token_ids)):
                mine.update(theirs)
        if not ok:
            self._probe(logits, error)
        return res

    def _probe(self, logits: torch.Tensor, error: Exception) -> None:
        """Every request failed alone: if sampling a plain row of these logits fails too, the fault is
        the engine's (a device error surfaces at the first sync, which is in sampling): raise `error`."""
        if logits.size(0) == 0:  # no request had work of its own: nothing to blame but the engine
            raise error
        row = SamplingRow(SamplingParams(temperature=0.7, top_k=8, top_p=0.9, seed=0), 0, 1, 1, (1,))
        try:
            sample(logits[:1], SamplingBatch([row], self.vocab_size, self.device)).tolist()
            token_logprobs(logits[:1], [0], [1])
        except Exception as probe_error:
            raise error from probe_error

    def _sample_plain(self, jobs, logits: torch.Tensor, res: RunnerOutput) -> None:
        idx = [first for _, _, first in jobs]
        # rows in order 0..L-1 (no prompt logprobs, no drafts): the logits are the selection
        sel = logits if idx == list(range(logits.size(0))) else logits[idx]
        if all(st.plain_greedy for _, st, _ in jobs):
            # the common case (every row greedy, no penalties, no stop id masked): what `sample`
            # computes, without building a SamplingBatch (~10 small tensors) every step
            toks = sel.argmax(-1).tolist()
        else:
            batch_rows = [self._row(st, len(st.token_ids), st.token_ids) for _, st, _ in jobs]
            toks = sample(sel, SamplingBatch(batch_rows, self.vocab_size, self.device)).tolist()
        lp_jobs = []
        for (s, st, _), tok, i in zip(jobs, toks, range(len(jobs))):
            res.sampled_token_ids[s.request_id] = [tok]
            st.token_ids.append(tok)
            st.draft_probs = None
            if st.params.logprobs is not None:
                lp_jobs.append((s.request_id, i, tok, st.params.logprobs))
        self._logprobs(lp_jobs, sel, res)

    def _verify(self, jobs, logits: torch.Tensor, res: RunnerOutput) -> None:
        K = max(len(s.spec_token_ids) for s, _, _ in jobs)
        batch_rows, idx = [], []
        for s, st, first in jobs:
            drafts = s.spec_token_ids
            L = len(st.token_ids)  # position of the first draft
            for i in range(K + 1):
                j = min(i, len(drafts))  # padding rows repeat the last real one
                batch_rows.append(self._row(st, L + j, st.token_ids + drafts[:j]))
                idx.append(first + j)
        sel = logits[idx]                                                # (R * (K+1), V)
        batch = SamplingBatch(batch_rows, self.vocab_size, self.device)
        R = len(jobs)
        target = target_probs(sel, batch).view(R, K + 1, -1)
        draft_ids = torch.tensor([s.spec_token_ids + [0] * (K - len(s.spec_token_ids)) for s, _, _ in jobs],
                                 dtype=torch.long, device=self.device)
        q = None
        if isinstance(self.proposer, DraftModelProposer):
            q = torch.zeros(R, K, self.vocab_size, device=self.device)
            for r, (s, st, _) in enumerate(jobs):
                k = len(s.spec_token_ids)
                q[r, :k] = st.draft_probs[:k]
        out = rejection_sample(target, draft_ids, q, [len(s.spec_token_ids) for s, _, _ in jobs],
                               [st.seed for _, st, _ in jobs], [len(st.token_ids) for _, st, _ in jobs],
                               greedy=[st.params.is_greedy for _, st, _ in jobs])
        lp_jobs = []
        for r, ((s, st, _), toks) in enumerate(zip(jobs, out)):
            res.sampled_token_ids[s.request_id] = toks
            st.token_ids.extend(toks)
            st.draft_probs = None
            if st.params.logprobs is not None:
                lp_jobs.extend((s.request_id, r * (K + 1) + i, t, st.params.logprobs) for i, t in enumerate(toks))
        self._logprobs(lp_jobs, sel, res)

    def _logprobs(self, jobs, sel: torch.Tensor, res: RunnerOutput) -> None:
        """jobs: (request id, row of sel, sampled token, number of top logprobs)."""
        if not jobs:
            return
        entries = token_logprobs(sel[[j[1] for j in jobs]], [j[2] for j in jobs], [j[3] for j in jobs])
        for (rid, *_), entry in zip(jobs, entries):
            res.logprobs.setdefault(rid, []).append(entry)

    def _propose(self, jobs, res: RunnerOutput) -> None:
        items, states = [], []
        for s, st, _ in jobs:
            room = st.max_tokens - (len(st.token_ids) - st.num_prompt_tokens) - 1
            room = min(room, self.max_model_len - len(st.token_ids))
            if room <= 0 or st.token_ids[-1] in st.stop_ids:
                continue  # finished (or about to be): drafts would be thrown away
            items.append(DraftInput(s.request_id, st.token_ids, room, st.params, st.seed,
                                    st.num_prompt_tokens, s.block_ids, st.stop_ids))
            states.append(st)
        for it, st, (drafts, q) in zip(items, states, self.proposer.propose(items)):
            if drafts:
                res.spec_token_ids[it.request_id] = drafts
                st.draft_probs = q
