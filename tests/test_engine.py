"""The engine against slow references: naive generation, full forward passes, block accounting.

A tiny random model (fp32, 2 layers, d_model 64). The reference for every greedy test is
muse.infer.generate.generate(temperature=0, use_cache=False): one full forward per token. After
every engine run every KV block must be back in the pool and the scheduler's invariants hold.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import random

import pytest
import torch

from muse.common.errors import ConfigError, ResourceError, UsageError
from muse.infer.client import EngineClient, ThreadEngineClient
from muse.infer.engine import (
    LLM,
    CompletionOutput,
    Engine,
    EngineConfig,
    EngineDeadError,
    OutputProcessor,
    RequestOutput,
    RequestTracker,
)
from muse.infer.generate import generate
from muse.infer.paged_cache import PagedKVPool, PagedStep, SeqSpan, StepPlan
from muse.infer.sampler import sample as _general_sample
from muse.infer.sampler import token_logprobs as _general_token_logprobs
from muse.infer.sampling_params import SamplingParams
from muse.infer.scheduler import RequestDelta, SchedulerConfig
from muse.infer.spec_decode import SpeculativeConfig
from muse.model import ModelConfig, build_model

V = 101
EOS = 0


def tiny(arch="llama", seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=V, n_layer=2, d_model=64, n_head=4, n_kv_head=2 if arch == "llama" else 4,
                max_seq_len=128, init_std=0.1, arch=arch)
    base.update(kw)
    return build_model(ModelConfig(**base)).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def workload(model):
    """32 prompts of mixed lengths (half share one of three prefixes), their max_tokens, arrival
    steps, and the naive greedy reference."""
    rng = random.Random(0)
    bases = [[rng.randrange(1, V) for _ in range(rng.randint(20, 40))] for _ in range(3)]
    prompts = [(bases[i % 3] if i % 2 else []) + [rng.randrange(1, V) for _ in range(rng.randint(1, 30))]
               for i in range(32)]
    max_tokens = [rng.randint(1, 24) for _ in prompts]
    arrivals = [rng.randint(0, 10) for _ in prompts]
    ref = [generate(model, p, max_new_tokens=m, temperature=0, use_cache=False, stop_ids=[EOS])
           for p, m in zip(prompts, max_tokens)]
    return prompts, max_tokens, arrivals, ref


def assert_all_blocks_free(engine: Engine):
    engine.scheduler.check_invariants()
    assert engine.scheduler.kv.num_free_blocks == engine.num_blocks
    # the runner drops a finished request's state when the next SchedulerOutput lists it
    assert set(engine.runner.states) <= set(engine.scheduler._finished_ids)


def run_engine(engine: Engine, requests, max_steps=2000):
    """requests: (request id, prompt, params, arrival step). Returns {id: RequestOutput}; checks
    invariants after every step and that everything is freed at the end."""
    outs, step = {}, 0
    pending = sorted(requests, key=lambda r: r[3])
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][3] <= step:
            rid, prompt, params, _ = pending.pop(0)
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in outs
                outs[out.request_id] = out
        engine.scheduler.check_invariants()
        step += 1
        assert step < max_steps, "engine did not finish"
    assert_all_blocks_free(engine)
    return outs


def greedy_requests(workload, n=1):
    prompts, max_tokens, arrivals, _ = workload
    return [(str(i), p, SamplingParams(max_tokens=m, temperature=0, n=n), a)
            for i, (p, m, a) in enumerate(zip(prompts, max_tokens, arrivals))]


CONFIGS = {
    "chunked+prefix": dict(num_blocks=200, max_num_batched_tokens=64),
    "no-chunking": dict(num_blocks=200, max_num_batched_tokens=128, enable_chunked_prefill=False),
    "no-prefix-cache": dict(num_blocks=200, max_num_batched_tokens=64, enable_prefix_caching=False),
    "preemption": dict(num_blocks=40, max_num_batched_tokens=64),
    "preemption-no-prefix": dict(num_blocks=40, max_num_batched_tokens=48, enable_prefix_caching=False),
    "ngram-spec": dict(num_blocks=200, max_num_batched_tokens=64, speculative=SpeculativeConfig("ngram", 3)),
    "ngram-spec-preemption": dict(num_blocks=40, max_num_batched_tokens=64,
                                  speculative=SpeculativeConfig("ngram", 4, ngram_min=1, ngram_max=2)),
    "tiny-budget": dict(num_blocks=200, max_num_batched_tokens=7, max_num_seqs=5),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_naive_generation(model, workload, name):
    engine = Engine(model, EngineConfig(block_size=4, eos_token_id=EOS, **CONFIGS[name]))
    outs = run_engine(engine, greedy_requests(workload))
    ref = workload[3]
    assert [outs[str(i)].outputs[0].token_ids for i in range(32)] == ref
    stats = engine.stats()
    if "preemption" in name:
        assert stats.num_preemptions > 0
    if name == "chunked+prefix":
        assert stats.prefix_cache_hit_rate > 0.2
    if "spec" in name:
        assert stats.spec_acceptance_rate is not None
    for i, out in enumerate(outs[str(i)] for i in range(32)):
        want = "stop" if ref[i] and ref[i][-1] == EOS else "length"
        assert out.outputs[0].finish_reason == want


@pytest.mark.parametrize("same_model", [True, False])
def test_greedy_with_draft_model(model, workload, same_model):
    """A draft model: greedy output is unchanged, with a bad draft (random model) or a perfect one
    (the target itself: every draft must be accepted, which checks that the draft's pool mirrors
    the target's through prefix hits and preemption)."""
    draft = model if same_model else tiny(seed=5, n_layer=1, d_model=32, n_head=2, n_kv_head=1)
    engine = Engine(model, EngineConfig(block_size=4, eos_token_id=EOS, num_blocks=40, max_num_batched_tokens=64,
                                        speculative=SpeculativeConfig("draft", 3, draft_model=draft)))
    outs = run_engine(engine, greedy_requests(workload))
    assert [outs[str(i)].outputs[0].token_ids for i in range(32)] == workload[3]
    stats = engine.stats()
    assert stats.num_preemptions > 0
    if same_model:
        assert stats.spec_acceptance_rate == 1.0
    else:
        assert stats.spec_acceptance_rate < 0.5


def test_greedy_n2_and_gpt2(workload):
    """n = 2 greedy samples are both the reference; learned positions (gpt2) work through `positions`."""
    model = tiny("gpt2", seed=3)
    prompts, max_tokens, _, _ = workload
    reqs = [(str(i), p, SamplingParams(max_tokens=m, temperature=0, n=2), i % 4)
            for i, (p, m) in enumerate(zip(prompts[:12], max_tokens[:12]))]
    engine = Engine(model, EngineConfig(block_size=4, eos_token_id=EOS, num_blocks=100, max_num_batched_tokens=32))
    outs = run_engine(engine, reqs)
    for i, (p, m) in enumerate(zip(prompts[:12], max_tokens[:12])):
        ref = generate(model, p, max_new_tokens=m, temperature=0, use_cache=False, stop_ids=[EOS])
        assert [c.token_ids for c in outs[str(i)].outputs] == [ref, ref]


def test_greedy_fast_path_and_general_sampler_agree(model, workload, monkeypatch):
    """Steps whose rows are all plain greedy take the raw argmax without building a SamplingBatch
    (the runner's fast path); one sampled batch mate sends every row through `sample`. The greedy
    requests give the naive reference either way."""
    import muse.infer.runner as runner_mod

    calls = []

    def counting_sample(*args):
        calls.append(1)
        return _general_sample(*args)

    monkeypatch.setattr(runner_mod, "sample", counting_sample)
    reqs = greedy_requests(workload)[:16]
    ref = workload[3][:16]
    for mate in (False, True):
        calls.clear()
        extra = [("mate", workload[0][0], SamplingParams(max_tokens=60, temperature=0.9, seed=1, ignore_eos=True), 0)]
        engine = Engine(model, EngineConfig(block_size=4, eos_token_id=EOS, num_blocks=200, max_num_batched_tokens=64))
        outs = run_engine(engine, reqs + (extra if mate else []))
        assert [outs[str(i)].outputs[0].token_ids for i in range(16)] == ref
        assert (len(calls) > 0) == mate  # the general path ran exactly when a row needed it


@pytest.mark.parametrize("bag_values", [True, False])
def test_paged_attention_matches_full_forward(model, bag_values):
    """Sequences fed in random chunks through the paged pool give the full forward's logits; so do
    no-write plans (context from the pool, new tokens from the step) used by the draft proposer.
    Both value paths: embedding-bag from the pool (CPU float32) and gathered values (elsewhere);
    both score paths: per-block over the real blocks (short queries) and padded gathers (longer)."""
    rng = random.Random(1)
    bs, pool = 4, PagedKVPool.for_model(model.config, 120, 4)
    seqs = [[rng.randrange(V) for _ in range(rng.randint(1, 90))] for _ in range(5)]
    free = list(range(120))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-len(s) // bs))] for s in seqs]
    done, got = [0] * 5, [[] for _ in seqs]
    kinds = set()  # attention paths exercised: per-block scores (short queries) and padded gathers
    with torch.no_grad():
        while any(d < len(s) for d, s in zip(done, seqs)):
            spans, ids, who = [], [], []
            for i, s in enumerate(seqs):
                if done[i] < len(s):
                    n = min(len(s) - done[i], rng.choice([1, 2, 5, 40]))
                    spans.append(SeqSpan(done[i], n, tables[i]))
                    ids += s[done[i]:done[i] + n]
                    who.append((i, n))
            plan = StepPlan(spans, bs, "cpu", max_batched_query=8)
            kinds.update(g.per_block for g in plan.padded)
            step = PagedStep(pool, plan)
            assert step.bag_values
            step.bag_values = bag_values
            logits = model(torch.tensor([ids]), kv_cache=step)[0]
            off = 0
            for i, n in who:
                got[i].append(logits[off:off + n])
                off, done[i] = off + n, done[i] + n
        for i, s in enumerate(seqs):
            full = model(torch.tensor([s]))[0]
            torch.testing.assert_close(torch.cat(got[i]), full, atol=1e-5, rtol=1e-5)
            if len(s) > 3:  # re-read the last 3 tokens without writing: same logits
                plan = StepPlan([SeqSpan(len(s) - 3, 3, tables[i])], bs, "cpu", write=False)
                again = model(torch.tensor([s[-3:]]), kv_cache=PagedStep(pool, plan))[0]
                torch.testing.assert_close(again, full[-3:], atol=1e-5, rtol=1e-5)
    assert kinds == {True, False}


def test_prompt_logprobs_and_logprobs_match_full_forward(model):
    """Chunked prompts (budget 16) with prompt_logprobs=3, and logprobs=2 of the sampled tokens,
    equal log_softmax of one full forward pass over prompt + output."""
    rng = random.Random(2)
    prompts = [[rng.randrange(1, V) for _ in range(n)] for n in (1, 2, 17, 40, 63)]
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=200, max_num_batched_tokens=16))
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=3, prompt_logprobs=3, logprobs=2, ignore_eos=True)
    outs = run_engine(engine, [(str(i), p, params, 0) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        out = outs[str(i)]
        gen = out.outputs[0].token_ids
        seq = p + gen
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([seq]))[0], -1)
        if len(p) == 1:
            assert not out.prompt_logprobs
        else:
            assert len(out.prompt_logprobs) == len(p) - 1
        for j, e in enumerate(out.prompt_logprobs or []):
            assert e.token_id == p[j + 1]
            assert abs(e.logprob - lp[j, p[j + 1]].item()) < 1e-5
            assert e.rank == int((lp[j] > lp[j, p[j + 1]]).sum()) + 1
            top = lp[j].topk(3)
            assert [t for t, _ in e.top] == top.indices.tolist()
            assert max(abs(a - b) for (_, a), b in zip(e.top, top.values.tolist())) < 1e-5
        entries = out.outputs[0].logprobs
        assert [e.token_id for e in entries] == gen
        for j, e in enumerate(entries):
            row = lp[len(p) - 1 + j]
            assert abs(e.logprob - row[gen[j]].item()) < 1e-5 and len(e.top) == 2
            assert [t for t, _ in e.top] == row.topk(2).indices.tolist()


