"""Prompt logprobs from a start position (`SamplingParams.prompt_logprobs_start`) against the full
computation (no start: every prompt position, no prefix-cache hits), which is itself tested against a
full forward pass in test_engine.py.

The fast path: tokens before start - 1 may come from the prefix cache, so the choices of one
multiple-choice question compute their shared context once. Its values must equal the reference's
entries for positions start .. len - 1 (fp32, 1e-5), with and without a cached prefix actually hit,
with chunked prefill, and after preemption.
"""

from __future__ import annotations

import random

import pytest
import torch

from muse.common.errors import UsageError
from muse.infer.engine import Engine, EngineConfig
from muse.infer.kv_blocks import KVCacheManager
from muse.infer.request import Request
from muse.infer.sampling_params import SamplingParams
from muse.model import ModelConfig, build_model

V = 101
BS = 4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=128, init_std=0.1)
    return build_model(cfg).eval()


def run(engine: Engine, requests) -> dict:
    """requests: (id, prompt, params), all added at once. {id: final RequestOutput}; every block freed."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        engine.scheduler.check_invariants()
    assert engine.scheduler.kv.num_free_blocks == engine.num_blocks
    return outs


def params(start=None, top=2):
    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top, prompt_logprobs_start=start)


def full_reference(model, prompts: list[list[int]]) -> list[list]:
    """Every prompt's logprobs without a start, each prompt alone in a fresh engine (no cache hits)."""
    refs = []
    for p in prompts:
        engine = Engine(model, EngineConfig(block_size=BS, num_blocks=64))
        out = run(engine, [("ref", p, params())])["ref"]
        assert out.num_cached_tokens == 0
        refs.append(out.prompt_logprobs or [])
    return refs


def assert_same(got, want, start: int, prompt: list[int]):
    """`got` (from start on) equals the full reference's entries for positions start .. len - 1."""
    want = want[start - 1:]
    assert len(got or []) == len(want) == max(len(prompt) - start, 0)
    for g, w, tok in zip(got or [], want, prompt[start:]):
        assert g.token_id == w.token_id == tok
        assert abs(g.logprob - w.logprob) < 1e-5
        assert g.rank == w.rank
        assert [t for t, _ in g.top] == [t for t, _ in w.top]
        assert max((abs(a - b) for (_, a), (_, b) in zip(g.top, w.top)), default=0.0) < 1e-5


@pytest.mark.parametrize("budget", [7, 2048])  # chunked prefill (chunks cut mid-block) and whole prompts
def test_start_equals_full_computation_with_and_without_cache_hits(model, budget):
    rng = random.Random(1)
    context = [rng.randrange(1, V) for _ in range(23)]
    choices = [[rng.randrange(1, V) for _ in range(n)] for n in (1, 3, 6, 9)]
    prompts = [context + c for c in choices]
    refs = full_reference(model, prompts)
    for start in (1, 2, 4, 5, 9, 16, 17, 23, 24):
        # a fresh engine per start: the first request finds nothing cached, the later ones hit the
        # context's full blocks (registered by the first one, in the same step or an earlier one)
        engine = Engine(model, EngineConfig(block_size=BS, num_blocks=64, max_num_batched_tokens=budget))
        first = run(engine, [("first", prompts[0], params(start))])["first"]
        assert first.num_cached_tokens == 0
        assert_same(first.prompt_logprobs, refs[0], start, prompts[0])
        outs = run(engine, [(str(i), p, params(start)) for i, p in enumerate(prompts)])
        for i, p in enumerate(prompts):
            # the hit is limited to whole blocks below position start - 1
            assert outs[str(i)].num_cached_tokens == (start - 1) // BS * BS
            assert_same(outs[str(i)].prompt_logprobs, refs[i], start, p)
        if start >= 1 + BS:
            assert all(o.num_cached_tokens > 0 for o in outs.values())


def test_choices_sent_together_share_their_context(model):
    """Four choices admitted in one step: the first computes the context, the others hit it."""
    rng = random.Random(2)
    context = [rng.randrange(1, V) for _ in range(30)]
    prompts = [context + [rng.randrange(1, V) for _ in range(n)] for n in (2, 5, 4, 7)]
    refs = full_reference(model, prompts)
    engine = Engine(model, EngineConfig(block_size=BS, num_blocks=64))
    outs = run(engine, [(str(i), p, params(len(context))) for i, p in enumerate(prompts)])
    assert outs["0"].num_cached_tokens == 0
    for i, p in enumerate(prompts):
        assert_same(outs[str(i)].prompt_logprobs, refs[i], len(context), p)
        if i:
            assert outs[str(i)].num_cached_tokens == 28


def test_start_past_the_prompt_reports_nothing(model):
    p = [3, 4, 5, 6, 7]
    engine = Engine(model, EngineConfig(block_size=BS, num_blocks=64))
    outs = run(engine, [("a", p, params(5)), ("b", p, params(40))])
    assert outs["a"].prompt_logprobs is None and outs["b"].prompt_logprobs is None
    assert len(outs["a"].token_ids) == 1


def test_preempted_request_reports_each_position_once(model):
    """A pool too small for every request at once: requests are preempted and recompute (hitting the
    cache again up to their start); each reports every position from start on exactly once."""
    rng = random.Random(3)
    context = [rng.randrange(1, V) for _ in range(20)]
    prompts = [context + [rng.randrange(1, V) for _ in range(rng.randint(1, 8))] for _ in range(6)]
    refs = full_reference(model, prompts)
    engine = Engine(model, EngineConfig(block_size=BS, num_blocks=16, max_num_batched_tokens=8, max_model_len=48))
    sp = SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=2, prompt_logprobs_start=13,
                        ignore_eos=True)
    outs = run(engine, [(str(i), p, sp) for i, p in enumerate(prompts)])
    assert engine.stats().num_preemptions > 0
    for i, p in enumerate(prompts):
        assert_same(outs[str(i)].prompt_logprobs, refs[i], 13, p)


def test_cache_hit_limit():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = Request("a", list(range(1, 20)), SamplingParams(max_tokens=1))
    assert kv.allocate_slots(a, 19)  # registers its 4 full blocks
    for start, want in ((None, 0), (1, 0), (4, 0), (5, 4), (9, 8), (12, 8), (13, 12), (17, 16), (40, 16)):
        b = Request(f"b{start}", list(range(1, 20)), SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                                     prompt_logprobs_start=start))
        assert kv.get_computed_blocks(b)[1] == want, start
    # without prompt logprobs: every full block but never the last token
    assert kv.get_computed_blocks(Request("c", list(range(1, 20)), SamplingParams()))[1] == 16


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_start_is_refused(bad):
    with pytest.raises(UsageError, match="prompt_logprobs_start"):
        SamplingParams(prompt_logprobs=0, prompt_logprobs_start=bad)


def test_start_needs_prompt_logprobs():
    with pytest.raises(UsageError, match="needs prompt_logprobs"):
        SamplingParams(prompt_logprobs_start=3)
    assert SamplingParams(prompt_logprobs=0).first_prompt_logprob == 1
    assert SamplingParams(prompt_logprobs=0, prompt_logprobs_start=7).first_prompt_logprob == 7
