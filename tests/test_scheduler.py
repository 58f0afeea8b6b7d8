"""Scheduler, Request and SamplingParams, driven by hand-written runner outputs and a fake runner.

All torch-free.

The fake runner plays the model: the "model" emits token model_token(request_id, position), and the
runner keeps a fake KV pool (slot -> token id). It writes every scheduled token into its slot first
(as a batched paged-attention forward does per layer), then checks that every position the request
attends to holds that request's token: wrong block tables, bad prefix-cache hits, stale slots after
preemption or rolled-back drafts all fail there.
"""

import random
import subprocess
import sys
import zlib

import pytest

from muse.common.errors import ConfigError, ResourceError, UsageError
from muse.infer.request import Request, RequestStatus
from muse.infer.sampling_params import SamplingParams
from muse.infer.scheduler import RunnerOutput, Scheduler, SchedulerConfig, SchedulerOutput

VOCAB = 64


def model_token(rid: str, pos: int) -> int:
    """The fake model: the token it emits after a sequence whose length is `pos`."""
    return zlib.crc32(f"{rid}@{pos}".encode()) % VOCAB


def expected_tokens(rid, prompt_len, params: SamplingParams, eos, max_model_len, with_reason=False):
    """Slow reference for what a request must produce (independent of Request.check_stop)."""
    limit = max_model_len - prompt_len if params.max_tokens is None else min(params.max_tokens,
                                                                             max_model_len - prompt_len)
    out = []
    while True:
        tok = model_token(rid, prompt_len + len(out))
        out.append(tok)
        stop = (tok == eos and not params.ignore_eos) or tok in params.stop_token_ids
        if (stop and len(out) >= params.min_tokens) or len(out) >= limit:
            reason = "stop" if stop and len(out) >= params.min_tokens else "length"
            return (out, reason) if with_reason else out