def test_seed_gives_the_same_sample_whatever_the_batch(model):
    rng = random.Random(4)
    prompt = [rng.randrange(1, V) for _ in range(20)]
    params = SamplingParams(max_tokens=20, temperature=1.0, top_k=30, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run_engine(Engine(model, EngineConfig(block_size=4, num_blocks=100)), [("x", prompt, params, 0)])

    def with_mates(seed, num_blocks, budget):
        r = random.Random(seed)
        mates = [(f"m{i}", [r.randrange(1, V) for _ in range(r.randint(1, 40))],
                  SamplingParams(max_tokens=r.randint(1, 30), temperature=0.8, ignore_eos=True), r.randint(0, 3))
                 for i in range(8)]
        engine = Engine(model, EngineConfig(block_size=4, num_blocks=num_blocks, max_num_batched_tokens=budget,
                                            max_model_len=64))
        outs = run_engine(engine, mates[:4] + [("x", prompt, params, 2)] + mates[4:])
        return outs["x"].outputs[0].token_ids, engine.stats().num_preemptions

    a, _ = with_mates(1, 200, 64)
    b, preemptions = with_mates(2, 24, 32)  # a small pool: preemption and recompute
    assert preemptions > 0
    assert alone["x"].outputs[0].token_ids == a == b
    other = run_engine(Engine(model, EngineConfig(block_size=4, num_blocks=100)),
                       [("x", prompt, SamplingParams(max_tokens=20, seed=99, ignore_eos=True), 0)])
    assert other["x"].outputs[0].token_ids != a  # the seed matters


def test_abort_mid_generation_frees_every_block(model):
    rng = random.Random(5)
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=60, max_num_batched_tokens=32, max_num_seqs=4))
    for i in range(10):
        n = 2 if i == 3 else 1
        engine.add_request(str(i), [rng.randrange(1, V) for _ in range(rng.randint(5, 30))],
                           SamplingParams(max_tokens=40, ignore_eos=True, n=n))
    outs = {}
    for step in range(200):
        if step == 3:
            engine.abort("0")            # running, mid-generation
            engine.abort("3")            # n = 2 parent: both samples
            engine.abort("9")            # still waiting
            engine.abort("nope")         # unknown: ignored
        if step == 6:  # abort between schedule and update (while the runner executes) is safe too
            execute = engine.runner.execute

            def execute_and_abort(so, execute=execute):
                engine.abort("1")
                return execute(so)
            engine.runner.execute = execute_and_abort
        if step == 7:
            del engine.runner.execute
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        engine.scheduler.check_invariants()
        if not engine.has_unfinished_requests():
            break
    assert_all_blocks_free(engine)
    for rid in ("0", "1", "3", "9"):
        assert {c.finish_reason for c in outs[rid].outputs} == {"abort"}
    assert len(outs["3"].outputs) == 2
    assert 0 < len(outs["0"].outputs[0].token_ids) < 40
    assert outs["2"].outputs[0].finish_reason == "length" and len(outs["2"].outputs[0].token_ids) == 40


