"""Token shards: flat little-endian token files with a JSON sidecar, written streaming, read as memmaps.

Layout of one split in a data directory:

    train_000.bin   count tokens, raw little-endian uint16 (vocab_size <= 65536) or uint32, no header
    train_000.json  {"split", "index", "dtype", "count", "vocab_size", "sha256"}
    train_001.bin   ... (a new shard starts every `max_tokens` tokens; 100M by default = 200 MB as uint16)

A raw file with a sidecar (rather than a header) keeps `.bin` files readable by `np.memmap` or `np.fromfile`
with no offset arithmetic and the metadata greppable. The token stream is split into shards at arbitrary
positions (a document may continue in the next shard); readers that want windows treat each shard as its
own stream. This module knows nothing about tokenizers or documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from muse.common.errors import DataError
from muse.common.paths import atomic_write_json

DEFAULT_SHARD_TOKENS = 100_000_000
SPLITS = ("train", "val")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id below `vocab_size` (little-endian on disk)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return {2: "uint16", 4: "uint32"}[np.dtype(dtype).itemsize]


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:03d}"


@dataclass
class ShardInfo:
    split: str
    index: int
    dtype: str
    count: int
    vocab_size: int
    sha256: str

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


class ShardWriter:
    """Appends token arrays to `<split>_NNN.bin` files in `directory`, starting a new shard every `max_tokens`.

    Use as a context manager or call `close()`, which writes the sidecars and returns the ShardInfos.
    The directory is expected to be a temporary one (`atomic_dir`), so files are written in place.
    A split with no tokens still gets one empty shard, so readers can tell "empty" from "missing".
    """

    def __init__(self, directory: str | os.PathLike, split: str, vocab_size: int, max_tokens: int = DEFAULT_SHARD_TOKENS):
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        self.directory = Path(directory)
        self.split = split
        self.vocab_size = int(vocab_size)
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.max_tokens = int(max_tokens)
        self.shards: list[ShardInfo] = []
        self._file = None
        self._hash = None
        self._count = 0

    def _open_next(self) -> None:
        self._close_current()
        path = self.directory / f"{shard_name(self.split, len(self.shards))}.bin"
        self._file = open(path, "wb")
        self._hash = hashlib.sha256()
        self._count = 0

    def _close_current(self) -> None:
        if self._file is None:
            return
        self._file.close()
        info = ShardInfo(self.split, len(self.shards), dtype_name(self.dtype), self._count, self.vocab_size, self._hash.hexdigest())
        self.shards.append(info)
        atomic_write_json(self.directory / f"{info.name}.json", info.__dict__)
        self._file = None

    def write(self, tokens) -> None:
        """Append a 1-D array of token ids (any integer dtype; checked against vocab_size)."""
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): {tokens.min()}..{tokens.max()}")
        data = tokens.astype(self.dtype, copy=False)
        while data.size:
            if self._file is None or self._count == self.max_tokens:
                self._open_next()
            take = data[: self.max_tokens - self._count]
            raw = take.tobytes()
            self._file.write(raw)
            self._hash.update(raw)
            self._count += take.size
            data = data[take.size :]

    def close(self) -> list[ShardInfo]:
        if self._file is None and not self.shards:
            self._open_next()  # an empty split still gets one (empty) shard
        self._close_current()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self._file is not None:
            self._file.close()


def shard_infos(data_dir: str | os.PathLike, split: str) -> list[ShardInfo]:
    """The sidecars of one split, in order; DataError when there are none or a .bin does not match its sidecar."""
    data_dir = Path(data_dir)
    infos = []
    for index in range(1_000_000):
        side = data_dir / f"{shard_name(split, index)}.json"
        if not side.exists():
            break
        try:
            infos.append(ShardInfo(**json.loads(side.read_text(encoding="utf-8"))))
        except (ValueError, TypeError) as e:
            raise DataError(f"{side} is not a valid shard sidecar ({e}); rerun `muse prepare --force`") from None
    if not infos:
        raise DataError(f"no '{split}' shards in {data_dir}; run `muse prepare` to create them")
    for info in infos:
        path = data_dir / f"{info.name}.bin"
        want = info.count * np.dtype(info.dtype).itemsize
        size = path.stat().st_size if path.exists() else None
        if size != want:
            have = "missing" if size is None else f"{size} bytes"
            raise DataError(f"{path} is {have}, expected {want} bytes; the data is damaged: rerun `muse prepare --force`")
    return infos


def open_shards(data_dir: str | os.PathLike, split: str) -> list[np.ndarray]:
    """Read-only memmaps (1-D, the stored dtype) of one split's shards. Empty shards come back as empty arrays."""
    data_dir = Path(data_dir)
    arrays = []
    for info in shard_infos(data_dir, split):
        dtype = np.dtype(info.dtype).newbyteorder("<")
        if info.count == 0:
            arrays.append(np.zeros(0, dtype=dtype))  # np.memmap refuses empty files
        else:
            arrays.append(np.memmap(data_dir / f"{info.name}.bin", dtype=dtype, mode="r", shape=(info.count,)))
    return arrays


def verify_shards(data_dir: str | os.PathLike, split: str) -> None:
    """Recompute every shard's sha256 against its sidecar (slow: reads everything). DataError on mismatch."""
    data_dir = Path(data_dir)
    for info in shard_infos(data_dir, split):
        h = hashlib.sha256()
        with open(data_dir / f"{info.name}.bin", "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        if h.hexdigest() != info.sha256:
            raise DataError(f"{data_dir / info.name}.bin does not match its checksum; rerun `muse prepare --force`")
