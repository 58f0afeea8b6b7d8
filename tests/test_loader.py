"""TokenLoader: windows are contiguous stream slices, disjoint across ranks, resumable exactly; eval order fixed.

Most tests use a synthetic data dir whose token at global stream position p has id p, so a window's
first token says where it came from and contiguity is `row == arange(start, start + T + 1)`.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from muse.common.errors import DataError
from muse.data.loader import TokenLoader, bytes_per_token, resolve_data_dir
from muse.data.prepare import PrepareConfig, prepare
from muse.data.shards import ShardWriter, open_shards

T = 7
SPAN = T + 1


@pytest.fixture
def positional(tmp_path):
    """A run dir with shards of 500, 500, 333 tokens (train) and 100 (val); token id = stream position."""
    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    for split, n, cap in (("train", 1333, 500), ("val", 100, 1000)):
        with ShardWriter(data, split, vocab_size=1 << 20, max_tokens=cap) as w:
            w.write(np.arange(n))
    splits = {"train": {"bytes_per_token": 3.5}, "val": {"bytes_per_token": 3.25}}
    (data / "meta.json").write_text(json.dumps({"splits": splits}))
    return tmp_path / "run"


def shard_bounds(data_dir, split="train"):
    counts = [len(a) for a in open_shards(data_dir, split)]
    edges = np.cumsum([0] + counts)
    return list(zip(edges[:-1], edges[1:]))


def epoch_starts(loader, n_windows):
    """Start positions of the next n_windows windows, drawn one batch row at a time."""
    starts = []
    while len(starts) < n_windows:
        x, _ = loader.next_batch()
        starts += x[:, 0].tolist()
    return starts[:n_windows]


def test_batches_are_shifted_contiguous_windows_inside_one_shard(positional):
    loader = TokenLoader(positional, "train", batch_size=4, seq_len=T, seed=3)
    bounds = shard_bounds(positional / "data")
    for _ in range(50):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            start = row_x[0]
            np.testing.assert_array_equal(row_x, np.arange(start, start + T))
            np.testing.assert_array_equal(row_y, np.arange(start + 1, start + T + 1))
            assert any(lo <= start and start + SPAN <= hi for lo, hi in bounds)


def test_windows_are_real_slices_of_prepared_shards(tmp_path):
    rng = random.Random(0)
    (tmp_path / "c").mkdir()
    for i in range(4):
        (tmp_path / "c" / f"{i}.txt").write_text(" ".join(rng.choice(["to", "be", "or", "not"]) for _ in range(800)))
    prepare(PrepareConfig(out=str(tmp_path / "run"), paths=(str(tmp_path / "c"),), vocab_size=300))
    loader = TokenLoader(tmp_path / "run", "train", batch_size=3, seq_len=16, seed=1)
    stream = open_shards(tmp_path / "run" / "data", "train")
    shard, start = loader.epoch_windows(0)
    x, y = loader.next_batch()
    for row in range(3):
        window = np.asarray(stream[shard[row]][start[row] : start[row] + 17], dtype=np.int64)
        np.testing.assert_array_equal(x[row].numpy(), window[:-1])
        np.testing.assert_array_equal(y[row].numpy(), window[1:])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_get_disjoint_windows_that_cover_the_epoch(positional, world_size):
    single = TokenLoader(positional, "train", batch_size=1, seq_len=T, seed=5)
    grid = set(epoch_starts(single, single.windows_per_rank))
    per_rank = []
    for rank in range(world_size):
        loader = TokenLoader(positional, "train", batch_size=2, seq_len=T, seed=5, rank=rank, world_size=world_size)
        assert loader.windows_per_rank == single.windows_per_epoch // world_size
        per_rank.append(epoch_starts(loader, loader.windows_per_rank))
    starts = sorted(s for r in per_rank for s in r)
    assert all(b - a >= SPAN for a, b in zip(starts, starts[1:]))  # no two windows of the epoch overlap
    assert set(starts) <= grid and len(grid) - len(starts) < world_size  # together they cover the epoch
    # one rank's epoch tiles each shard: every token but fewer than 2 windows' worth per shard is seen
    if world_size == 1:
        for lo, hi in shard_bounds(positional / "data"):
            inside = sorted(s for s in starts if lo <= s < hi)
            assert all(b - a == SPAN for a, b in zip(inside, inside[1:]))
            head, tail = inside[0] - lo, hi - (inside[-1] + SPAN)
            assert head < SPAN and head + tail <= 2 * SPAN - 2


def test_epochs_roll_over_with_new_offsets_and_order(positional):
    loader = TokenLoader(positional, "train", batch_size=5, seq_len=T, seed=0)
    n = loader.windows_per_rank
    epochs = [epoch_starts(loader, n) for _ in range(3)]  # n is not a multiple of 5: batches straddle epochs
    assert n % 5 != 0
    assert all(len(set(e)) == n for e in epochs)  # no window twice within an epoch
    assert set(epochs[0]) != set(epochs[1]) != set(epochs[2])  # the window grid moved (new offsets)
    assert sorted(epochs[0]) != epochs[0]  # and the order is shuffled
    assert loader.epoch >= 2


def test_resume_gives_exactly_the_next_batches(positional):
    a = TokenLoader(positional, "train", batch_size=6, seq_len=T, seed=9, rank=1, world_size=2)
    for _ in range(23):
        a.next_batch()
    assert a.epoch == 1  # 23 * 6 windows: past the first epoch's 81 windows per rank
    state = a.state_dict()
    assert all(isinstance(v, int) for v in state.values()) and json.loads(json.dumps(state)) == state
    want = [a.next_batch() for _ in range(5)]
    b = TokenLoader(positional, "train", batch_size=6, seq_len=T, seed=9, rank=1, world_size=2)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(want, (b.next_batch() for _ in range(5))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(DataError, match="seq-len"):
        TokenLoader(positional, "train", batch_size=6, seq_len=T + 1, seed=9).load_state_dict(state)


def test_too_little_data_names_the_knob(positional):
    with pytest.raises(DataError, match="--seq-len"):
        TokenLoader(positional, "val", batch_size=2, seq_len=100)
    with pytest.raises(DataError, match="fewer GPUs"):
        TokenLoader(positional, "val", batch_size=2, seq_len=40, world_size=3)
    with pytest.raises(DataError, match="muse prepare"):
        TokenLoader(positional / "nowhere", "train", batch_size=2, seq_len=4)


def test_eval_batches_are_fixed_disjoint_and_leave_training_alone(positional):
    loader = TokenLoader(positional, "val", batch_size=4, seq_len=T, seed=0)
    loader.next_batch()
    state = loader.state_dict()
    first = [x[:, 0].tolist() for x, _ in loader.eval_batches()]
    assert first == [x[:, 0].tolist() for x, _ in loader.eval_batches()]
    assert sum(first, []) == list(range(0, 100 - SPAN + 1, SPAN))  # 12 windows from offset 0
    assert [len(b) for b in first] == [4, 4, 4]
    assert len(list(loader.eval_batches(max_batches=2))) == 2
    assert loader.state_dict() == state
    ranks = [TokenLoader(positional, "val", batch_size=4, seq_len=T, rank=r, world_size=5) for r in range(5)]
    got = [[x[:, 0].tolist() for x, _ in r.eval_batches()] for r in ranks]
    assert len({len(g) for g in got}) == 1 and len({tuple(map(len, g)) for g in got}) == 1  # same shapes
    flat = sorted(s for g in got for b in g for s in b)
    assert len(flat) == len(set(flat)) == 10  # 12 windows, 2 left over so that every rank gets 2


def test_bytes_per_token_and_run_dir_resolution(positional):
    assert resolve_data_dir(positional) == positional / "data"
    assert resolve_data_dir(positional / "data") == positional / "data"
    assert bytes_per_token(positional, "val") == 3.25
    assert bytes_per_token(positional / "data", "train") == 3.5
    with pytest.raises(DataError, match="no bytes_per_token"):
        bytes_per_token(positional, "test")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu_batches(positional):
    cpu = TokenLoader(positional, "train", batch_size=4, seq_len=T, seed=2)
    gpu = TokenLoader(positional, "train", batch_size=4, seq_len=T, seed=2, device="cuda")
    for _ in range(3):
        (xc, yc), (xg, yg) = cpu.next_batch(), gpu.next_batch()
        assert xg.is_cuda and torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())
