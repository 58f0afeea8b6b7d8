"""The "paged-decode" backend (decode_attention.DecodeStep) against the "paged-reference" PagedStep: the
same logits (fp32 tolerance) and the same pools after random decode steps over adjacent, scattered and
gapped block tables, with and without grouped-query attention; the engine's greedy tokens and logprobs
are identical with "paged-decode" and with "auto" (which picks it for big decode steps). Tiny random
models, fp32."""

from __future__ import annotations

import random

import pytest
import torch

from muse.infer import decode_attention, seq_attention
from muse.infer.decode_attention import DecodeStep, fits, segments
from muse.infer.engine import Engine, EngineConfig
from muse.infer.paged_cache import PagedKVPool, PagedStep, SeqSpan
from muse.infer.sampling_params import SamplingParams
from muse.infer.seq_attention import make_step
from test_engine_attention import CASES, assert_same_outputs, requests, run, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
V = 101


def test_segments_cut_at_long_gaps_and_refuse_shared_blocks():
    bs = 4
    # contexts 5 and 9 tokens: blocks [3, 4] and [6, 7, 8]; then one far away
    spans = [SeqSpan(4, 1, [3, 4]), SeqSpan(8, 1, [6, 7, 8, 99]), SeqSpan(0, 1, [40])]
    assert segments(spans, bs, max_gap=16) == ([(3, 9), (40, 41)], 6)
    assert segments(spans, bs, max_gap=100) == ([(3, 41)], 6)
    assert segments(spans, bs, max_gap=0) == ([(3, 5), (6, 9), (40, 41)], 6)
    assert segments([SeqSpan(4, 1, [3, 4]), SeqSpan(2, 1, [3])], bs) is None   # block 3 read twice
    assert segments([SeqSpan(4, 2, [3, 4])], bs) is None                         # not a decode
    pool = PagedKVPool(1, 1000, 16, 4, 64)  # a block of keys: 4 heads x 16 slots x 64 x 4 bytes = 16 KiB

    def decodes(runs):  # one sequence per run, its blocks the run's
        return [SeqSpan(16 * (hi - lo) - 1, 1, list(range(lo, hi))) for lo, hi in runs]

    assert fits(decodes([(0, 192)]), pool) == ([(0, 192)], 192)     # 3 MiB of keys in one run
    assert fits(decodes([(0, 191)]), pool) is None                   # fewer: the reference's gather stays in cache
    six = [(100 * i, 100 * i + 40) for i in range(6)]                # 240 blocks: at most 240 // 32 = 7 runs
    assert fits(decodes(six), pool) == (six, 240)
    assert fits(decodes(six + [(700, 701), (800, 801)]), pool) is None
    assert fits(decodes([(0, 100)]) + [SeqSpan(0, 2, [500])], pool) is None  # not decode-only


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_decode_step_matches_paged_reference(n_kv_head):
    """Prefill the sequences through the reference, then decode them together step by step, each step
    through both backends on copies of one pool: equal logits, equal pools. Tables: adjacent blocks,
    shuffled ones, and runs far apart (several runs of blocks, gaps read through)."""
    model = tiny(n_kv_head=n_kv_head)
    rng = random.Random(n_kv_head)
    bs, nseq = 4, 6
    pool = PagedKVPool.for_model(model.config, 200, bs)
    lens = [rng.randint(1, 40) for _ in range(nseq)]
    free = list(range(100, 200))
    rng.shuffle(free)
    tables, nxt = [], 0
    for i in range(nseq):
        n = -(-(lens[i] + 12) // bs)
        if i % 3 == 0:
            tables.append(list(range(nxt, nxt + n)))
            nxt += n + (1 if i else 30)  # a one-block gap, then a long one
        else:
            tables.append([free.pop() for _ in range(n)])
    ids = [[rng.randrange(V) for _ in range(n + 12)] for n in lens]
    with torch.no_grad():
        for i in range(nseq):  # prompts, written through the reference
            model(torch.tensor([ids[i][:lens[i]]]), kv_cache=make_step("paged-reference", pool, [SeqSpan(0, lens[i], tables[i])]))
        pools = {"paged-reference": pool, "paged-decode": PagedKVPool.for_model(model.config, 200, bs)}
        pools["paged-decode"].k.copy_(pool.k)
        pools["paged-decode"].v.copy_(pool.v)
        runs = set()
        for t in range(12):
            live = [i for i in range(nseq) if t < 12 - i]  # sequences drop out one by one
            spans = [SeqSpan(lens[i] + t, 1, tables[i]) for i in live]
            x = torch.tensor([[ids[i][lens[i] + t] for i in live]])
            ref = model(x, kv_cache=make_step("paged-reference", pools["paged-reference"], spans, n_rep=4 // n_kv_head))
            step = make_step("paged-decode", pools["paged-decode"], spans)
            assert isinstance(step, DecodeStep)
            runs.add(len(step.runs))
            torch.testing.assert_close(model(x, kv_cache=step), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pools["paged-decode"].k, pools["paged-reference"].k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pools["paged-decode"].v, pools["paged-reference"].v, atol=1e-5, rtol=1e-5)
    assert max(runs) > 1 and min(runs) >= 1


def test_decode_step_matches_full_forward():
    """Independently of the reference: two sequences decoded together equal each one's full forward."""
    model = tiny(n_kv_head=2)
    rng = random.Random(5)
    bs = 4
    pool = PagedKVPool.for_model(model.config, 40, bs)
    seqs = [[rng.randrange(V) for _ in range(21)], [rng.randrange(V) for _ in range(17)]]
    tables = [[9, 10, 11, 12, 13, 14], [2, 3, 30, 31, 4]]
    outs = [[], []]
    with torch.no_grad():
        for i in range(2):
            outs[i].append(model(torch.tensor([seqs[i][:5]]), kv_cache=make_step("paged-reference", pool, [SeqSpan(0, 5, tables[i])]))[0])
        for p in range(5, 17):
            logits = model(torch.tensor([[seqs[0][p], seqs[1][p]]]),
                           kv_cache=DecodeStep(pool, [SeqSpan(p, 1, tables[0]), SeqSpan(p, 1, tables[1])]))[0]
            outs[0].append(logits[:1])
            outs[1].append(logits[1:])
        for i in range(2):
            torch.testing.assert_close(torch.cat(outs[i]), model(torch.tensor([seqs[i][:17]]))[0], atol=1e-5, rtol=1e-5)


def test_auto_picks_decode_step_only_where_it_fits(monkeypatch):
    model = tiny()
    pool = PagedKVPool.for_model(model.config, 400, 4)
    big = [SeqSpan(30, 1, list(range(8 * i, 8 * i + 8))) for i in range(8)]
    assert isinstance(make_step("auto", pool, big), PagedStep)  # tiny keys: the reference's gather is cheap
    monkeypatch.setattr(decode_attention, "MIN_GATHER_BYTES", 0)
    pool = PagedKVPool.for_model(model.config, 400, 4)
    big = [SeqSpan(30, 1, list(range(8 * i, 8 * i + 8))) for i in range(8)]   # 64 adjacent blocks, one run
    assert isinstance(make_step("auto", pool, big), DecodeStep)
    scattered = [SeqSpan(30, 1, list(range(50 * i, 50 * i + 8))) for i in range(8)]  # 8 runs of 8 blocks
    assert isinstance(make_step("auto", pool, scattered), PagedStep)
    assert isinstance(make_step("paged-decode", pool, scattered), DecodeStep)
    mixed = big[:-1] + [SeqSpan(28, 3, big[-1].block_ids)]                     # a chunk of 3: not decode-only
    assert isinstance(make_step("auto", pool, mixed), PagedStep)
    assert isinstance(make_step("paged-decode", pool, mixed), PagedStep)


def count_decode_steps(monkeypatch) -> list:
    made = []
    monkeypatch.setattr(seq_attention, "DecodeStep", lambda *a: made.append(1) or DecodeStep(*a))
    return made


@pytest.mark.parametrize("case", ["chunked+prefix", "preemption", "ngram-spec"])
def test_engine_gives_the_reference_outputs(case, monkeypatch):
    """Prefix-cache hits (shared blocks: those steps fall back to the reference), preemption, drafts."""
    model = tiny()
    reqs = requests(seed=6)
    made = count_decode_steps(monkeypatch)
    outs = {b: run(Engine(model, EngineConfig(block_size=4, max_num_seqs=8, attention_backend=b, **CASES[case])), reqs)
            for b in ("paged-reference", "paged-decode")}
    assert_same_outputs(outs["paged-reference"], outs["paged-decode"])
    assert made  # some steps ran DecodeStep


def test_auto_engine_gives_the_reference_outputs(monkeypatch):
    """Eight long requests without shared prefixes: "auto" decodes them through DecodeStep."""
    model = tiny()
    rng = random.Random(7)
    reqs = [(str(i), [rng.randrange(1, V) for _ in range(rng.randint(30, 60))],
             SamplingParams(max_tokens=rng.randint(4, 30), temperature=0, ignore_eos=True,
                            logprobs=2 if i % 3 == 0 else None), 0) for i in range(8)]
    made = count_decode_steps(monkeypatch)
    monkeypatch.setattr(decode_attention, "MIN_GATHER_BYTES", 0)  # tiny model: every key gather is small
    outs = {b: run(Engine(model, EngineConfig(block_size=4, num_blocks=200, max_num_seqs=8, attention_backend=b)), reqs)
            for b in ("paged-reference", "auto")}
    assert_same_outputs(outs["paged-reference"], outs["auto"])
    assert made
