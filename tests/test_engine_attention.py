"""Attention backends against the reference: "paged-contiguous" (seq_attention.SequenceStep) and "flex"
(flex_attention.FlexStep; "flex-eager" runs flex's unfused reference math, "flex" the compiled kernel)
give the "paged-reference" PagedStep's logits (fp32 tolerance) on the same pool, and the engine gives
identical greedy tokens, logprobs and prompt logprobs with each, through chunked prefill, prefix-cache
hits, preemption and speculative decoding. Tiny random models, fp32."""

from __future__ import annotations

import os
import random

import pytest
import torch

from muse.common.errors import ConfigError
from muse.infer import flex_attention
from muse.infer.engine import Engine, EngineConfig
from muse.infer.flex_attention import FlexStep, _tiles
from muse.infer.paged_cache import PagedKVPool, PagedStep, SeqSpan, StepPlan
from muse.infer.sampling_params import SamplingParams
from muse.infer.seq_attention import AUTO_MAX_SEQS, SequenceStep, check_backend, make_step
from muse.infer.spec_decode import SpeculativeConfig
from muse.model import ModelConfig, build_model
from test_engine import run_engine

V = 101
# each backend is compared with the first; "auto" mixes the first two step by step. "flex" (compiled)
# is tested at the step level only (test_compiled_flex_step_matches_paged_reference): compiling costs seconds
BACKENDS = ("paged-reference", "paged-contiguous", "flex-eager")
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
    check_random_steps(BACKENDS, n_kv_head)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MUSE_TEST_COMPILED"),
                    reason="compiles flex_attention: 31 s with inductor's cache warm, 108 s cold on a loaded "
                           "2-vCPU machine; set MUSE_TEST_COMPILED=1 to run it")
def test_compiled_flex_step_matches_paged_reference():
    check_random_steps(("paged-reference", "flex"), 2)


def check_random_steps(backends, n_kv_head):
    """Random chunks of five sequences (fresh prefills, chunks after a context, decodes) through pools
    with the same block tables, one per backend: the same logits every step, the same pools after.
    Tables mix adjacent blocks (views) and scattered ones (gathers); two sequences share a prefix block
    written in an earlier step, like a prefix-cache hit."""
    model = tiny(n_kv_head=n_kv_head)
    rng = random.Random(1)
    bs = 4
    pools = {b: PagedKVPool.for_model(model.config, 120, bs) for b in backends}
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
    got = {b: [] for b in backends}
    plans = []
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
            plans.append(spans)
            for b in backends:
                step = make_step(b, pools[b], spans, max_batched_query=8, n_rep=4 // n_kv_head)
                if isinstance(step, SequenceStep):
                    kinds.update((s.base is None, s.causal, s.mask is not None) for s in step.seqs)
                got[b].append(model(torch.tensor([ids]), kv_cache=step)[0])
    for b in backends[1:]:
        for ref, new in zip(got["paged-reference"], got[b]):
            torch.testing.assert_close(new, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pools[b].k, pools["paged-reference"].k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pools[b].v, pools["paged-reference"].v, atol=1e-5, rtol=1e-5)
    if "paged-contiguous" in backends:
        gathered = {k[0] for k in kinds}
        assert gathered == {True, False}  # both the view and the gather ran
        assert any(k[1] for k in kinds) and any(k[2] for k in kinds)  # fresh prefills and chunks after context
    # every kind of row ran: decodes and multi-token chunks, from position 0 and after a context, in
    # steps of several sequences; and a prefix block shared by two sequences of one step
    assert {(s.num_tokens > 1, s.start > 0) for st in plans for s in st} >= {(False, True), (True, False),
                                                                              (True, True)}
    assert max(map(len, plans)) > 1


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
    for b in BACKENDS[1:]:
        assert_same_outputs(outs["paged-reference"], outs[b])
        s = stats[b]
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
    for b in BACKENDS[1:]:
        assert_same_outputs(outs["paged-reference"], outs[b])


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="paged-contiguous"):
        EngineConfig(attention_backend="flash")


