"""The batched sampler against slow per-row references, and its seeding rules."""

from __future__ import annotations

import math
import random

import pytest
import torch

from muse.infer.sampler import (
    SamplingBatch,
    SamplingRow,
    exponential_noise,
    is_plain_greedy,
    sample,
    sample_from_probs,
    seed_key,
    target_probs,
    token_logprobs,
    uniform,
)
from muse.infer.sampling_params import SamplingParams

V = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_probs(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """One row, written out element by element in the documented order."""
    p = row.params
    x = [float(v) for v in logits]
    hist = list(row.history[:row.position])
    out = hist[row.num_prompt_tokens:]
    for t in set(hist):
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(out):
        x[t] -= p.presence_penalty + p.frequency_penalty * out.count(t)
    if row.position - row.num_prompt_tokens < p.min_tokens:
        for t in row.stop_ids:
            x[t] = -math.inf
    if p.is_greedy:
        best = max(range(V), key=lambda i: x[i])
        return torch.tensor([1.0 if i == best else 0.0 for i in range(V)])
    x = [v / p.temperature for v in x]
    if 0 < p.top_k < V:
        kth = sorted(x, reverse=True)[p.top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]

    def softmax(vals):
        m = max(vals)
        e = [math.exp(v - m) if v > -math.inf else 0.0 for v in vals]
        return [v / sum(e) for v in e]

    if p.top_p < 1.0:
        probs = softmax(x)
        order = sorted(range(V), key=lambda i: -probs[i])
        keep, mass = set(), 0.0
        for i in order:
            keep.add(i)
            mass += probs[i]
            if mass >= p.top_p:
                break
        x = [v if i in keep else -math.inf for i, v in enumerate(x)]
    if p.min_p > 0:
        probs = softmax(x)
        top = max(probs)
        x = [v if probs[i] >= p.min_p * top else -math.inf for i, v in enumerate(x)]
    return torch.tensor(softmax(x))


def random_rows(rng: random.Random, n: int, **fixed) -> list[SamplingRow]:
    rows = []
    for _ in range(n):
        kw = dict(temperature=rng.choice([0.0, 0.5, 1.0, 1.7]), max_tokens=64)
        kw.update(fixed)
        hist = [rng.randrange(V) for _ in range(rng.randint(0, 30))]
        num_prompt = rng.randint(0, len(hist))
        rows.append(SamplingRow(SamplingParams(**kw), seed=rng.randrange(1 << 40), position=len(hist),
                                num_prompt_tokens=num_prompt, history=hist, stop_ids=(0, 3)))
    return rows


CASES = {
    "temperature": {},
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.6),
    "min_p": dict(min_p=0.2),
    "repetition": dict(repetition_penalty=1.8),
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.7),
    "min_tokens": dict(min_tokens=20),
    "everything": dict(top_k=12, top_p=0.8, min_p=0.05, repetition_penalty=1.3, presence_penalty=-0.5,
                       frequency_penalty=0.4, min_tokens=10),
}