def test_bad_requests_raise_clear_errors(model):
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=25, max_model_len=100))
    with pytest.raises(UsageError, match="outside the vocabulary"):
        engine.add_request("a", [1, V], SamplingParams())
    with pytest.raises(UsageError, match="max length"):
        engine.add_request("a", [1] * 100, SamplingParams())
    with pytest.raises(UsageError, match="empty prompt"):
        engine.add_request("a", [], SamplingParams())
    engine.add_request("a", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(UsageError, match="already in use"):
        engine.add_request("a", [1, 2], SamplingParams())
    with pytest.raises(ResourceError, match="less than one sequence"):
        Engine(model, EngineConfig(block_size=4, num_blocks=10, max_model_len=100))
    run_engine(engine, [])


def test_llm_generate_keeps_order_and_rejects_bad_prompts(model, workload):
    prompts, max_tokens, _, ref = workload
    llm = LLM(model, EngineConfig(block_size=4, num_blocks=200, eos_token_id=EOS))
    outs = llm.generate(prompts[:10], [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens[:10]])
    assert [o.token_ids for o in outs] == ref[:10]
    with pytest.raises(UsageError, match="prompt 1:"):
        llm.generate([prompts[0], []], SamplingParams(max_tokens=3))
    assert_all_blocks_free(llm.engine)
    with pytest.raises(UsageError, match="tokenizer"):
        llm.generate(["text"], SamplingParams())


def test_tracker_snapshot_is_a_deep_copy_the_caller_may_keep():
    # the snapshot is built field by field (no dataclasses.replace): it must equal a deep copy of
    # the tracker's output, and stay equal to it while the tracker goes on
    assert [f.name for f in dataclasses.fields(CompletionOutput)] == [
        "index", "token_ids", "new_token_ids", "finish_reason", "stop_reason", "logprobs", "text"], \
        "a new CompletionOutput field: copy it in RequestTracker.snapshot, then update this list"
    assert [f.name for f in dataclasses.fields(RequestOutput)] == [
        "request_id", "prompt_token_ids", "outputs", "prompt_logprobs", "num_cached_tokens", "finished"], \
        "a new RequestOutput field: copy it in RequestTracker.snapshot, then update this list"
    rng = random.Random(0)
    t = RequestTracker("r", [1, 2, 3], n=2, want_logprobs=True)
    kept = []
    for step in range(12):
        for index in range(2):
            last = step == 5 + 4 * index
            if t.out.outputs[index].finished or (rng.random() < 0.3 and not last):
                continue
            toks = [rng.randrange(V) for _ in range(rng.randint(0, 3))]
            t.apply(RequestDelta("r", toks, "stop" if last else None, None,
                                 [("lp", step, x) for x in toks], [("plp", step)] if step < 2 else None,
                                 "r", index, 3, 2 * step))
        t.out.outputs[0].text = f"text {step}"
        ref = copy.deepcopy(t.out)
        snap = t.snapshot()
        assert snap == ref
        assert all(c.new_token_ids == [] for c in t.out.outputs)   # reset for the next step
        kept.append((snap, copy.deepcopy(ref)))
    assert t.out.finished
    for snap, ref in kept:                                         # untouched by later steps
        assert snap == ref


def test_engine_client_streams_and_aborts(model, workload):
    prompts, max_tokens, _, ref = workload
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=100, eos_token_id=EOS))

    async def main():
        client = ThreadEngineClient(engine)
        assert client.is_healthy and isinstance(client, EngineClient)

        async def collect(i):
            new, last = [], None
            async for out in client.add_request(prompts[i], SamplingParams(max_tokens=max_tokens[i], temperature=0)):
                new.extend(out.outputs[0].new_token_ids)
                last = out
            assert last.finished and last.outputs[0].token_ids == new
            return new

        got = await asyncio.gather(*(collect(i) for i in range(8)))
        assert got == ref[:8]

        # abort mid-stream: the stream ends with "abort" and the blocks are free by then
        seen = []
        async for out in client.add_request(prompts[0], SamplingParams(max_tokens=100, ignore_eos=True), "long"):
            seen.append(out)
            if len(seen) == 3:
                client.abort("long")
        assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
        assert len(seen[-1].outputs[0].token_ids) < 100
        assert engine.scheduler.kv.num_free_blocks == engine.num_blocks

        # a consumer that walks away aborts its request; on_finish still gets every generated token
        finals = []
        stream = client.add_request(prompts[1], SamplingParams(max_tokens=100, ignore_eos=True), "walk",
                                    on_finish=finals.append)
        async for first in stream:  # noqa: B007 - the first output is kept
            break
        await stream.aclose()
        for _ in range(200):
            if not engine.has_unfinished_requests() and finals:
                break
            await asyncio.sleep(0.005)
        assert engine.scheduler.kv.num_free_blocks == engine.num_blocks
        assert len(finals) == 1 and finals[0].finished and finals[0].outputs[0].finish_reason == "abort"
        assert finals[0].outputs[0].token_ids[:len(first.token_ids)] == first.token_ids
        assert len(finals[0].outputs[0].token_ids) < 100

        # on_finish of a finished request: once, with the final output; not for a refused request
        done = []
        async for out in client.add_request(prompts[3], SamplingParams(max_tokens=4, ignore_eos=True),  # noqa: B007 - the last output is kept
                                            on_finish=done.append):
            pass
        assert len(done) == 1 and done[0].outputs[0].token_ids == out.outputs[0].token_ids
        assert done[0].outputs[0].finish_reason == "length"

        refused = []
        with pytest.raises(UsageError, match="max length"):
            async for _ in client.add_request([1] * 200, SamplingParams(), on_finish=refused.append):
                pass
        assert len(refused) == 1 and isinstance(refused[0], UsageError)  # refused: told once, with the reason
        stats = client.stats()
        assert stats.num_requests_finished >= 10 and stats.num_generation_tokens > 0
        json.dumps(stats.as_dict())

        # a crash in the step loop: streams fail, the client reports dead
        def boom(so):
            raise RuntimeError("device lost")
        engine.runner.execute = boom
        died = []
        with pytest.raises(EngineDeadError) as info:
            async for _ in client.add_request(prompts[2], SamplingParams(max_tokens=5), on_finish=died.append):
                pass
        assert len(died) == 1 and isinstance(died[0], EngineDeadError)
        assert client.dead and not client.is_healthy and client.restarts == 0
        # what a client may be shown: no exception reprs (the detail is in the log)
        assert "device lost" not in str(info.value) and "Error(" not in str(info.value)
        late = []
        with pytest.raises(EngineDeadError):
            async for _ in client.add_request(prompts[2], SamplingParams(max_tokens=5), on_finish=late.append):
                pass
        assert len(late) == 1 and isinstance(late[0], EngineDeadError)
        await client.shutdown()

    asyncio.run(main())


