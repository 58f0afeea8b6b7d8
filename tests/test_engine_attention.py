"""Attention backends against the reference: "paged-contiguous" (seq_attention.SequenceStep) gives the
"paged-reference" PagedStep's logits (fp32 tolerance) on the same pool, and the engine gives identical
greedy tokens, logprobs and prompt logprobs with either, through chunked prefill, prefix-cache hits,
preemption and speculative decoding. Tiny random models, fp32."""

from __future__ import annotations

import random

import pytest
import torch

from muse.common.errors import ConfigError
from muse.infer.engine import Engine, EngineConfig
from muse.infer.paged_cache import PagedKVPool, PagedStep, SeqSpan, StepPlan
from muse.infer.sampling_params import SamplingParams
from muse.infer.seq_attention import AUTO_MAX_SEQS, SequenceStep, make_step
from muse.infer.spec_decode import SpeculativeConfig
from muse.model import ModelConfig, build_model
from test_engine import run_engine

V = 101
BACKENDS = ("paged-reference", "paged-contiguous")  # "auto" mixes the two step by step
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, n_layer=2, n_kv_head=2):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=V, n_layer=n_layer, d_model=64, n_head=4, n_kv_head=n_kv_head,
                                   max_seq_len=128, init_std=0.1)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.mark.parametrize("n_kv_head", [2, 4])
def test_sequence_step_matches_paged_reference(n_kv_head):
    """Random chunks of five sequences (fresh prefills, chunks after a context, decodes) through two pools
    with the same block tables, one per backend: the same logits every step, the same pools after.
    Tables mix adjacent blocks (views) and scattered ones (gathers); two sequences share a prefix block
    written in an earlier step, like a prefix-cache hit."""
    model = tiny(n_kv_head=n_kv_head)
    rng = random.Random(1)
    bs = 4
    pools = {b: PagedKVPool.for_model(model.config, 120, bs) for b in BACKENDS}
    seqs = [[rng.randrange(V) for _ in range(rng.randint(1, 90))] for _ in range(5)]
    seqs[4][:8] = seqs[3][:8]  # sequence 4 reads sequence 3's first two blocks
    scattered = list(range(60, 120))
    rng.shuffle(scattered)
    tables, nxt = [], 0
    for i, s in enumerate(seqs):
        n = -(-len(s) // bs)
        if i % 2 == 0:  # adjacent blocks
            tables.append(list(range(nxt, nxt + n)))
            nxt += n
        else:
            tables.append([scattered.pop() for _ in range(n)])
    tables[4][:2] = tables[3][:2]
    done = [0, 0, 0, 0, 8]  # sequence 4's first 8 tokens are "cached" once sequence 3 has written them
    got = {b: [] for b in BACKENDS}
    kinds = set()
    with torch.no_grad():
        while any(d < len(s) for d, s in zip(done, seqs)):
            spans, ids = [], []
            for i, s in enumerate(seqs):
                if i == 4 and done[3] < 8 or done[i] >= len(s):
                    continue
                n = min(len(s) - done[i], rng.choice([1, 1, 2, 5, 40]))
                spans.append(SeqSpan(done[i], n, tables[i]))
                ids += s[done[i]:done[i] + n]
                done[i] += n
            for b in BACKENDS:
                step = make_step(b, pools[b], spans, max_batched_query=8, n_rep=4 // n_kv_head)
                if isinstance(step, SequenceStep):
                    kinds.update((s.base is None, s.causal, s.mask is not None) for s in step.seqs)
                got[b].append(model(torch.tensor([ids]), kv_cache=step)[0])
    for ref, new in zip(got["paged-reference"], got["paged-contiguous"]):
        torch.testing.assert_close(new, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pools["paged-contiguous"].k, pools["paged-reference"].k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pools["paged-contiguous"].v, pools["paged-reference"].v, atol=1e-5, rtol=1e-5)
    gathered = {k[0] for k in kinds}
    assert gathered == {True, False}  # both the view and the gather ran
    assert any(k[1] for k in kinds) and any(k[2] for k in kinds)  # fresh prefills and chunks after context


def test_sequence_step_matches_full_forward(model):
    """Independently of the reference: a sequence decoded token by token equals one full forward."""
    rng = random.Random(3)
    pool = PagedKVPool.for_model(model.config, 40, 4)
    s = [rng.randrange(V) for _ in range(30)]
    table = [7, 8, 9, 3, 4, 5, 6, 10]  # adjacent, then not, then adjacent again
    out, writes = [], set()
    with torch.no_grad():
        for a, b in [(0, 9)] + [(p, p + 1) for p in range(9, 30)]:
            step = SequenceStep(pool, [SeqSpan(a, b - a, table)])
            writes.add(step.slice_writes)
            out.append(model(torch.tensor([s[a:b]]), kv_cache=step)[0])
        full = model(torch.tensor([s]))[0]
    torch.testing.assert_close(torch.cat(out), full, atol=1e-5, rtol=1e-5)
    assert writes == {True, False}  # copies into views (blocks 7-9), then the pool's index_copy


def requests(seed=0, n=24):
    """Mixed prompts, a third sharing one of two prefixes (prefix-cache hits), mixed lengths and arrivals."""
    rng = random.Random(seed)
    bases = [[rng.randrange(1, V) for _ in range(rng.randint(20, 40))] for _ in range(2)]
    out = []
    for i in range(n):
        prompt = (bases[i % 2] if i % 3 == 0 else []) + [rng.randrange(1, V) for _ in range(rng.randint(1, 30))]
        params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=0, ignore_eos=True,
                                logprobs=2 if i % 4 == 0 else None, prompt_logprobs=2 if i % 5 == 0 else None)
        out.append((str(i), prompt, params, rng.randint(0, 8)))
    return out


def run(engine: Engine, reqs):
    """Every request to the end, the scheduler's invariants checked after each step (test_engine.run_engine)."""
    return run_engine(engine, reqs, max_steps=3000)


def assert_same_outputs(a, b):
    assert a.keys() == b.keys()
    for rid in a:
        x, y = a[rid], b[rid]
        assert x.token_ids == y.token_ids, rid
        assert x.finish_reason == y.finish_reason
        for lx, ly in ((x.outputs[0].logprobs, y.outputs[0].logprobs), (x.prompt_logprobs, y.prompt_logprobs)):
            assert (lx is None) == (ly is None)
            for ex, ey in zip(lx or [], ly or []):
                assert ex.token_id == ey.token_id and ex.rank == ey.rank
                assert abs(ex.logprob - ey.logprob) < 1e-5
                assert [t for t, _ in ex.top] == [t for t, _ in ey.top]


CASES = {
    "chunked+prefix": dict(num_blocks=200, max_num_batched_tokens=64),
    "preemption": dict(num_blocks=40, max_num_batched_tokens=48),
    "no-chunking": dict(num_blocks=200, max_num_batched_tokens=128, enable_chunked_prefill=False),
    "ngram-spec": dict(num_blocks=200, max_num_batched_tokens=64, speculative=SpeculativeConfig("ngram", 3)),
    "ngram-spec-preemption": dict(num_blocks=40, max_num_batched_tokens=64,
                                  speculative=SpeculativeConfig("ngram", 4, ngram_min=1, ngram_max=2)),
}


@pytest.mark.parametrize("case", CASES)
def test_engine_backends_give_identical_outputs(model, case):
    reqs = requests()
    outs = {}
    stats = {}
    for b in BACKENDS:
        engine = Engine(model, EngineConfig(block_size=4, max_num_seqs=8, attention_backend=b, **CASES[case]))
        outs[b] = run(engine, reqs)
        stats[b] = engine.stats()
    assert_same_outputs(outs["paged-reference"], outs["paged-contiguous"])
    s = stats["paged-contiguous"]
    assert s.prefix_cache_hit_rate > 0
    if case.startswith("preemption") or case.endswith("preemption"):
        assert s.num_preemptions > 0
    if case.startswith("ngram"):
        assert s.spec_acceptance_rate is not None


def test_engine_backends_with_a_draft_model(model):
    """Draft-model speculation: the draft mirrors the target's step through a reference plan whatever
    the target's backend; greedy outputs equal."""
    draft = tiny(seed=5, n_layer=1)
    reqs = requests(seed=2, n=8)
    outs = {}
    for b in BACKENDS:
        spec = SpeculativeConfig("draft", 3, draft_model=draft)
        outs[b] = run(Engine(model, EngineConfig(block_size=4, num_blocks=120, max_num_seqs=4,
                                                 speculative=spec, attention_backend=b)), reqs)
    assert_same_outputs(outs["paged-reference"], outs["paged-contiguous"])


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="paged-contiguous"):
        EngineConfig(attention_backend="flash")


