"""Sampled evaluation: K seeded samples per item at a temperature, pass@1 and the unbiased pass@k.

    `muse eval --samples 8 --temperature 1.0` asks every generate/chat item 8 times; each sample's request
    carries its own seed (sample_seed(item id, index)), so the samples are reproducible and cached one by one.

    pass_at_k(n=8, c=3, k=4)      # 1 - C(5, 4) / C(8, 4) = 1 - 5/70
    pass_ks(8)                    # [1, 2, 4, 8]: the k reported for K = 8
    by_item(records)              # {item id: [its samples' records]}, in first-seen order

pass@1 is the mean over items of the per-item mean grade (for 0/1 grades, the fraction of samples right),
as Codex/HumanEval (Chen et al. 2021), DeepSeek-R1 and Yue et al. 2025 report it; pass@k is Chen et al.'s
unbiased estimator per item, averaged over items. Greedy decoding shows one path per item; what RL
changes is the distribution over paths, which only sampling measures.

This module knows numbers and record dicts; it runs nothing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

PASS_THRESHOLD = 1.0   # a sample counts as right for pass@k when its grade is full marks (as GRPO's pass@1)
MAX_TEMPERATURE = 10.0


def sample_seed(item_id: str, index: int = 0) -> int:
    """A 31-bit seed from an item id and a sample index. Index 0 is the seed a single sampled request has
    always had (sha256 of the id), so a K-sample run reuses the cached answer of a 1-sample run at the same
    temperature, and a run with a larger K sends only the new samples."""
    key = item_id if index == 0 else f"{item_id}#sample{index}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") & 0x7FFFFFFF


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of P(at least one of k samples is right) from n samples of which c are right:
    1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1). Exact integer binomials: n is small in an eval."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:   # every k-subset holds a right sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(samples: int) -> list[int]:
    """The k reported for `samples` samples per item: the powers of two up to it, and itself."""
    ks, k = [], 1
    while k <= samples:
        ks.append(k)
        k *= 2
    return ks if ks[-1] == samples else [*ks, samples]


def by_item(records: Iterable[dict]) -> dict[str, list[dict]]:
    """The records grouped by item id, items in the order first seen (samples in their order)."""
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["id"], []).append(r)
    return out


def item_means(records: Iterable[dict], metric: str) -> dict[str, float]:
    """Per item, the mean of `metric` over its samples (a failed sample scores 0)."""
    return {i: sum(float(r["scores"].get(metric, 0.0)) for r in rs) / len(rs) for i, rs in by_item(records).items()}


def item_pass_at_k(records: Iterable[dict], metric: str, ks: Iterable[int]) -> dict[int, list[float]]:
    """{k: [pass@k of each item]}; an item's n is its samples, c those graded >= PASS_THRESHOLD."""
    groups = list(by_item(records).values())
    out = {}
    for k in ks:
        vals = []
        for rs in groups:
            c = sum(float(r["scores"].get(metric, 0.0)) >= PASS_THRESHOLD for r in rs)
            vals.append(pass_at_k(len(rs), c, k))
        out[k] = vals
    return out