# ---- no request takes the engine down ----------------------------------------------------------

def test_every_token_id_a_request_carries_is_checked_at_admission(model):
    """Regression: stop_token_ids=[999999] with min_tokens=1 was accepted, then the stop mask indexed
    the logits with it (IndexError) and the step failed for every request."""
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=60))
    with pytest.raises(UsageError, match="stop_token_ids has token id 999999, outside the vocabulary"):
        engine.add_request("bad", [1, 2], SamplingParams(stop_token_ids=[999999], min_tokens=1))
    with pytest.raises(UsageError, match=f"prompt has token id {V}"):
        engine.add_request("bad", [1, V], SamplingParams())
    assert not engine.has_unfinished_requests() and not engine.has_request("bad")
    outs = run_engine(engine, [("ok", [1, 2, 3], SamplingParams(max_tokens=3, stop_token_ids=[V - 1], min_tokens=1,
                                                                ignore_eos=True), 0)])
    assert len(outs["ok"].token_ids) == 3


MARK_SEED, MARK_LOGPROBS = 666, 7


def _inject_failures(monkeypatch):
    """Sampling raises for rows of requests seeded MARK_SEED, logprobs for requests asking MARK_LOGPROBS."""
    import muse.infer.runner as runner_mod

    def sample(logits, batch):
        if any(r.seed == MARK_SEED for r in batch.rows):
            raise RuntimeError("injected sampling failure")
        return _general_sample(logits, batch)

    def token_logprobs(logits, token_ids, num_top):
        if MARK_LOGPROBS in num_top:
            raise RuntimeError("injected logprobs failure")
        return _general_token_logprobs(logits, token_ids, num_top)

    monkeypatch.setattr(runner_mod, "sample", sample)
    monkeypatch.setattr(runner_mod, "token_logprobs", token_logprobs)