def test_backend_reaches_the_runner(model):
    for b in BACKENDS + ("auto",):
        engine = Engine(model, EngineConfig(num_blocks=64, attention_backend=b))
        assert engine.runner.attention_backend == b and engine.stats().attention_backend == b
    assert EngineConfig().attention_backend == "auto"
    pool = PagedKVPool.for_model(model.config, 64, 4)
    step = make_step("paged-reference", pool, [SeqSpan(0, 3, [0])])
    assert isinstance(step, PagedStep) and isinstance(step.plan, StepPlan)
    few = [SeqSpan(0, 3, [i]) for i in range(AUTO_MAX_SEQS)]
    assert isinstance(make_step("auto", pool, few), SequenceStep)
    assert isinstance(make_step("auto", pool, few + [SeqSpan(0, 3, [AUTO_MAX_SEQS])]), PagedStep)
    assert isinstance(make_step("flex-eager", pool, few), FlexStep)
    # compiled flex is the GPU path: on a CPU model it is refused when the engine is built, not mid-run
    with pytest.raises(ConfigError, match="not for CPU"):
        Engine(model, EngineConfig(num_blocks=64, attention_backend="flex"))


def test_sequence_step_takes_the_fused_cpu_kernel():
    """SDPA on CPU fuses only 4-D inputs; 3-D ones fall back to the unfused math path (~2.4x slower for
    a decode). The per-sequence path must reach the fused kernel for decodes, prefills and chunks."""
    from torch.profiler import profile

    pool = PagedKVPool(1, 16, 4, 4, 16)
    spans = [SeqSpan(9, 1, [2, 3, 4]), SeqSpan(0, 5, [6, 7]), SeqSpan(4, 3, [9, 10])]  # decode, prefill, chunk
    step = make_step("paged-contiguous", pool, spans)
    q, k, v = (torch.randn(1, 4, 9, 16) for _ in range(3))
    with torch.inference_mode(), profile() as prof:
        step.attend(0, q, k, v)
    kernels = [e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")]
    assert kernels == ["aten::_scaled_dot_product_flash_attention_for_cpu"], kernels


def test_flex_without_flex_attention_is_a_config_error(monkeypatch):
    """torch older than 2.5 has no torch.nn.attention.flex_attention: the backend is refused up front."""
    monkeypatch.setattr(flex_attention, "flex_attention", None)
    for b in ("flex", "flex-eager"):
        with pytest.raises(ConfigError, match="torch >= 2.5"):
            check_backend(b)
        with pytest.raises(ConfigError, match="torch >= 2.5"):
            EngineConfig(attention_backend=b)
    assert check_backend("auto") == "auto"


def test_flex_block_mask_lists_only_each_rows_blocks():
    """The block mask is what makes the compiled kernel read only the step's blocks. One row per tile
    (CPU): each row lists its sequence's blocks up to its position, those it sees whole as full
    (mask_mod skipped). Tiles of several rows (CUDA): the union of their rows' blocks, each once."""
    pool = PagedKVPool(1, 32, 4, 2, 8)
    spans = [SeqSpan(5, 3, [9, 3, 20]), SeqSpan(0, 1, [7]), SeqSpan(2, 2, [3, 11])]  # block 3 shared
    step = FlexStep(pool, spans, compiled=False)
    m = step.block_mask
    assert m.BLOCK_SIZE == (1, 4)
    got = [(m.kv_indices[0, 0, r, :m.kv_num_blocks[0, 0, r]].tolist(),
            m.full_kv_indices[0, 0, r, :m.full_kv_num_blocks[0, 0, r]].tolist()) for r in range(6)]
    # (partial, full) per row: positions 5, 6, 7 of [9, 3, ..], 0 of [7], 2, 3 of [3, 11]
    assert got == [([3], [9]), ([3], [9]), ([], [9, 3]), ([7], []), ([3], []), ([], [3])]
    assert step.positions.tolist() == [5, 6, 7, 0, 2, 3]
    assert step.slot_mapping.tolist() == [3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 7 * 4, 3 * 4 + 2, 3 * 4 + 3]
    part, full = _tiles(spans, [0, 0, 0, 1, 2, 2], [5, 6, 7, 0, 2, 3], 2, 4)
    assert part == [[3], [9, 3, 7], [3]] and full == [[9], [], []]  # rows 0-1 | 2-3 (two sequences) | 4-5
    part, full = _tiles(spans, [0, 0, 0, 1, 2, 2], [5, 6, 7, 0, 2, 3], 16, 4)
    assert part == [[9, 3, 7]] and full == [[]]  # block 3 listed once for two sequences


def test_auto_backend_gives_the_reference_outputs(model):
    """"auto" switches backend as the batch grows and shrinks (max_num_seqs 8 > AUTO_MAX_SEQS)."""
    reqs = requests(seed=4, n=16)
    outs = {b: run(Engine(model, EngineConfig(block_size=4, num_blocks=200, max_num_seqs=8, max_num_batched_tokens=64,
                                              attention_backend=b)), reqs) for b in ("paged-reference", "auto")}
    assert_same_outputs(outs["paged-reference"], outs["auto"])
