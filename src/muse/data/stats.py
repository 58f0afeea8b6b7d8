"""Corpus statistics the reports compare against: the unigram baseline in bits per byte.

A unigram model predicts every token from its training-split frequency alone (add-one smoothed over the
vocabulary). Its cross-entropy on the val split, divided by the val split's bytes per token, is the
bits-per-byte a language model must beat to have learned anything beyond token frequencies.
"""

from __future__ import annotations

import math
import os

import numpy as np

from muse.data.loader import read_meta, resolve_data_dir
from muse.data.shards import open_shards


def token_counts(data_dir: str | os.PathLike, split: str, vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in open_shards(data_dir, split):
        counts += np.bincount(np.asarray(shard, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    return counts


def unigram_bpb(data_dir: str | os.PathLike) -> dict:
    """{"bits_per_token", "bpb", "nats_per_token"} of the add-one-smoothed train unigram on the val split."""
    data_dir = resolve_data_dir(data_dir)
    meta = read_meta(data_dir)
    vocab = int(meta["vocab_size"])
    train = token_counts(data_dir, "train", vocab)
    val = token_counts(data_dir, "val", vocab)
    logp = np.log2((train + 1) / (train.sum() + vocab))
    bits_per_token = float(-(val * logp).sum() / max(val.sum(), 1))
    bpt = meta["splits"]["val"]["bytes"] / meta["splits"]["val"]["tokens"]
    return {"bits_per_token": bits_per_token, "nats_per_token": bits_per_token * math.log(2),
            "bpb": bits_per_token / bpt}