@pytest.mark.parametrize("where", ["sample", "logprobs"])
@pytest.mark.parametrize("config", ["chunked+prefix", "ngram-spec"])
def test_a_request_the_runner_fails_on_finishes_with_error_and_the_others_go_on(model, workload, monkeypatch,
                                                                                 where, config):
    """A failure in one request's sampling (or its logprobs, after the batch's tokens were appended to
    the runner's state) fails that request alone: it finishes with "error", its blocks are freed, and
    its batch mates (greedy, and seeded sampling whose tokens depend on the runner's state being rolled
    back exactly) finish as they do without it."""
    _inject_failures(monkeypatch)
    prompts, max_tokens, _, ref = workload
    good = [("0", prompts[0], SamplingParams(max_tokens=max_tokens[0], temperature=0), 0),
            ("1", prompts[1], SamplingParams(max_tokens=max_tokens[1], temperature=0, logprobs=2), 0),
            ("s", prompts[2], SamplingParams(max_tokens=20, temperature=0.8, seed=5, logprobs=1, ignore_eos=True), 0)]
    bad = (SamplingParams(max_tokens=30, temperature=0.9, seed=MARK_SEED, ignore_eos=True) if where == "sample"
           else SamplingParams(max_tokens=30, temperature=0, logprobs=MARK_LOGPROBS, ignore_eos=True))
    cfg = dict(block_size=4, eos_token_id=EOS, **CONFIGS[config])
    alone = run_engine(Engine(model, EngineConfig(**cfg)), good)
    engine = Engine(model, EngineConfig(**cfg))
    outs = run_engine(engine, good + [("bad", prompts[3], bad, 1)])
    assert outs["bad"].finished and outs["bad"].finish_reason == "error" and outs["bad"].failed
    for rid in ("0", "1", "s"):
        assert not outs[rid].failed
        assert outs[rid].token_ids == alone[rid].token_ids
        assert [e.token_id for e in outs[rid].outputs[0].logprobs or []] == \
            [e.token_id for e in alone[rid].outputs[0].logprobs or []]
    assert [outs["0"].token_ids, outs["1"].token_ids] == ref[:2]
    assert engine.stats().num_requests_finished == 4