class FakeRunner:
    def __init__(self, block_size, spec_k=0, draft_accuracy=0.5, seed=0):
        self.bs, self.spec_k, self.acc = block_size, spec_k, draft_accuracy
        self.rng = random.Random(seed)
        self.slots = {}    # (block_id, offset) -> token id written there
        self.known = {}    # request id -> the runner's view of its known tokens
        self.steps = []

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.steps.append(out)
        for rid in out.finished_request_ids + out.preempted_request_ids:
            self.known.pop(rid, None)
        for s in out.requests:  # 1. write K/V of every scheduled token
            if s.is_new:
                assert s.all_token_ids is not None
                self.known[s.request_id] = list(s.all_token_ids)
            known = self.known[s.request_id]
            n_real = len(s.token_ids) - len(s.spec_token_ids)
            assert s.token_ids[:n_real] == known[s.start_pos:s.start_pos + n_real]
            assert s.token_ids[n_real:] == s.spec_token_ids
            for j, tok in enumerate(s.token_ids):
                pos = s.start_pos + j
                self.slots[(s.block_ids[pos // self.bs], pos % self.bs)] = tok
        res = RunnerOutput()
        for s in out.requests:  # 2. attend: every visible position must hold this request's token
            known = self.known[s.request_id]
            seq = known + s.spec_token_ids
            for pos in range(s.start_pos + len(s.token_ids)):
                assert self.slots.get((s.block_ids[pos // self.bs], pos % self.bs)) == seq[pos], \
                    f"{s.request_id} reads a wrong K/V at position {pos}"
            if not s.sample:
                continue
            assert s.start_pos + len(s.token_ids) - len(s.spec_token_ids) == len(known)
            toks = []
            for d in s.spec_token_ids:  # verify drafts: accept while they match the model
                toks.append(model_token(s.request_id, len(known) + len(toks)))
                if toks[-1] != d:
                    break
            else:
                toks.append(model_token(s.request_id, len(known) + len(toks)))
            res.sampled_token_ids[s.request_id] = toks
            res.logprobs[s.request_id] = [("lp", len(known) + i) for i in range(len(toks))]
            known.extend(toks)
            if self.spec_k:
                drafts = [model_token(s.request_id, len(known) + i) if self.rng.random() < self.acc
                          else VOCAB + i for i in range(self.rng.randint(0, self.spec_k))]
                res.spec_token_ids[s.request_id] = drafts
        return res


def step(sched, runner):
    out = sched.schedule()
    deltas = sched.update_from_output(out, runner.execute(out))
    sched.check_invariants()
    return out, deltas


def run_all(sched, runner, max_steps=5000):
    tokens, reasons = {}, {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return tokens, reasons
        _, deltas = step(sched, runner)
        for d in deltas:
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
            if d.finished:
                assert d.request_id not in reasons, "finished twice"
                reasons[d.request_id] = d.finish_reason
    raise AssertionError("scheduler did not finish: livelock or deadlock")


def cfg(**kw):
    base = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                eos_token_id=None)
    base.update(kw)
    return SchedulerConfig(**base)


# ----- import boundaries, SamplingParams, Request ------------------------------------------------------
def test_bookkeeping_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
            "import muse.infer.scheduler, muse.infer.kv_blocks, muse.infer.request\n"
            "import muse.infer.sampling_params\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.n, p.logprobs) == (16, 1.0, 1.0, 0, 1, None)
    assert not p.is_greedy and SamplingParams(temperature=0).is_greedy
    q = SamplingParams(top_k=-1, stop_token_ids=[5, 7], max_tokens=None)
    assert q.top_k == 0 and q.stop_token_ids == (5, 7) and q.max_tokens is None
    with pytest.raises(AttributeError):
        p.temperature = 0.5  # frozen


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", True), ("max_tokens", 1.5), ("min_tokens", -1),
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
    ("min_p", 1.1), ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("seed", "7"), ("stop_token_ids", "abc"), ("stop_token_ids", [-1]), ("n", 0), ("logprobs", -1),
    ("prompt_logprobs", 1.0), ("ignore_eos", 1),
])
def test_sampling_params_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(UsageError, match=field.split("[")[0]):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(UsageError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_request_stop_rules():
    r = Request("r", [1, 2], SamplingParams(max_tokens=5, min_tokens=2, stop_token_ids=[9]), eos_token_id=0)
    assert (r.num_tokens, r.all_token_ids) == (2, [1, 2])
    r.append_output(0)
    assert r.check_stop() is None                        # eos before min_tokens is ignored
    r.append_output(9)
    assert r.check_stop() == RequestStatus.FINISHED_STOPPED and r.stop_reason == 9
    r = Request("r", [1], SamplingParams(max_tokens=2, ignore_eos=True), eos_token_id=0)
    r.append_output(0)
    assert r.check_stop() is None
    r.append_output(0)
    assert r.check_stop() == RequestStatus.FINISHED_LENGTH
    r = Request("r", [1], SamplingParams(max_tokens=1), eos_token_id=0)
    r.append_output(0)                                   # eos on the last allowed token: "stop" wins
    assert r.check_stop().finish_reason == "stop" and r.stop_reason is None


def test_fan_out_makes_children_with_distinct_seeds():
    parent = Request("req-1", [1, 2, 3], SamplingParams(n=3, seed=10), eos_token_id=0)
    kids = parent.fan_out()
    assert [k.request_id for k in kids] == ["req-1#0", "req-1#1", "req-1#2"]
    assert [k.sampling_params.seed for k in kids] == [10, 11, 12]
    assert all(k.sampling_params.n == 1 and k.parent_id == "req-1" for k in kids)
    assert [k.index for k in kids] == [0, 1, 2] and kids[1].prompt_token_ids == [1, 2, 3]
    single = Request("x", [1])
    assert single.fan_out() == [single]


# ----- admission --------------------------------------------------------------------------------------
def test_config_and_admission_errors():
    with pytest.raises(ConfigError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ConfigError, match="chunked prefill"):
        SchedulerConfig(max_num_batched_tokens=16, max_model_len=32, enable_chunked_prefill=False)
    s = Scheduler(cfg(num_blocks=4, block_size=4, max_model_len=64))
    with pytest.raises(UsageError, match="empty prompt"):
        s.add_request(Request("a", []))
    with pytest.raises(UsageError, match="max length"):
        s.add_request(Request("a", [1] * 64))
    with pytest.raises(ResourceError, match="KV blocks"):     # 10 + 8 - 1 tokens need 5 blocks of 4
        s.add_request(Request("a", [1] * 10, SamplingParams(max_tokens=8)))
    s.add_request(Request("a", [1] * 10, SamplingParams(max_tokens=7)))  # 16 slots: fits exactly
    with pytest.raises(UsageError, match="already in use"):
        s.add_request(Request("a", [1]))
    assert s.num_waiting == 1 and not s.kv.block_ids("a")


def test_max_tokens_none_runs_to_max_model_len():
    s = Scheduler(cfg(max_model_len=20))
    s.add_request(Request("a", [1] * 15, SamplingParams(max_tokens=None)))
    tokens, reasons = run_all(s, FakeRunner(4))
    assert len(tokens["a"]) == 5 and reasons["a"] == "length"


# ----- the catch-up rule ------------------------------------------------------------------------------
def test_chunked_prefill_splits_a_long_prompt_under_the_budget():
    s = Scheduler(cfg(max_num_batched_tokens=8))
    s.add_request(Request("a", list(range(20)), SamplingParams(max_tokens=3)))
    runner = FakeRunner(4)
    outs = [step(s, runner)[0] for _ in range(5)]
    got = [(o.requests[0].start_pos, o.requests[0].num_scheduled_tokens, o.requests[0].sample) for o in outs]
    assert got == [(0, 8, False), (8, 8, False), (16, 4, True), (20, 1, True), (21, 1, True)]
    assert outs[0].requests[0].is_new and not outs[1].requests[0].is_new
    assert not s.has_unfinished_requests()


def test_budget_is_shared_decodes_first_then_chunks():
    s = Scheduler(cfg(max_num_batched_tokens=10))
    runner = FakeRunner(4)
    s.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=5)))
    step(s, runner)
    s.add_request(Request("b", list(range(30)), SamplingParams(max_tokens=2)))
    out, _ = step(s, runner)
    assert [(r.request_id, r.num_scheduled_tokens) for r in out.requests] == [("a", 1), ("b", 9)]
    assert out.num_scheduled_tokens == 10


def test_without_chunked_prefill_a_prompt_waits_for_room():
    c = dict(max_num_batched_tokens=32, max_model_len=32)
    for chunked, expect in ((True, [("a", 20), ("b", 12)]), (False, [("a", 20)])):
        s = Scheduler(cfg(enable_chunked_prefill=chunked, **c))
        s.add_request(Request("a", [1] * 20, SamplingParams(max_tokens=4)))
        s.add_request(Request("b", [2] * 20, SamplingParams(max_tokens=4)))
        s.add_request(Request("c", [3] * 2, SamplingParams(max_tokens=4)))   # FCFS: may not jump ahead
        runner = FakeRunner(4)
        out, _ = step(s, runner)
        assert [(r.request_id, r.num_scheduled_tokens) for r in out.requests] == expect
        if not chunked:
            out, _ = step(s, runner)
            assert [(r.request_id, r.num_scheduled_tokens) for r in out.requests] == [("a", 1), ("b", 20),
                                                                                      ("c", 2)]
        run_all(s, runner)


def test_max_num_seqs_is_respected():
    s = Scheduler(cfg(max_num_seqs=2))
    for i in range(5):
        s.add_request(Request(f"r{i}", [i + 1] * 3, SamplingParams(max_tokens=3)))
    runner = FakeRunner(4)
    out, _ = step(s, runner)
    assert [r.request_id for r in out.requests] == ["r0", "r1"] and s.num_running == 2 and s.num_waiting == 3
    seen_running = []
    while s.has_unfinished_requests():
        step(s, runner)
        seen_running.append(s.num_running)
    assert max(seen_running) == 2


# ----- preemption, abort ------------------------------------------------------------------------------
def test_most_recently_admitted_is_preempted_and_finishes_later_with_the_right_tokens():
    s = Scheduler(cfg(num_blocks=4, block_size=4))
    pa, pb = SamplingParams(max_tokens=8), SamplingParams(max_tokens=4)
    s.add_request(Request("a", [5] * 7, pa))   # up to 14 slots: 4 blocks
    s.add_request(Request("b", [6] * 7, pb))   # up to 10 slots: 3 blocks
    runner = FakeRunner(4)
    early = {"a": [], "b": []}
    outs = []
    for _ in range(3):
        out, deltas = step(s, runner)
        outs.append(out)
        for d in deltas:
            early[d.request_id] += d.new_token_ids
    assert [r.request_id for r in outs[1].requests] == ["a", "b"]
    # step 3: a needs a 3rd block, none is free: b, the newest, is preempted
    assert outs[2].preempted_request_ids == ["b"] and [r.request_id for r in outs[2].requests] == ["a"]
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and s.waiting[0] is b
    assert s.stats().num_preemptions == 1
    tokens, reasons = run_all(s, runner)
    full_a = expected_tokens("a", 7, pa, None, 64)
    full_b = expected_tokens("b", 7, pb, None, 64)
    assert reasons == {"a": "length", "b": "length"}
    assert early["a"] + tokens["a"] == full_a and early["b"] + tokens.get("b", []) == full_b
    resumed = [r for o in runner.steps for r in o.requests if r.request_id == "b" and r.is_new]
    assert len(resumed) == 2 and resumed[1].all_token_ids == [6] * 7 + full_b[:2]


def test_a_request_preempts_itself_when_it_is_the_newest():
    s = Scheduler(cfg(num_blocks=3, block_size=2, max_num_batched_tokens=4))
    s.add_request(Request("a", [1] * 4, SamplingParams(max_tokens=3)))   # 6 slots = 3 blocks
    s.add_request(Request("b", [2] * 2, SamplingParams(max_tokens=2)))
    runner = FakeRunner(2)
    tokens, reasons = run_all(s, runner)
    assert tokens["a"] == expected_tokens("a", 4, SamplingParams(max_tokens=3), None, 64)
    assert tokens["b"] == expected_tokens("b", 2, SamplingParams(max_tokens=2), None, 64)
    assert s.kv.num_free_blocks == 3


def test_abort_frees_blocks_and_reports_once():
    s = Scheduler(cfg())
    runner = FakeRunner(4)
    s.add_request(Request("a", [1] * 9, SamplingParams(max_tokens=10)))
    s.add_request(Request("w", [2] * 3))
    s.add_request(Request("p", [3] * 3, SamplingParams(n=2, max_tokens=10)))
    step(s, runner)
    assert s.kv.num_free_blocks < 64
    assert s.abort("a") == ["a"] and s.abort("p") == ["p#0", "p#1"]
    assert s.abort("nope") == []
    assert s.kv.num_free_blocks == 64 - len(s.kv.block_ids("w"))  # freed at once, no leaks
    s.check_invariants()
    out, deltas = step(s, runner)
    assert sorted(out.finished_request_ids) == ["a", "p#0", "p#1"]
    assert {d.request_id: d.finish_reason for d in deltas if d.finished} == {"a": "abort", "p#0": "abort",
                                                                             "p#1": "abort"}
    assert [r.request_id for r in out.requests] == ["w"]
    s.abort("w")
    assert s.has_unfinished_requests()           # its abort delta is still to be delivered
    _, deltas = step(s, runner)
    assert [(d.request_id, d.finish_reason) for d in deltas] == [("w", "abort")]
    assert not s.has_unfinished_requests() and s.kv.num_free_blocks == 64


def test_abort_during_a_step_ignores_its_output():
    s = Scheduler(cfg())
    runner = FakeRunner(4)
    s.add_request(Request("a", [1] * 5))
    out = s.schedule()
    res = runner.execute(out)
    s.abort("a")
    deltas = s.update_from_output(out, res)
    assert [(d.request_id, d.new_token_ids, d.finish_reason) for d in deltas] == [("a", [], "abort")]
    s.check_invariants()


# ----- n > 1, stops, logprobs -------------------------------------------------------------------------
def test_parallel_samples_share_the_prompt_blocks():
    s = Scheduler(cfg(block_size=4))
    ids = s.add_request(Request("p", list(range(1, 10)), SamplingParams(n=3, max_tokens=4, seed=1)))
    assert ids == ["p#0", "p#1", "p#2"]
    runner = FakeRunner(4)
    out, deltas = step(s, runner)
    assert [r.num_scheduled_tokens for r in out.requests] == [9, 1, 1]  # the prompt is computed once
    tables = [r.block_ids for r in out.requests]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2] and len({t[2] for t in tables}) == 3
    assert [s.kv.pool.blocks[b].ref_cnt for b in tables[0][:2]] == [3, 3]
    assert [(d.parent_id, d.index, d.num_cached_tokens) for d in deltas] == [("p", 0, 0), ("p", 1, 8),
                                                                              ("p", 2, 8)]
    tokens, _ = run_all(s, runner)
    for i in range(3):
        assert [d for d in deltas if d.index == i][0].new_token_ids + tokens[f"p#{i}"] == \
            expected_tokens(f"p#{i}", 9, SamplingParams(max_tokens=4), None, 64)
    assert s.stats().prefix_cache_hit_tokens == 16


def test_stop_token_ends_and_later_accepted_tokens_are_dropped():
    s = Scheduler(cfg(eos_token_id=0))
    s.add_request(Request("a", [1, 2], SamplingParams(max_tokens=10, stop_token_ids=[7])))
    s.add_request(Request("b", [1, 2], SamplingParams(max_tokens=10)))
    out = s.schedule()
    deltas = s.update_from_output(out, RunnerOutput(sampled_token_ids={"a": [3], "b": [0]},
                                                    spec_token_ids={"a": [7, 8]}))
    assert [(d.request_id, d.finish_reason) for d in deltas] == [("a", None), ("b", "stop")]
    out = s.schedule()
    assert out.finished_request_ids == ["b"] and out.requests[0].spec_token_ids == [7, 8]
    deltas = s.update_from_output(out, RunnerOutput(sampled_token_ids={"a": [7, 8, 9]}))
    assert (deltas[0].new_token_ids, deltas[0].finish_reason, deltas[0].stop_reason) == ([7], "stop", 7)
    assert not s.has_unfinished_requests() and s.kv.num_free_blocks == 64


def test_prompt_logprobs_are_passed_through_once_even_after_recompute():
    s = Scheduler(cfg(max_num_batched_tokens=4))
    s.add_request(Request("a", list(range(1, 8)), SamplingParams(prompt_logprobs=1, max_tokens=3)))
    out = s.schedule()                                      # positions 0..3 -> prompt tokens 1..4
    d = s.update_from_output(out, RunnerOutput(prompt_logprobs={"a": ["t1", "t2", "t3", "t4"]}))
    assert d[0].prompt_logprobs == ["t1", "t2", "t3", "t4"] and d[0].new_token_ids == []
    req = s.requests["a"]                                   # simulate a preemption: recompute from 0
    s.running.remove(req)
    s._preempt(req)
    out = s.schedule()
    assert out.requests[0].start_pos == 0                   # prompt logprobs: no prefix-cache hits
    d = s.update_from_output(out, RunnerOutput(prompt_logprobs={"a": ["t1", "t2", "t3", "t4"]}))
    assert d == []
    out = s.schedule()                                      # positions 4..6 -> prompt tokens 5, 6
    d = s.update_from_output(out, RunnerOutput(sampled_token_ids={"a": [9]},
                                               prompt_logprobs={"a": ["t5", "t6"]}, logprobs={"a": ["x"]}))
    assert (d[0].prompt_logprobs, d[0].new_token_ids, d[0].logprobs) == (["t5", "t6"], [9], ["x"])


def test_runner_contract_violations_are_bugs():
    s = Scheduler(cfg())
    s.add_request(Request("a", [1, 2]))
    out = s.schedule()
    with pytest.raises(RuntimeError, match="expected 1..1"):
        s.update_from_output(out, RunnerOutput(sampled_token_ids={"a": [1, 2]}))


# ----- speculative decoding bookkeeping ---------------------------------------------------------------
@pytest.mark.parametrize("accepted", [0, 1, 2, 3])
def test_spec_decode_accepts_a_prefix_and_rolls_back_the_rest(accepted):
    s = Scheduler(cfg(block_size=4))
    s.add_request(Request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=20)))
    out = s.schedule()
    s.update_from_output(out, RunnerOutput(sampled_token_ids={"a": [6]}, spec_token_ids={"a": [7, 8, 9]}))
    req = s.requests["a"]
    assert (req.num_tokens, req.num_computed_tokens) == (6, 5)
    out = s.schedule()
    r = out.requests[0]
    assert (r.token_ids, r.start_pos, r.spec_token_ids, r.sample) == ([6, 7, 8, 9], 5, [7, 8, 9], True)
    assert len(r.block_ids) == 3                            # slots up to position 8 are allocated
    sampled = [7, 8, 9][:accepted] + [50]
    deltas = s.update_from_output(out, RunnerOutput(sampled_token_ids={"a": sampled}))
    assert deltas[0].new_token_ids == sampled
    assert req.output_token_ids == [6] + sampled
    assert req.num_computed_tokens == req.num_tokens - 1 == 6 + accepted
    st = s.stats()
    assert (st.num_draft_tokens, st.num_accepted_tokens) == (3, accepted)
    s.check_invariants()
    out = s.schedule()                                      # next step: catch up by exactly one token
    assert out.requests[0].token_ids == [50] and out.requests[0].start_pos == 6 + accepted