@pytest.mark.parametrize("name", list(CASES))
def test_processed_distribution_matches_per_row_reference(name):
    rng = random.Random(list(CASES).index(name))
    rows = random_rows(rng, 24, **CASES[name])
    # a batch mixing this setting with plain rows: per-row settings must not leak between rows
    rows += random_rows(rng, 8)
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(0)) * 3
    batch = SamplingBatch(rows, V, "cpu")
    got = target_probs(logits, batch)
    want = torch.stack([reference_probs(logits[i], r) for i, r in enumerate(rows)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # the filters actually did something in this case (the test can fail)
    if name != "temperature":
        plain = target_probs(logits, SamplingBatch([SamplingRow(SamplingParams(temperature=r.params.temperature),
                                                                r.seed, r.position, r.num_prompt_tokens)
                                                    for r in rows], V, "cpu"))
        assert (plain - got).abs().max() > 1e-3


def test_sample_is_a_function_of_seed_and_position_only():
    rng = random.Random(1)
    rows = random_rows(rng, 16, top_k=20)
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(1))
    batch = sample(logits, SamplingBatch(rows, V, "cpu"))
    alone = torch.cat([sample(logits[i:i + 1], SamplingBatch([r], V, "cpu")) for i, r in enumerate(rows)])
    assert torch.equal(batch, alone)
    perm = list(range(len(rows)))
    rng.shuffle(perm)
    shuffled = sample(logits[perm], SamplingBatch([rows[i] for i in perm], V, "cpu"))
    assert torch.equal(shuffled, batch[perm])
    # greedy rows are the argmax of the penalised logits
    for i, r in enumerate(rows):
        if r.params.is_greedy:
            assert batch[i] == reference_probs(logits[i], r).argmax()
    # another position (or seed) draws differently for at least some rows
    moved = [SamplingRow(r.params, r.seed, r.position + 1, r.num_prompt_tokens, r.history + [1], r.stop_ids)
             for r in rows]
    assert not torch.equal(sample(logits, SamplingBatch(moved, V, "cpu")), batch)


def test_plain_greedy_rows_sample_the_raw_argmax():
    """The runner's fast path takes the argmax of the raw logits for rows is_plain_greedy accepts;
    `sample` must give the same token for them. Rows it refuses (penalties, a stop id still masked
    below min_tokens, temperature > 0) are the ones where the argmax can be wrong."""
    rng = random.Random(4)
    rows = (random_rows(rng, 16, temperature=0.0) + random_rows(rng, 16, temperature=0.0, min_tokens=12)
            + random_rows(rng, 8, temperature=0.0, repetition_penalty=2.0) + random_rows(rng, 8))
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(4)) * 3
    logits[:, 0] += 4.0  # stop id 0 is often the argmax: masking it below min_tokens changes the token
    got = sample(logits, SamplingBatch(rows, V, "cpu"))
    plain = [r.plain_greedy for r in rows]
    assert 0 < sum(plain) < len(rows)
    for i, r in enumerate(rows):
        assert plain[i] == (r.params.is_greedy and not r.has_penalties
                            and r.position - r.num_prompt_tokens >= r.params.min_tokens)
        if plain[i]:
            assert got[i] == logits[i].argmax()
    # the refused greedy rows include some whose token is not the raw argmax (the check matters)
    assert any(not plain[i] and r.params.is_greedy and got[i] != logits[i].argmax() for i, r in enumerate(rows))
    # no stop ids: min_tokens masks nothing, the row stays plain
    assert is_plain_greedy(SamplingParams(temperature=0, min_tokens=5), 0, ())
    assert not is_plain_greedy(SamplingParams(temperature=0, min_tokens=5), 0, (7,))
    assert is_plain_greedy(SamplingParams(temperature=0, min_tokens=5), 5, (7,))


def test_exponential_race_draws_from_the_distribution():
    """20,000 keyed draws over 8 tokens: chi-square against the probabilities (df 7; the 1e-4 tail
    is ~29; deterministic keys, so this either always passes or always fails)."""
    p = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05, 0.0])
    N = 20_000
    keys = [seed_key(7, pos) for pos in range(N)]
    toks = sample_from_probs(p.expand(N, -1), keys)
    counts = torch.bincount(toks, minlength=8).double()
    assert counts[7] == 0
    expected = p[:7].double() * N
    chi2 = float(((counts[:7] - expected) ** 2 / expected).sum())
    assert chi2 < 29.0, chi2


def test_noise_and_keys():
    a = exponential_noise([seed_key(1, 5), seed_key(1, 6), seed_key(1, 5)], 16, "cpu")
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1]) and (a > 0).all()
    assert seed_key(-3, 2) != seed_key(3, 2) and 0 <= seed_key(-3, 2) < 2**63
    assert seed_key(1, 5, 0) != seed_key(1, 5, 1)
    u = [uniform(9, i, 1) for i in range(2000)]
    assert 0 <= min(u) and max(u) < 1 and abs(sum(u) / len(u) - 0.5) < 0.03


def test_token_logprobs_match_log_softmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, V, generator=g) * 2
    toks = [3, 0, 39, 7, 7]
    entries = token_logprobs(logits, toks, [0, 1, 3, 5, 2])
    lp = torch.log_softmax(logits, -1)
    for i, e in enumerate(entries):
        assert e.token_id == toks[i]
        assert abs(e.logprob - lp[i, toks[i]].item()) < 1e-6
        assert e.rank == 1 + sum(1 for v in lp[i].tolist() if v > lp[i, toks[i]].item())
        top = lp[i].topk(len(e.top))
        assert [t for t, _ in e.top] == top.indices.tolist()
        assert [round(v, 5) for _, v in e.top] == [round(v, 5) for v in top.values.tolist()]
    assert [len(e.top) for e in entries] == [0, 1, 3, 5, 2]
    assert entries[0].as_dict()["token_id"] == 3