def test_backend_reaches_the_runner(model):
    for b in BACKENDS + ("auto",):
        assert Engine(model, EngineConfig(num_blocks=64, attention_backend=b)).runner.attention_backend == b
    assert EngineConfig().attention_backend == "auto"
    pool = PagedKVPool.for_model(model.config, 64, 4)
    step = make_step("paged-reference", pool, [SeqSpan(0, 3, [0])])
    assert isinstance(step, PagedStep) and isinstance(step.plan, StepPlan)
    few = [SeqSpan(0, 3, [i]) for i in range(AUTO_MAX_SEQS)]
    assert isinstance(make_step("auto", pool, few), SequenceStep)
    assert isinstance(make_step("auto", pool, few + [SeqSpan(0, 3, [AUTO_MAX_SEQS])]), PagedStep)


def test_auto_backend_gives_the_reference_outputs(model):
    """"auto" switches backend as the batch grows and shrinks (max_num_seqs 8 > AUTO_MAX_SEQS)."""
    reqs = requests(seed=4, n=16)
    outs = {b: run(Engine(model, EngineConfig(block_size=4, num_blocks=200, max_num_seqs=8, max_num_batched_tokens=64,
                                              attention_backend=b)), reqs) for b in ("paged-reference", "auto")}
    assert_same_outputs(outs["paged-reference"], outs["auto"])
