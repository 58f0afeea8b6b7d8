"""Speculative decoding: rejection sampling keeps the target distribution; proposers vs references."""

from __future__ import annotations

import random

import pytest
import torch

from muse.common.errors import ConfigError
from muse.infer.engine import Engine, EngineConfig
from muse.infer.sampler import sample_from_probs, seed_key
from muse.infer.sampling_params import SamplingParams
from muse.infer.spec_decode import NgramProposer, SpeculativeConfig, rejection_sample
from muse.model import ModelConfig, build_model

V = 8


pytestmark = pytest.mark.usefixtures("one_thread")
N = 20_000
# chi-square with 7 degrees of freedom: P(chi2 > 29) ~ 1e-4. Keys are fixed, so each test is
# deterministic: it passes or fails the same way every run.
CHI2_LIMIT = 29.0


def chi2(tokens: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=V).double()
    n = counts.sum()
    keep = p > 0
    assert counts[~keep].sum() == 0, "drew a token of probability 0"
    expected = p[keep].double() * n
    return float(((counts[keep] - expected) ** 2 / expected).sum())


def dist(*xs):
    t = torch.tensor(xs, dtype=torch.float32)
    return t / t.sum()


P = torch.stack([dist(8, 4, 2, 1, 1, 3, 0, 5), dist(1, 1, 6, 2, 0, 3, 3, 1), dist(2, 2, 2, 2, 2, 2, 2, 2)])
Q = torch.stack([dist(1, 6, 1, 3, 2, 0, 1, 1), dist(5, 1, 1, 1, 1, 1, 1, 1)])


def run_rejection(p, q, drafts=None, greedy=False):
    """N independent rows with the same target p (K+1, V) and proposals; drafts ~ q unless given."""
    K = p.size(0) - 1
    if drafts is None:
        drafts = torch.stack([sample_from_probs(q[i].expand(N, -1), [seed_key(11, r * 7 + i) for r in range(N)])
                              for i in range(K)], dim=1)
        draft_probs = q.expand(N, -1, -1)
    else:
        drafts, draft_probs = drafts.expand(N, -1), None
    return rejection_sample(p.expand(N, -1, -1), drafts, draft_probs, [K] * N, list(range(N)),
                            [1000] * N, greedy=[greedy] * N)


def test_rejection_sampling_keeps_the_target_distribution():
    out = run_rejection(P, Q)
    first = torch.tensor([o[0] for o in out])
    assert chi2(first, P[0]) < CHI2_LIMIT
    second = torch.tensor([o[1] for o in out if len(o) >= 2])   # after any first token, ~ P[1]
    assert len(second) > N // 4 and chi2(second, P[1]) < CHI2_LIMIT
    third = torch.tensor([o[2] for o in out if len(o) >= 3])    # the bonus token, ~ P[2]
    assert len(third) > 100 and chi2(third, P[2]) < CHI2_LIMIT
    assert all(1 <= len(o) <= 3 for o in out)
    # the test has power: the draft distribution itself is far from the target
    drafted = torch.stack([sample_from_probs(Q[0].expand(N, -1), [seed_key(5, r) for r in range(N)])])[0]
    assert (torch.bincount(drafted, minlength=V).double() / N - P[0]).abs().max() > 0.05


def test_point_mass_drafts_keep_the_target_distribution():
    """Prompt-lookup drafts (q = 1 on the draft) accept with probability p(draft)."""
    out = run_rejection(P, None, drafts=torch.tensor([[1, 2]]))
    first = torch.tensor([o[0] for o in out])
    assert chi2(first, P[0]) < CHI2_LIMIT
    accepted = sum(o[0] == 1 for o in out) / N
    assert abs(accepted - P[0, 1].item()) < 0.02


def test_greedy_verification_is_argmax_decoding():
    onehot = torch.zeros(4, V)
    onehot[torch.arange(4), torch.tensor([3, 5, 1, 6])] = 1.0
    for drafts, want in [([3, 5, 1], [3, 5, 1, 6]), ([3, 2, 1], [3, 5]), ([0, 5, 1], [3]), ([3, 5, 7], [3, 5, 1])]:
        out = rejection_sample(onehot[None], torch.tensor([drafts]), None, [3], [0], [10], greedy=[True])
        assert out == [want]
    # fewer real drafts than the padded width: the bonus comes from the last real position
    out = rejection_sample(onehot[None], torch.tensor([[3, 0, 0]]), None, [1], [0], [10], greedy=[True])
    assert out == [[3, 5]]


def slow_ngram(tokens, k, min_n, max_n):
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        for i in range(len(tokens) - n - 1, -1, -1):
            if tokens[i:i + n] == suffix:
                return tokens[i + n:i + n + k]
    return []


def test_ngram_proposer_matches_slow_search():
    rng = random.Random(0)
    prop = NgramProposer(num_tokens=4, min_n=1, max_n=3)
    for _ in range(300):
        toks = [rng.randrange(6) for _ in range(rng.randint(0, 40))]
        k = rng.randint(0, 5)
        assert prop.propose_one(toks, k) == slow_ngram(toks, k, 1, 3), toks
    # misaligned byte matches are not token matches
    big = [256, 1, 256 * 257, 1]
    assert prop.propose_one(big, 3) == slow_ngram(big, 3, 1, 3)
    assert prop.propose_one([5, 6, 7, 5, 6], 4) == [7, 5, 6]


def test_speculative_config_errors():
    with pytest.raises(ConfigError, match="not known"):
        SpeculativeConfig("medusa")
    with pytest.raises(ConfigError, match="draft_model"):
        SpeculativeConfig("draft")
    with pytest.raises(ConfigError, match="num_tokens"):
        SpeculativeConfig("ngram", 0)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampling_with_speculation_is_seeded_and_frees_blocks(method):
    """Sampled (not greedy) requests through both proposers: reproducible per seed whatever the
    batch, every block freed; a draft vocabulary mismatch is refused."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, d_model=64, n_head=4, max_seq_len=96, init_std=0.3)
    model = build_model(cfg).eval()
    draft = build_model(ModelConfig(vocab_size=50, n_layer=1, d_model=32, n_head=2, max_seq_len=96,
                                    init_std=0.3)).eval()
    spec = SpeculativeConfig(method, 3, draft_model=draft if method == "draft" else None)
    rng = random.Random(1)
    prompt = [rng.randrange(50) for _ in range(12)] * 2
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True,
                            repetition_penalty=1.1)

    def run(num_mates):
        engine = Engine(model, EngineConfig(block_size=4, num_blocks=60, max_num_batched_tokens=40, speculative=spec))
        engine.add_request("x", prompt, params)
        for i in range(num_mates):
            engine.add_request(f"m{i}", [rng.randrange(50) for _ in range(rng.randint(1, 20))],
                               SamplingParams(max_tokens=25, temperature=1.0, ignore_eos=True))
        outs = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o
            engine.scheduler.check_invariants()
        assert engine.scheduler.kv.num_free_blocks == engine.num_blocks
        return outs["x"].token_ids, engine.stats()

    alone, stats = run(0)
    crowded, _ = run(5)
    assert len(alone) == 30 and alone == crowded
    assert stats.spec_acceptance_rate is not None
    if method == "draft":
        wrong = build_model(ModelConfig(vocab_size=60, n_layer=1, d_model=32, n_head=2, max_seq_len=96)).eval()
        with pytest.raises(ConfigError, match="vocabulary"):
            Engine(model, EngineConfig(block_size=4, num_blocks=60,
                                       speculative=SpeculativeConfig("draft", 2, draft_model=wrong)))
