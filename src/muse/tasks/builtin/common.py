"""What every built-in generator shares: disjoint splits by hashing, deterministic collection, baselines.

Disjoint by construction. An item's split is a function of its canonical key alone (the question text, the
word to spell, the line of verse): sha256(family, key) read as a number in [0, 1) falls into the test,
validation or train bucket. The seed only changes WHICH items a generator proposes, never where an item
goes, so the same question can never land in two splits, with one seed or across seeds. The generator
proposes items in a seeded order; `collect` keeps the first `sizes[split]` distinct keys of each split and
stops when all are full, or when `patience` proposals in a row brought no new key (a small item space:
the splits are then as large as the space allows, which the task's docs say).

This module knows splits and sampling; the items themselves are each generator's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache

from muse.tasks.spec import Sample

SPLIT_ORDER = ("test", "validation", "train")
DEFAULT_FRACTIONS = {"test": 0.2, "validation": 0.1, "train": 0.7}
DEFAULT_SIZES = {"test": 1000, "validation": 500, "train": 5000}


def bucket_of(key: str, family: str, fractions: Mapping[str, float] = DEFAULT_FRACTIONS) -> str:
    """The split an item with this canonical key belongs to; a pure function of (family, key)."""
    digest = hashlib.sha256(f"{family}\0{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split in SPLIT_ORDER:
        edge += fractions.get(split, 0.0)
        if u < edge:
            return split
    return "train"


def item_id(family: str, key: str) -> str:
    """A stable id: the same item has the same id whatever the seed or the sizes."""
    digest = hashlib.sha256(f"{family}\0{key}".encode()).hexdigest()
    return f"{family}-{digest[:12]}"


def collect(proposals: Iterable[tuple], family: str,
            sizes: Mapping[str, int] = DEFAULT_SIZES, fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
            patience: int = 20_000) -> dict[str, list[Sample]]:
    """Route (key, make_sample) or (key, make_sample, group) proposals into splits (module docstring).

    `group` (default: the key) is what is hashed: items that must share a split share a group, e.g. the
    phrasings of one question that contain each other ("Who made you?" and "Hi! Who made you?").
    """
    out: dict[str, list[Sample]] = {split: [] for split in sizes}
    seen: set[str] = set()
    idle = 0
    for key, make, *group in proposals:
        if all(len(out[s]) >= n for s, n in sizes.items()) or idle >= patience:
            break
        if key in seen:
            idle += 1
            continue
        seen.add(key)
        idle = 0
        split = bucket_of(group[0] if group else key, family, fractions)
        if split in out and len(out[split]) < sizes[split]:
            sample = make()
            sample.id = item_id(family, key)
            sample.metadata["key"] = key
            out[split].append(sample)
    return out


def split_loader(build: Callable[[], dict[str, list[Sample]]]) -> Callable[[str], list[Sample]]:
    """A Task loader that builds all splits once (collect fills them together) and serves each."""
    cached = lru_cache(maxsize=1)(build)
    return lambda split: cached()[split]


def majority_baseline(samples: list[Sample]) -> float:
    """The score of always giving the most common answer: chance for open-ended tasks."""
    if not samples:
        return 0.0
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.answer[0]] = counts.get(s.answer[0], 0) + 1
    return max(counts.values()) / len(samples)