def test_drafts_never_outrun_max_tokens_or_the_budget():
    s = Scheduler(cfg(max_num_batched_tokens=3))
    s.add_request(Request("a", [1, 2], SamplingParams(max_tokens=4)))
    out = s.schedule()
    s.update_from_output(out, RunnerOutput(sampled_token_ids={"a": [3]}, spec_token_ids={"a": [4, 5, 6, 7]}))
    assert s.requests["a"].spec_token_ids == [4, 5]         # 3 tokens left to generate: at most 2 drafts
    s.add_request(Request("b", [1]))
    out = s.schedule()                                      # a's decode + 2 drafts use the whole budget
    assert [(r.request_id, r.token_ids) for r in out.requests] == [("a", [3, 4, 5])]
    s2 = Scheduler(cfg(max_num_batched_tokens=2))
    s2.add_request(Request("a", [1], SamplingParams(max_tokens=9)))
    s2.update_from_output(s2.schedule(), RunnerOutput(sampled_token_ids={"a": [3]},
                                                      spec_token_ids={"a": [4, 5, 6]}))
    out = s2.schedule()
    assert out.requests[0].token_ids == [3, 4] and out.requests[0].spec_token_ids == [4]  # budget cut


# ----- the randomized stress test ---------------------------------------------------------------------
@pytest.mark.parametrize("seed,chunked,caching,spec_k", [
    (0, True, True, 0), (1, True, False, 0), (2, False, True, 0), (3, True, True, 3), (4, False, True, 2),
    (5, True, False, 4), (6, False, False, 0), (7, True, True, 1),
])
def test_stress_random_requests_small_pool_random_aborts(seed, chunked, caching, spec_k):
    rng = random.Random(seed)
    c = cfg(num_blocks=20, block_size=4, max_num_seqs=6, max_num_batched_tokens=64 if not chunked else 16,
            max_model_len=64, enable_chunked_prefill=chunked, enable_prefix_caching=caching, eos_token_id=0)
    s = Scheduler(c)
    runner = FakeRunner(4, spec_k=spec_k, seed=seed)
    bases = [[rng.randrange(1, VOCAB) for _ in range(24)] for _ in range(3)]
    pending, params, prompts, aborted = [], {}, {}, set()
    for i in range(60):
        tail = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 12))]
        prompt = rng.choice(bases)[:rng.randint(0, 20)] + tail
        max_tokens = rng.randint(1, 30)
        p = SamplingParams(max_tokens=max_tokens, n=rng.choice([1, 1, 1, 2, 3]),
                           min_tokens=min(max_tokens, rng.choice([0, 0, 3])),
                           stop_token_ids=rng.choice([(), (5,)]),
                           ignore_eos=rng.random() < 0.1)
        pending.append(Request(f"r{i}", prompt, p))
    tokens, reasons = {}, {}
    max_free = c.num_blocks
    for _ in range(3000):
        if pending and rng.random() < 0.5:
            r = pending.pop(0)
            for rid in s.add_request(r):
                params[rid], prompts[rid] = r.sampling_params, r.prompt_token_ids
        if s.requests and rng.random() < 0.03:
            victim = rng.choice(sorted(s.requests))
            aborted.update(s.abort(victim))
        if not pending and not s.has_unfinished_requests():
            break
        out, deltas = step(s, runner)
        assert out.num_scheduled_tokens <= c.max_num_batched_tokens
        for d in deltas:
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
            if d.finished:
                assert d.request_id not in reasons
                reasons[d.request_id] = d.finish_reason
    else:
        raise AssertionError("did not finish: livelock")
    assert set(reasons) == set(params)
    for rid, p in params.items():
        want, reason = expected_tokens(rid, len(prompts[rid]), p, 0, c.max_model_len, with_reason=True)
        got = tokens.get(rid, [])
        if rid in aborted:
            assert reasons[rid] == "abort" and got == want[:len(got)]
        else:
            assert (got, reasons[rid]) == (want, reason), rid
    assert s.kv.num_free_blocks == max_free and s.num_running == s.num_waiting == 0
    st = s.stats()
    assert st.num_preemptions > 0 and len(aborted) > 0
    if caching:
        assert st.prefix_cache_hit_tokens > 0
    if spec_k:
        assert 0 < st.num_accepted_tokens < st.num_draft_tokens


