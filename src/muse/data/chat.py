"""Conversation data for SFT: chat JSONL -> rows with a loss mask -> padded micro-batches from a weighted mixture.

    convs = read_chat_jsonl("chats.jsonl")                        # [(line, messages)], checked
    src = ConversationSource.build("chats", tok, convs, max_len=257, where="chats.jsonl")
    text = TextSource("text", "runs/x/data", "train", row_len=257)  # plain pretraining text, loss everywhere
    stream = MixtureStream([src, text], [0.9, 0.1], batch_tokens=4096, seed=0)
    mb = stream.take(rank, world)                                 # this rank's next micro-batch
    x, y, units, tokens = collate(mb.rows, device)                # y = -1 off the loss mask and on padding

The file format is one JSON object per line, `{"messages": [{"role": ..., "content": ...}, ...]}`, roles
system / user / assistant, any number of turns (docs/posttrain.md). A row is what `render_chat` makes of
one conversation: ids and a mask that is 1 on assistant content and its <|end|>. Bad input is a
DataError naming the file and line: not JSON, not an object with a `messages` list, an unknown role,
content that is not a string, no assistant turn, an empty file.

Too long. A conversation longer than `max_len` tokens (the model's context + 1) is cut to its first
`max_len` tokens: the loss then covers the assistant tokens that fit. If none fits (the first assistant
turn starts past the cut) the conversation is dropped. Either way one warning per file says how many.

Padded, not packed. Packing several conversations into one row would let them attend to each other,
since the model has no document mask; so each row holds one conversation, padded to the longest row of its
micro-batch. Padding is kept small by bucketing: a block of rows is drawn from the mixture, sorted by
length and cut into micro-batches of at most `batch_tokens` padded tokens (many short rows, or few long
ones), whose order is then shuffled. On the default mixture this pads ~6% of the tokens (BENCHMARKS.md).

The mixture. Each row is drawn from source s with probability weight_s / sum(weights); within a source,
rows come in a fresh permutation per pass (epoch). Micro-batches form one global stream; data-parallel
rank r of w takes micro-batches r, r + w, ... so ranks never share a row, and one process accumulating w
micro-batches sees exactly the rows w ranks see. The stream's state is a few ints (its block, where
each source stands at that block's start, and the position in the block): resuming replays nothing.

What it does not know: tasks, identities or mixture files (muse.posttrain.mixture builds the sources),
models, the training loop. It imports only common and tokenizer (and numpy, torch for `collate`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from muse.common.errors import DataError, TokenizerError
from muse.common.logging import get_logger
from muse.tokenizer import PAD_ID, ROLES, Tokenizer, render_chat

log = get_logger("muse.data")

FORMAT_HINT = 'each line must be one JSON object: {"messages": [{"role": "user", "content": "..."}, ...]}'


# --- reading and checking ----------------------------------------------------------------------------


def check_conversation(obj, where: str) -> list[dict]:
    """The messages of one parsed JSONL row, or a DataError that names `where` (file:line) and the fault."""
    if not isinstance(obj, Mapping) or "messages" not in obj:
        raise DataError(f"{where}: expected an object with a 'messages' list; {FORMAT_HINT}")
    messages = check_messages(obj["messages"], where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn from; "
                        "add the reply the model should give, or drop the line")
    return messages


def check_messages(messages, where: str, hint: str = FORMAT_HINT) -> list[dict]:
    """A non-empty list of {"role", "content"} messages with known roles and text contents, copied to
    exactly those two keys; a DataError that names `where` and the faulty message otherwise."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list; {hint}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}: message {i} is a {type(m).__name__}, not an object with role and content")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} has role {m.get('role')!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} ({m['role']}) has content of type "
                            f"{type(m.get('content')).__name__}; content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl_objects(path: str | os.PathLike, what: str, hint: str) -> list[tuple[int, object]]:
    """(line number, parsed JSON) of every non-blank line of a JSONL file of `what` ("a chat JSONL file");
    a DataError naming the file and line (and ending in `hint`) for anything that is not UTF-8 JSON."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; pass {what} ({hint})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{n}: not UTF-8 text; is this {what}? {hint}") from None
        if not text.strip():
            continue
        try:
            out.append((n, json.loads(text)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); {hint}") from None
    return out


def read_chat_jsonl(path: str | os.PathLike) -> list[tuple[int, list[dict]]]:
    """(line number, messages) of every conversation in a chat JSONL file; blank lines are skipped."""
    out = [(n, check_conversation(obj, f"{path}:{n}"))
           for n, obj in read_jsonl_objects(path, "a chat JSONL file", FORMAT_HINT)]
    if not out:
        raise DataError(f"{path} holds no conversations (it is empty); {FORMAT_HINT}")
    return out


def render_row(tok: Tokenizer, messages: Sequence[Mapping], max_len: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """(ids, mask, truncated) of a conversation cut to `max_len` tokens; None when no trained token survives
    the cut. mask[i] says whether ids[i] is a target (the next-token loss at i - 1 counts)."""
    ids, mask = render_chat(tok, messages)
    truncated = len(ids) > max_len
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask[1:]):
        return None
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8), truncated


# --- sources -----------------------------------------------------------------------------------------


class ConversationSource:
    """Rendered conversations held in memory: `len`, `lengths[i]` (tokens) and `row(i)` -> (ids, mask)."""

    def __init__(self, name: str, rows: list[tuple[np.ndarray, np.ndarray]]):
        if not rows:
            raise DataError(f"source '{name}' has no conversations left to train on")
        self.name = name
        self.rows = rows
        self.lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)

    @classmethod
    def build(cls, name: str, tok: Tokenizer, conversations: Sequence[tuple[int, list[dict]]], max_len: int,
              where: str) -> ConversationSource:
        """Render (line, messages) pairs; too-long conversations are cut or dropped with one warning."""
        rows, cut, dropped = [], 0, 0
        for line, messages in conversations:
            try:
                got = render_row(tok, messages, max_len)
            except TokenizerError as e:
                raise DataError(f"{where}:{line}: {e}") from None
            if got is None:
                dropped += 1
                continue
            ids, mask, truncated = got
            cut += truncated
            rows.append((ids, mask))
        if cut or dropped:
            log.warning("%s: %d of %d conversations are longer than %d tokens: %d cut to fit, %d dropped (no "
                        "assistant token fits)", where, cut + dropped, len(conversations), max_len, cut, dropped)
        if not rows:
            raise DataError(f"{where}: every conversation is longer than the context ({max_len} tokens) before "
                            "its first assistant token; shorten them or train with a longer --seq-len")
        return cls(name, rows)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.rows[i]


class TextSource:
    """Disjoint windows of `row_len` tokens from one split of prepared token shards; every target counts.
    Keeps the model's plain-text skill while it learns to chat (a share of the mixture)."""

    def __init__(self, name: str, data_dir: str | os.PathLike, split: str, row_len: int):
        from muse.data.shards import open_shards

        self.name = name
        self.shards = [s for s in open_shards(data_dir, split) if len(s) >= row_len]
        self.row_len = row_len
        counts = np.array([len(s) // row_len for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:
            raise DataError(f"{data_dir}: the '{split}' split has no window of {row_len} tokens for the text share")
        self._first = np.concatenate([[0], np.cumsum(counts)])
        self.lengths = np.full(int(counts.sum()), row_len, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        shard = int(np.searchsorted(self._first, i, side="right") - 1)
        start = (i - int(self._first[shard])) * self.row_len
        ids = np.asarray(self.shards[shard][start:start + self.row_len], dtype=np.int32)
        return ids, np.ones(self.row_len, dtype=np.uint8)


# --- the mixture stream ------------------------------------------------------------------------------


@dataclass
class MicroBatchRows:
    """One micro-batch of the global stream: (source index, item index) per row, and its rows."""

    index: int  # position in the global stream
    items: list[tuple[int, int]]
    rows: list[tuple[np.ndarray, np.ndarray]]


def _seed_of(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


class MixtureStream:
    """The global, endless stream of micro-batches of a weighted mixture (module docstring)."""

    def __init__(self, sources: Sequence, weights: Sequence[float], *, batch_tokens: int, seed: int = 0,
                 block_batches: int = 16):
        if len(sources) != len(weights) or not sources:
            raise DataError("a mixture needs at least one source and one weight per source")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise DataError(f"mixture weights must be >= 0 with a positive sum, got {list(weights)}")
        longest = max(int(s.lengths.max()) for s in sources)
        if batch_tokens < longest - 1:
            raise DataError(f"batch_tokens {batch_tokens} cannot hold one row of {longest - 1} tokens; raise it")
        self.sources, self.probs = list(sources), w / w.sum()
        self.batch_tokens, self.seed = int(batch_tokens), int(seed)
        mean_len = float(sum(p * s.lengths.mean() for p, s in zip(self.probs, self.sources)))
        # Enough rows per block for `block_batches` micro-batches: sorting a block by length is what keeps
        # padding low, and a bigger block sorts better but makes its micro-batches less mixed in time.
        self.block_rows = max(32, int(block_batches * self.batch_tokens / max(mean_len, 1.0)))
        self.position = 0  # global index of the next micro-batch to hand out (rank 0's)
        self.block, self.block_start, self.cursors = 0, 0, [0] * len(self.sources)
        self._block_cache: tuple[int, list, list[int]] | None = None
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    # ----- which rows, deterministically
    def _item(self, s: int, k: int) -> int:
        """The k-th row source s hands out: passes over it follow each other, each freshly permuted."""
        n = len(self.sources[s])
        epoch = k // n
        key = (s, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.sources):
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, _seed_of(self.sources[s].name), epoch])
            self._perm_cache[key] = rng.permutation(n)
        return int(self._perm_cache[key][k % n])

    def _build_block(self, block: int, cursors: list[int]) -> tuple[list[list[tuple[int, int]]], list[int]]:
        """(micro-batches of (source, item), cursors after the block) for block `block`."""
        rng = np.random.default_rng([self.seed, 7919, block])
        picks = rng.choice(len(self.sources), size=self.block_rows, p=self.probs)
        cur = list(cursors)
        items = []
        for s in picks.tolist():
            i = self._item(s, cur[s])
            cur[s] += 1
            items.append((s, i, int(self.sources[s].lengths[i]) - 1))  # inputs of a row: its tokens - 1
        # Longest first, so each micro-batch's first row sets its padded width; ties keep the draw order.
        items.sort(key=lambda t: -t[2])
        batches, current, width = [], [], 0
        for s, i, n in items:
            if current and (len(current) + 1) * max(width, n) > self.batch_tokens:
                batches.append(current)
                current, width = [], 0
            current.append((s, i))
            width = max(width, n)
        if current:
            batches.append(current)
        order = rng.permutation(len(batches))
        return [batches[j] for j in order.tolist()], cur

    def _block_batches(self) -> list[list[tuple[int, int]]]:
        if self._block_cache is None or self._block_cache[0] != self.block:
            batches, after = self._build_block(self.block, self.cursors)
            self._block_cache = (self.block, batches, after)
        return self._block_cache[1]

    def _at(self, g: int) -> list[tuple[int, int]]:
        """Micro-batch `g` of the global stream (g >= the current block's start); moves the block forward."""
        while True:
            batches = self._block_batches()
            if g < self.block_start + len(batches):
                return batches[g - self.block_start]
            self.block_start += len(batches)
            self.cursors = list(self._block_cache[2])
            self.block += 1

    def take(self, rank: int = 0, world: int = 1) -> MicroBatchRows:
        """This rank's next micro-batch; every rank calls it once per micro-batch, in lockstep."""
        g = self.position + rank
        items = self._at(g)
        self.position += world
        return MicroBatchRows(g, list(items), [self.sources[s].row(i) for s, i in items])

    # ----- resume
    def state_dict(self) -> dict:
        return {"position": self.position, "block": self.block, "block_start": self.block_start,
                "cursors": list(self.cursors), "seed": self.seed, "batch_tokens": self.batch_tokens,
                "sources": [s.name for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        names = [s.name for s in self.sources]
        if state.get("sources") != names or state.get("batch_tokens") != self.batch_tokens:
            raise DataError(f"the checkpoint's data mixture ({state.get('sources')}, batch_tokens "
                            f"{state.get('batch_tokens')}) differs from this one ({names}, {self.batch_tokens}); "
                            "resume with the same --data/--mixture and batch settings")
        self.position, self.block, self.block_start = int(state["position"]), int(state["block"]), int(state["block_start"])
        self.cursors = [int(c) for c in state["cursors"]]
        self._block_cache = None


# --- tensors -----------------------------------------------------------------------------------------


def collate(rows: Sequence[tuple[np.ndarray, np.ndarray]], device=None):
    """(x, y, loss_units, tokens) of rows padded to the longest: x (n, T) int64 with PAD_ID after each row,
    y the next tokens with -1 off the mask and on padding, loss_units the targets that count and tokens the
    non-padding input tokens (both counted here, on the CPU)."""
    import torch

    width = max(len(ids) for ids, _ in rows) - 1
    x = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    y = np.full((len(rows), width), -1, dtype=np.int64)
    tokens = 0
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = np.where(mask[1:] == 1, ids[1:], -1)
        tokens += n
    units = int((y != -1).sum())
    if device is None:
        return torch.from_numpy(x), torch.from_numpy(y), units, tokens
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), units, tokens


def split_holdout(conversations: Sequence, fraction: float, cap: int, key: str) -> tuple[list, list]:
    """(train, val) of a user file: a conversation goes to val by a hash of its text, so the split does not
    move when lines are added elsewhere; at most `cap` val rows, none when the file is tiny."""
    if fraction <= 0 or len(conversations) < 20:
        return list(conversations), []
    train, val = [], []
    for line, messages in conversations:
        digest = hashlib.sha256((key + json.dumps(messages, sort_keys=True)).encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        (val if u < fraction and len(val) < cap else train).append((line, messages))
    return train, val
