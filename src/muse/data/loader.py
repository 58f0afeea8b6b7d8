"""TokenLoader: resumable, rank-disjoint batches of random contiguous windows from prepared token shards.

    loader = TokenLoader("runs/demo/data", "train", batch_size=32, seq_len=256, seed=0,
                         rank=dist.rank(), world_size=dist.world_size(), device="cuda")
    x, y = loader.next_batch()               # int64 (B, T) each; y is x shifted left by one token
    state = loader.state_dict()              # {"seed", "seq_len", "world_size", "epoch", "index"}: ints
    loader.load_state_dict(state)            # the next batch is exactly the one that would have come
    for x, y in loader.eval_batches():       # fixed-order windows for validation loss
        ...

How windows are chosen. Each shard is its own token stream; a window is `seq_len + 1` contiguous tokens
(x = w[:-1], y = w[1:]) and windows of one epoch never overlap. Epoch e draws, from a generator seeded
with (seed, e), a random offset in [0, seq_len] per shard (so the window grid, and with it which tokens
start a context, moves from epoch to epoch) and a permutation of all the epoch's windows; rank r takes
every world_size-th window of the permutation, each rank the same number, so the ranks' windows are
disjoint and ranks stay in lockstep (same number of batches). Epochs follow each other forever; a batch
may straddle two epochs. The number of windows per epoch does not depend on the offsets, so the
position in the stream is two ints (epoch, index) and resuming needs no replay.

What it does not know: models, tokenizers, the training loop. Reading bytes/token for bits-per-byte is
`bytes_per_token` below, from meta.json.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from muse.common.errors import DataError
from muse.common.paths import read_json
from muse.data.shards import open_shards

META_FILENAME = "meta.json"


def resolve_data_dir(path: str | os.PathLike) -> Path:
    """`path` if it holds meta.json, else `path/data` (a run directory); DataError if neither does."""
    path = Path(path)
    for candidate in (path, path / "data"):
        if (candidate / META_FILENAME).is_file():
            return candidate
    raise DataError(f"no prepared data in {path} (no meta.json); run `muse prepare --out {path}` first")


def read_meta(data_dir: str | os.PathLike) -> dict:
    data_dir = resolve_data_dir(data_dir)
    try:
        return read_json(data_dir / META_FILENAME)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {data_dir / META_FILENAME} ({e}); rerun `muse prepare --force`") from None


def bytes_per_token(data_dir: str | os.PathLike, split: str = "val") -> float:
    """UTF-8 bytes per token of `split` (EOT tokens counted as tokens): bits/byte = loss / ln 2 / this."""
    meta = read_meta(data_dir)
    try:
        return float(meta["splits"][split]["bytes_per_token"])
    except (KeyError, TypeError):
        raise DataError(f"{resolve_data_dir(data_dir)}/meta.json has no bytes_per_token for split '{split}'; rerun `muse prepare --force`") from None


def _windows_per_shard(count: int, span: int) -> int:
    """Windows of `span` tokens one shard yields per epoch, the same for every offset in [0, span - 1].

    With n = (count - span + 1) // span windows, any offset o <= span - 1 fits: o + n * span <= count.
    A shard too short for that but holding one window gives 1 (its offset then ranges over the slack).
    """
    if count >= 2 * span - 1:
        return (count - span + 1) // span
    return 1 if count >= span else 0


class TokenLoader:
    """Batches of (x, y) int64 tensors of shape (batch_size, seq_len) from one split of a data directory."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch size and sequence length must be at least 1 (got {batch_size}, {seq_len})")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.data_dir = resolve_data_dir(data_dir)
        self.split = split
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device)
        self.shards = open_shards(self.data_dir, split)
        self.span = self.seq_len + 1
        self.counts = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.n_windows = np.array([_windows_per_shard(int(c), self.span) for c in self.counts], dtype=np.int64)
        total = int(self.counts.sum())
        if self.n_windows.sum() == 0:
            raise DataError(
                f"the '{split}' split has {total:,} tokens, fewer than one window of --seq-len {self.seq_len} "
                f"+ 1 tokens; lower --seq-len or prepare more data"
            )
        self.windows_per_epoch = int(self.n_windows.sum())  # all ranks together
        self.windows_per_rank = self.windows_per_epoch // self.world_size
        if self.windows_per_rank == 0:
            raise DataError(
                f"the '{split}' split has {self.windows_per_epoch} windows of {self.span} tokens, fewer than "
                f"the {self.world_size} ranks; lower --seq-len, use fewer GPUs or prepare more data"
            )
        self._first = np.concatenate([[0], np.cumsum(self.n_windows)])  # global id of each shard's first window
        self.epoch = 0
        self.index = 0  # windows of this epoch this rank has consumed
        self._plan_epoch = -1
        self._plan: tuple[np.ndarray, np.ndarray] | None = None

    # --- which windows -----------------------------------------------------------------------------

    def epoch_windows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, start token) of this rank's windows in `epoch`, in the order they are served."""
        rng = np.random.default_rng([self.seed, epoch])
        slack = self.counts - self.n_windows * self.span  # >= span - 1 except for one-window shards
        offsets = rng.integers(0, np.minimum(slack, self.span - 1) + 1)
        order = rng.permutation(self.windows_per_epoch)
        mine = order[self.rank :: self.world_size][: self.windows_per_rank]
        shard = np.searchsorted(self._first, mine, side="right") - 1
        start = offsets[shard] + (mine - self._first[shard]) * self.span
        return shard, start

    def _windows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self.epoch_windows(epoch), epoch
        return self._plan

    # --- batches -----------------------------------------------------------------------------------

    def _to_device(self, buf: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(buf)
        if self.device.type == "cuda":
            # Pinned host memory makes the copy asynchronous: the next batch is gathered while it runs.
            w = w.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            w = w.to(self.device)
        # contiguous: losses flatten targets with .view(-1), which a strided slice refuses
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), each int64 of shape (batch_size, seq_len)."""
        buf = np.empty((self.batch_size, self.span), dtype=np.int64)
        for row in range(self.batch_size):
            if self.index == self.windows_per_rank:
                self.epoch, self.index = self.epoch + 1, 0
            shard, start = self._windows(self.epoch)
            s, t = int(shard[self.index]), int(start[self.index])
            buf[row] = self.shards[s][t : t + self.span]
            self.index += 1
        return self._to_device(buf)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # --- resuming ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "epoch": self.epoch,
            "index": self.index,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off. A different world size continues from the same point of the
        epoch (windows consumed by all ranks together); a different seed or seq_len is refused."""
        for key in ("seed", "seq_len"):
            if int(state[key]) != getattr(self, key):
                raise DataError(
                    f"the data loader state was saved with {key}={state[key]}, this loader has "
                    f"{key}={getattr(self, key)}; resume with the same --{key.replace('_', '-')}"
                )
        consumed = int(state["index"]) * int(state.get("world_size", self.world_size))
        self.epoch = int(state["epoch"])
        self.index = min(consumed // self.world_size, self.windows_per_rank)

    # --- validation --------------------------------------------------------------------------------

    def eval_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed-order, non-overlapping windows from offset 0 of each shard, in batches of batch_size.

        Every rank gets the same number of batches of the same shapes (sharded collectives stay in
        step); rank r takes windows r, r + world_size, ... The last batch may be smaller. Together the
        ranks cover all windows once. Does not touch the training position.
        """
        starts = [(s, k * self.span) for s, c in enumerate(self.counts) for k in range(int(c) // self.span)]
        mine = starts[self.rank :: self.world_size][: len(starts) // self.world_size]
        if max_batches is not None:
            mine = mine[: max_batches * self.batch_size]
        for i in range(0, len(mine), self.batch_size):
            chunk = mine[i : i + self.batch_size]
            buf = np.empty((len(chunk), self.span), dtype=np.int64)
            for row, (s, t) in enumerate(chunk):
                buf[row] = self.shards[s][t : t + self.span]
            yield self._to_device(buf)

    def __repr__(self) -> str:
        return (
            f"TokenLoader({str(self.data_dir)!r}, {self.split!r}, batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"rank={self.rank}/{self.world_size}, windows/epoch={self.windows_per_epoch})"
        )