def test_a_lone_failing_request_is_its_own_fault_a_broken_sampler_is_the_engines(model, monkeypatch):
    _inject_failures(monkeypatch)
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=60))
    outs = run_engine(engine, [("bad", [1, 2, 3], SamplingParams(seed=MARK_SEED), 0)])
    assert outs["bad"].finish_reason == "error"  # alone in its step, but a plain row still samples
    import muse.infer.runner as runner_mod

    def broken(logits, batch):
        raise RuntimeError("the device is gone")
    monkeypatch.setattr(runner_mod, "sample", broken)
    engine.add_request("a", [1, 2], SamplingParams(seed=1))
    engine.add_request("b", [3, 4], SamplingParams(seed=2))
    with pytest.raises(RuntimeError, match="the device is gone"):
        engine.step()


def test_the_thread_client_reports_a_failed_request_and_serves_the_others(model, workload, monkeypatch):
    _inject_failures(monkeypatch)
    prompts, max_tokens, _, ref = workload
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=100, eos_token_id=EOS))

    async def main():
        client = ThreadEngineClient(engine)
        finished: list = []

        async def last(prompt, params):
            out = None
            async for out in client.add_request(prompt, params, on_finish=finished.append):  # noqa: B007
                pass
            return out

        outs = await asyncio.gather(
            last(prompts[0], SamplingParams(max_tokens=max_tokens[0], temperature=0)),
            last(prompts[1], SamplingParams(max_tokens=10, seed=MARK_SEED)),
            last(prompts[2], SamplingParams(max_tokens=max_tokens[2], temperature=0)))
        assert client.is_healthy
        await client.shutdown()
        return outs, finished

    outs, finished = asyncio.run(main())
    assert outs[1].failed and outs[1].finish_reason == "error"
    assert [outs[0].token_ids, outs[2].token_ids] == [ref[0], ref[2]]
    assert sorted(f.failed for f in finished) == [False, False, True]
    assert_all_blocks_free(engine)


