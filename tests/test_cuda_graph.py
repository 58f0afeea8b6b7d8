"""The static decode path (muse.infer.cuda_graph) against the engine's reference paths.

On CPU the padded static path runs eagerly (EngineConfig.static_decode_eager): it is exactly what a CUDA
graph replays, without the capture. It must give the reference backend's greedy tokens, seeded samples
and logprobs, and plain generate's greedy tokens, over request mixes whose decode batches and contexts
cross bucket boundaries, with requests joining and finishing mid-run, prefix-cache hits, preemption and
speculation; its padding rows must never change a real block; only decode-only steps take it. The CUDA
test (skipped without a GPU) captures the graphs and compares their replays with the eager static path
and with the reference. Tiny random models, fp32.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from muse.common.errors import ConfigError
from muse.infer.cuda_graph import DecodeGraphs, powers_of_two_up_to
from muse.infer.engine import HOST_PHASES, Engine, EngineConfig
from muse.infer.generate import generate
from muse.infer.paged_cache import PagedKVPool, PagedStep, SeqSpan, StepPlan
from muse.infer.runner import is_decode_only
from muse.infer.sampling_params import SamplingParams
from muse.infer.scheduler import ScheduledRequest, SchedulerOutput
from muse.infer.spec_decode import SpeculativeConfig
from muse.model import ModelConfig, build_model
from test_engine import run_engine
from test_engine_attention import assert_same_outputs

V = 101
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, n_kv_head=2, device="cpu", arch="llama"):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=V, n_layer=2, d_model=64, n_head=4, n_kv_head=n_kv_head,
                                   max_seq_len=128, init_std=0.1, arch=arch), device=device).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def requests(seed=0, n=24):
    """Three short greedy requests arriving alone at steps 0, 4 and 8 (decode batches of 1, 2 and 3 rows
    over short contexts), then n more from step 12 on: greedy and seeded sampled ones, a third sharing
    one of two prefixes (prefix-cache hits), some with logprobs or prompt logprobs, finishing at
    different lengths. The decode batch crosses the buckets 1, 2, 4, 8 and the contexts 1 .. 32 blocks."""
    rng = random.Random(seed)
    bases = [[rng.randrange(1, V) for _ in range(rng.randint(20, 40))] for _ in range(2)]
    out = [(f"h{j}", [rng.randrange(1, V) for _ in range(2 + j)],
            SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), 4 * j) for j in range(3)]
    for i in range(n):
        prompt = (bases[i % 2] if i % 3 == 0 else []) + [rng.randrange(1, V) for _ in range(rng.randint(1, 30))]
        sampled = i % 6 == 5
        params = SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.8 if sampled else 0, seed=i,
                                ignore_eos=True, logprobs=2 if i % 4 == 0 else None,
                                prompt_logprobs=2 if i % 5 == 0 else None)
        out.append((str(i), prompt, params, rng.randint(12, 24)))
    return out


def record(engine: Engine):
    """Wraps the engine's scheduler, runner and static path. Returns `steps`, filled as the engine runs
    with [SchedulerOutput, ran the static path] per step, and `keys`, the (B, nb) buckets it ran."""
    steps, keys = [], []
    schedule, execute, graphs = engine.scheduler.schedule, engine.runner.execute, engine.runner.decode_graphs

    def recording_schedule():
        steps.append([schedule(), None])
        return steps[-1][0]

    def recording_execute(so):
        n = engine.runner.num_static_steps
        out = execute(so)
        steps[-1][1] = engine.runner.num_static_steps > n
        return out

    def recording_run(key, run=graphs.run):
        keys.append(key)
        return run(key)

    engine.scheduler.schedule, engine.runner.execute, graphs.run = recording_schedule, recording_execute, recording_run
    return steps, keys


CASES = {
    "chunked+prefix": dict(num_blocks=200, max_num_batched_tokens=64),
    "preemption": dict(num_blocks=40, max_num_batched_tokens=48),
    "tiny-budget": dict(num_blocks=200, max_num_batched_tokens=8),  # one-token prompt chunks among decodes
    "ngram-spec": dict(num_blocks=200, max_num_batched_tokens=64, speculative=SpeculativeConfig("ngram", 3)),
    "few-buckets": dict(num_blocks=200, max_num_batched_tokens=64, cuda_graph_batch_sizes=(1, 3)),
}


@pytest.mark.parametrize("case", CASES)
def test_static_decode_gives_the_reference_outputs(model, case):
    reqs = requests()
    ref_engine = Engine(model, EngineConfig(block_size=4, max_num_seqs=8, attention_backend="paged-reference",
                                            **CASES[case]))
    ref = run_engine(ref_engine, reqs, max_steps=3000)
    engine = Engine(model, EngineConfig(block_size=4, max_num_seqs=8, static_decode_eager=True, **CASES[case]))
    steps, keys = record(engine)
    got = run_engine(engine, reqs, max_steps=3000)
    assert_same_outputs(ref, got)
    stats = engine.stats()
    assert stats.static_decode == "eager" and ref_engine.stats().static_decode == "off"
    assert stats.prefix_cache_hit_rate > 0
    if case == "preemption":
        assert stats.num_preemptions > 0
    if case == "ngram-spec":
        assert stats.spec_acceptance_rate is not None

    # exactly the decode-only steps that fit the largest bucket took the static path
    largest = max(engine.config.cuda_graph_batch_sizes or (8,))
    want = [is_decode_only(so) and 0 < len(so.requests) <= largest for so, _ in steps]
    assert [ran for _, ran in steps] == want
    assert stats.num_static_steps == sum(want) == len(keys)
    assert 0 < sum(want) < len(steps)                               # and the others ran eagerly
    batches, contexts = {k[0] for k in keys}, {k[1] for k in keys}
    if engine.config.speculative is None:  # (with drafts, few steps are decode-only)
        assert batches == set(engine.config.cuda_graph_batch_sizes or (1, 2, 4, 8))  # every batch bucket
    assert len(batches) >= 2 and len(contexts) >= 4                  # contexts of 1 .. 32 blocks
    if case == "tiny-budget":  # a decode-only step with a row that is not sampled (a prompt's one-token chunk)
        assert any(is_decode_only(so) and not all(s.sample for s in so.requests) for so, _ in steps)

    # plain generate, one full forward per token, for the greedy requests
    for rid, prompt, params, _ in reqs[:15]:
        if params.temperature == 0:
            want_tokens = generate(model, prompt, max_new_tokens=params.max_tokens, temperature=0, use_cache=False)
            assert got[rid].token_ids == want_tokens, rid


def test_padding_rows_never_touch_a_real_block(model):
    """One padded decode step (3 rows in a bucket of 4, contexts padded to 8 blocks) on a pool full of
    random numbers: the pool changes only at the 3 new tokens' slots and in the scratch block, the new
    K/V there equal what the reference step writes, and the real rows' logits equal the reference's."""
    bs, num_blocks = 4, 40
    rng = random.Random(0)
    pool = PagedKVPool.for_model(model.config, num_blocks + 1, bs)  # + the scratch block
    torch.manual_seed(1)
    pool.k.normal_()
    pool.v.normal_()
    ref_pool = PagedKVPool.for_model(model.config, num_blocks + 1, bs)
    ref_pool.k.copy_(pool.k)
    ref_pool.v.copy_(pool.v)
    blocks = list(range(num_blocks))
    rng.shuffle(blocks)
    contexts = [5, 17, 23]  # the new token of each sits at position context - 1
    spans = [SeqSpan(c - 1, 1, [blocks.pop() for _ in range(-(-c // bs))]) for c in contexts]
    ids = [rng.randrange(V) for _ in spans]
    graphs = DecodeGraphs(model, pool, max_model_len=128, batch_sizes=(1, 2, 4, 8), capture=False)
    before_k, before_v = pool.k.clone(), pool.v.clone()
    with torch.inference_mode():
        key = graphs.load(ids, spans)
        assert key == (4, 8)  # 4 rows (one padding), 6 blocks needed -> 8
        logits = graphs.run(key)
        ref = model(torch.tensor([ids]), kv_cache=PagedStep(ref_pool, StepPlan(spans, bs, "cpu")))[0]
    torch.testing.assert_close(logits[:3], ref, atol=1e-5, rtol=1e-5)
    written = torch.zeros(num_blocks + 1, bs, dtype=torch.bool)
    for s in spans:
        written[s.block_ids[s.start // bs], s.start % bs] = True
    written[num_blocks] = True  # the scratch block
    for new, old, refp in ((pool.k, before_k, ref_pool.k), (pool.v, before_v, ref_pool.v)):
        # (n_layer, Hkv, num_blocks + 1, bs, D): slots outside the step's own, bit for bit
        assert torch.equal(new[:, :, ~written], old[:, :, ~written])
        real = written.clone()
        real[num_blocks] = False
        torch.testing.assert_close(new[:, :, real], refp[:, :, real], atol=1e-6, rtol=1e-6)
        assert not torch.equal(new[:, :, real], old[:, :, real])  # the step did write them
    assert torch.isfinite(logits).all()  # padding rows too: their one key is the scratch slot they wrote


def test_static_step_matches_reference_with_gqa_mha_and_learned_positions():
    """The static step alone, GQA (2 k/v heads for 4 query heads), MHA, and gpt2 (learned positions
    from `positions`), contexts that end mid-block and on a block boundary: the logits of every real
    row and the pool equal the reference plan's."""
    rng = random.Random(2)
    for arch, n_kv_head in (("llama", 2), ("llama", 4), ("gpt2", 4)):
        model = tiny(seed=3, n_kv_head=n_kv_head, arch=arch)
        bs = 4
        pools = [PagedKVPool.for_model(model.config, 61, bs) for _ in range(2)]
        for p in pools[1:]:
            p.k.copy_(pools[0].k)
        free = list(range(60))
        rng.shuffle(free)
        # prefill 6 sequences through the reference on both pools, then one decode step each way
        seqs = [[rng.randrange(V) for _ in range(c)] for c in (1, 3, 4, 8, 13, 30)]
        tables = [[free.pop() for _ in range(-(-(len(s) + 1) // bs))] for s in seqs]
        with torch.inference_mode():
            for pool in pools:
                spans = [SeqSpan(0, len(s), t) for s, t in zip(seqs, tables)]
                model(torch.tensor([sum(seqs, [])]), kv_cache=PagedStep(pool, StepPlan(spans, bs, "cpu")))
            spans = [SeqSpan(len(s), 1, t) for s, t in zip(seqs, tables)]
            ids = [rng.randrange(V) for _ in seqs]
            ref = model(torch.tensor([ids]), kv_cache=PagedStep(pools[0], StepPlan(spans, bs, "cpu")))[0]
            graphs = DecodeGraphs(model, pools[1], max_model_len=64, batch_sizes=(8,), capture=False)
            key = graphs.load(ids, spans)
            got = graphs.run(key)
        assert key == (8, 8)
        torch.testing.assert_close(got[:6], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pools[1].k[:, :, :60], pools[0].k[:, :, :60], atol=1e-6, rtol=1e-6)


def _scheduled(rid, tokens, start, spec=()):
    return ScheduledRequest(rid, list(tokens) + list(spec), start, [0, 1, 2], list(spec), True, False, None, 1,
                            SamplingParams())


def test_decode_only_detection():
    decode = _scheduled("a", [5], 7)
    assert is_decode_only(SchedulerOutput([decode, _scheduled("b", [6], 2)]))
    assert is_decode_only(SchedulerOutput([]))
    assert not is_decode_only(SchedulerOutput([decode, _scheduled("c", [1, 2, 3], 0)]))  # a prefill chunk
    assert not is_decode_only(SchedulerOutput([decode, _scheduled("d", [4], 5, spec=[9, 9])]))  # drafts


def test_buckets():
    assert powers_of_two_up_to(1) == (1,)
    assert powers_of_two_up_to(8) == (1, 2, 4, 8)
    assert powers_of_two_up_to(40) == (1, 2, 4, 8, 16, 32, 40)
    model = tiny()
    graphs = DecodeGraphs(model, PagedKVPool.for_model(model.config, 33, 4), max_model_len=100,
                          batch_sizes=(4, 1, 2), capture=False)
    assert graphs.block_counts == (1, 2, 4, 8, 16, 25)
    assert graphs.bucket(1, 1) == (1, 1)
    assert graphs.bucket(3, 5) == (4, 2)
    assert graphs.bucket(4, 100) == (4, 25)
    assert graphs.bucket(5, 10) is None
    assert graphs.estimate_bytes() > 0 and graphs.buffer_bytes == 8 * sum(B * (4 + 25) for B in (1, 2, 4))


def test_config_and_stats(model):
    with pytest.raises(ConfigError, match="CUDA"):
        Engine(model, EngineConfig(num_blocks=64, cuda_graphs=True))
    with pytest.raises(ConfigError, match="positive integers"):
        EngineConfig(cuda_graph_batch_sizes=(0, 4))
    assert EngineConfig(cuda_graph_batch_sizes=(8, 2, 2)).cuda_graph_batch_sizes == (2, 8)
    off = Engine(model, EngineConfig(num_blocks=64, block_size=4))
    assert off.runner.decode_graphs is None and off.runner.pool.num_blocks == 64  # no scratch block
    eager = Engine(model, EngineConfig(num_blocks=64, block_size=4, static_decode_eager=True))
    assert eager.runner.pool.num_blocks == 65 and eager.scheduler.kv.num_free_blocks == 64
    assert not eager.runner.decode_graphs.captured
    reqs = requests(seed=1, n=6)
    run_engine(eager, reqs)
    stats = eager.stats()
    assert stats.static_decode == "eager" and stats.num_static_steps > 0 and stats.cuda_graph_bytes == 0
    assert tuple(stats.host_seconds) == HOST_PHASES and all(v > 0 for v in stats.host_seconds.values())
    json.dumps(stats.as_dict())
    assert off.stats().static_decode == "off" and off.stats().host_seconds["forward"] == 0.0


def test_a_failed_capture_leaves_decode_steps_eager(model, monkeypatch, caplog):
    """A capture that raises (not out of memory) is logged and the engine runs every step eagerly; an
    out-of-memory during capture is the ResourceError that says what to lower."""
    import muse.infer.runner as runner_mod
    from muse.common.errors import ResourceError
    from muse.infer.runner import ModelRunner

    def failing(*args, capture, **kw):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner_mod, "DecodeGraphs", failing)
    runner = ModelRunner(model, num_blocks=40, block_size=4, max_model_len=64, static_decode="graphs")
    assert runner.static_decode is None and runner.decode_graphs is None
    assert "capturing the decode CUDA graphs failed" in caplog.text
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=40, max_model_len=64))
    engine.runner = runner
    assert run_engine(engine, requests(seed=3, n=4)[:3])["h0"].finish_reason == "length"

    def out_of_memory(*args, capture, **kw):
        raise ResourceError("not enough GPU memory to capture the decode graphs")

    monkeypatch.setattr(runner_mod, "DecodeGraphs", out_of_memory)
    with pytest.raises(ResourceError, match="GPU memory"):
        ModelRunner(model, num_blocks=40, block_size=4, max_model_len=64, static_decode="graphs")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_replay_what_the_eager_paths_compute():
    """Captured graphs: their replays equal the same padded step run eagerly (same kernels: to fp32
    rounding), and the engine with graphs gives the reference backend's outputs; stats say so."""
    model = tiny(device="cuda")
    rng = random.Random(5)
    bs = 4
    pool = PagedKVPool.for_model(model.config, 41, bs, device="cuda")
    graphs = DecodeGraphs(model, pool, max_model_len=128, batch_sizes=(1, 2, 4), capture=True)
    assert graphs.captured and graphs.graph_bytes > 0
    free = list(range(40))
    rng.shuffle(free)
    with torch.inference_mode():
        for n in (1, 2, 3, 4):
            spans = [SeqSpan(rng.randrange(0, 30), 1, free[8 * i:8 * i + 8]) for i in range(n)]
            ids = [rng.randrange(V) for _ in spans]
            key = graphs.load(ids, spans)
            replayed = graphs.run(key).clone()
            key2 = graphs.load(ids, spans)  # the same inputs again (the step rewrites the same slots)
            eager = graphs._forward(key2)
            torch.testing.assert_close(replayed[:n], eager[:n], atol=1e-5, rtol=1e-5)
    reqs = requests(seed=7)
    outs = {}
    for name, kw in {"reference": dict(cuda_graphs=False, attention_backend="paged-reference"),
                     "graphs": dict(cuda_graphs=True), "eager": dict(static_decode_eager=True)}.items():
        engine = Engine(model, EngineConfig(block_size=4, max_num_seqs=8, num_blocks=200,
                                            max_num_batched_tokens=64, **kw))
        outs[name] = run_engine(engine, reqs, max_steps=3000)
        stats = engine.stats()
        if name == "graphs":
            assert stats.static_decode == "graphs" and stats.num_static_steps > 0 and stats.cuda_graph_bytes > 0
    assert_same_outputs(outs["reference"], outs["graphs"])
    assert_same_outputs(outs["eager"], outs["graphs"])