# ----- robustness: what one request may ask for, and failing one request alone ----------------------
def test_stop_token_ids_are_deduplicated_and_bounded():
    """Regression: 60,000 repeated stop ids were kept as they came (scanned per token, masked per row:
    97 s for one request, every batch mate slowed down). Duplicates go; more than the bound is a 400."""
    from muse.infer.sampling_params import MAX_LOGPROBS, MAX_N, MAX_STOP_TOKEN_IDS

    assert SamplingParams(stop_token_ids=[5, 7] * 30_000 + [5]).stop_token_ids == (5, 7)
    SamplingParams(stop_token_ids=range(MAX_STOP_TOKEN_IDS))
    with pytest.raises(UsageError, match=f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS}"):
        SamplingParams(stop_token_ids=range(MAX_STOP_TOKEN_IDS + 1))
    with pytest.raises(UsageError, match=f"n must be <= {MAX_N}"):
        SamplingParams(n=MAX_N + 1)
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(UsageError, match=f"{name} must be <= {MAX_LOGPROBS}"):
            SamplingParams(**{name: MAX_LOGPROBS + 1})


def test_a_request_the_runner_failed_finishes_with_error_and_frees_its_blocks():
    s = Scheduler(cfg())
    runner = FakeRunner(4)
    for rid in ("a", "b"):
        s.add_request(Request(rid, [1, 2, 3, 4, 5], SamplingParams(max_tokens=5, ignore_eos=True)))
    out = s.schedule()
    res = runner.execute(out)
    res.failed.add("a")
    deltas = s.update_from_output(out, res)
    assert [(d.request_id, d.finish_reason, d.new_token_ids) for d in deltas] == [
        ("a", "error", []), ("b", None, res.sampled_token_ids["b"])]
    s.check_invariants()
    tokens, reasons = run_all(s, runner)
    assert reasons == {"b": "length"} and s.kv.num_free_blocks == 64


def test_a_scheduler_needs_the_limits_an_engine_derives():
    with pytest.raises(ConfigError, match="num_blocks and max_model_len"):
        Scheduler(SchedulerConfig(num_blocks=8))
    base = SchedulerConfig(num_blocks=8, max_model_len=32)
    assert base.for_scheduler(num_blocks=16) == SchedulerConfig(num_blocks=16, max_model_len=32)