# ---- structure ------------------------------------------------------------------------------------

def test_engine_config_declares_the_scheduler_fields_once(model):
    """EngineConfig extends SchedulerConfig (no field declared twice, no field-by-field copy), and keyword
    construction keeps working; the engine fills in what it derives."""
    sched_fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
    assert sched_fields <= {f.name for f in dataclasses.fields(EngineConfig)}
    assert not sched_fields & set(EngineConfig.__dict__.get("__annotations__", {}))
    engine = Engine(model, EngineConfig(max_num_seqs=3, block_size=4, num_blocks=50, max_num_batched_tokens=40,
                                        enable_prefix_caching=False, eos_token_id=EOS))
    got = engine.scheduler.config
    assert type(got) is SchedulerConfig
    assert (got.max_num_seqs, got.block_size, got.num_blocks, got.max_num_batched_tokens, got.max_model_len,
            got.enable_prefix_caching, got.enable_chunked_prefill, got.eos_token_id) == \
        (3, 4, 50, 40, model.config.max_seq_len, False, True, EOS)
    with pytest.raises(ConfigError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)


def test_step_deltas_folded_once_equal_step(model, workload):
    """The engine emits per-step deltas; folding them on the caller's side (what both clients do) gives
    exactly what Engine.step() gives, output by output."""
    reqs = greedy_requests(workload, n=2)[:10]
    cfg = EngineConfig(block_size=4, eos_token_id=EOS, num_blocks=200, max_num_batched_tokens=32)
    a, b = Engine(model, cfg), Engine(model, cfg)
    folder = OutputProcessor()
    for rid, prompt, params, _ in reqs:
        a.add_request(rid, prompt, params)
        b.add_request(rid, prompt, params)
        folder.add(rid, prompt, params)
    steps = 0
    while a.has_unfinished_requests():
        deltas = b.step_deltas()
        assert all(isinstance(d, RequestDelta) for d in deltas)
        assert a.step() == folder.process(deltas)
        steps += 1
    assert not b.has_unfinished_requests() and not folder.request_ids() and steps > 10
    assert a.stats() == b.stats()


# ---- muse generate ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from muse.checkpoint import save_checkpoint
    from muse.tokenizer import train_bpe

    rng = random.Random(0)
    words = "the king queen lord lady love night day sword crown heart fair speak hear come go".split()
    texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)]
    tok = train_bpe(texts, vocab_size=300)
    model = tiny(vocab_size=tok.vocab_size, max_seq_len=64)
    root = tmp_path_factory.mktemp("gen")
    ckpt = save_checkpoint(root / "run" / "base", 1, model=model, tokenizer=tok)
    return root / "run", ckpt, model, tok


def test_cli_generate_end_to_end(tiny_checkpoint, tmp_path, capsys):
    from muse.cli.main import main
    from muse.tokenizer import END_ID, render_prompt

    run, _, model, tok = tiny_checkpoint
    rows = [{"prompt": "the king", "id": 7}, {"messages": [{"role": "user", "content": "speak"}], "tag": "x"},
            {"prompt": "love"}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert main(["generate", str(run), "--input", str(inp), "--output", str(out), "--max-tokens", "6",
                 "--temperature", "0", "--device", "cpu"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == 3 and "wrote 3 completions" in capsys.readouterr().out
    for r, g in zip(rows, got):
        assert {k: g[k] for k in r} == r
        assert g["finish_reason"] in ("stop", "length") and 1 <= g["tokens"] <= 6
    ref = generate(model, [tok.eot_id] + tok.encode("the king"), max_new_tokens=6, temperature=0,
                   use_cache=False, stop_ids=[tok.eot_id])
    assert got[0]["tokens"] == len(ref)
    assert got[0]["text"] == tok.decode(ref, skip_special_tokens=True)
    chat_ref = generate(model, render_prompt(tok, rows[1]["messages"]), max_new_tokens=6, temperature=0,
                        use_cache=False, stop_ids=[tok.eot_id, END_ID])
    assert got[1]["tokens"] == len(chat_ref)

    # n > 1 with a seed: n rows per line with "index", reproducible
    assert main(["generate", str(run), "--input", str(inp), "--output", str(out), "--max-tokens", "4",
                 "--n", "2", "--seed", "3", "--chat", "--device", "cpu"]) == 0
    first = out.read_text()
    assert [json.loads(line)["index"] for line in first.splitlines()] == [0, 1] * 3
    assert main(["generate", str(run), "--input", str(inp), "--output", str(out), "--max-tokens", "4",
                 "--n", "2", "--seed", "3", "--chat", "--device", "cpu"]) == 0
    assert out.read_text() == first


@pytest.mark.parametrize("line,match", [
    ("{not json", "line 2: not valid JSON"),
    ('["a list"]', "line 2: expected a JSON object"),
    ('{"text": "no prompt"}', "line 2: needs a 'prompt' string"),
    ('{"prompt": 5}', "line 2: needs a 'prompt' string"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "line 2: message 0 has role 'robot'"),
    ('{"prompt": "' + "the king " * 200 + '"}', "line 2: the prompt is"),
])
def test_cli_generate_bad_rows(tiny_checkpoint, tmp_path, capsys, line, match):
    from muse.cli.main import main

    run = tiny_checkpoint[0]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"prompt": "ok"}\n' + line + "\n")
    assert main(["generate", str(run), "--input", str(inp), "--output", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_generate_bad_flags(tiny_checkpoint, tmp_path, capsys):
    from muse.cli.main import main

    run = tiny_checkpoint[0]
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "ok"}\n')
    assert main(["generate", str(run), "--input", str(tmp_path / "missing.jsonl"), "--output", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", str(run), "--input", str(inp), "--output", str(tmp_path / "o"), "--top-p", "0",
                 "--device", "cpu"]) == 2
    assert "top_p" in capsys.readouterr().err
