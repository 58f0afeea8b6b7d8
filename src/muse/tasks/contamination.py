"""Contamination check: does any item of a task's test split occur in training text? (n-gram overlap)

    reports = check_contamination(tasks, texts=sft_rows, data_dir="runs/demo")
    for r in reports: print(r.task, r.contaminated, "/", r.checked, r.examples[:1])

Words: NFKC, case folded, runs of letters/digits (`\\w+`); punctuation and spacing never matter.
An item is its `metadata["overlap_text"]` when a generator sets one (which_play: the quoted line alone);
for multiple choice its context followed by the gold choice (the natural text, as a line of verse); for
generate and chat its question: the contents of its messages (bare, where a prompt may wrap the question
in a template), else its prompt. Like lm-eval, the answer of an open question is not part of the item: a
question copied with another answer is still a copy. An item is CONTAMINATED when any of its word
13-grams occurs in the training text. n = 13 follows GPT-3 (Brown et al. 2020, appendix C) and lm-eval's decontamination:
long enough that a shared 13-gram is almost never chance English ("I know not what to say to" is 7),
short enough to catch an item copied with a changed sentence around it. An item shorter than 13 words is
checked whole (its full word sequence must occur), down to `min_words` = 8 words; shorter items say too
little to tell a copy from a coincidence ("What is 3 plus 4? 7") and are counted as `too_short`, not
checked. A task with `overlap_whole_item` (the templated built-ins: arithmetic, words, identity) is
always checked whole: its items share long stretches of template ("... in the morning and 8 pears in the
afternoon how many pears ..." is a 13-gram of two different problems), so only the whole question
copied means the item was seen.

Training text comes from (a) any iterable of rows, the post-training data: strings, `{"messages": [...]}`
(contents joined in order), or any dict (its string values joined), and (b) a run's token shards,
decoded with the run's tokenizer document by document (EOT separates documents; a window never spans
two). Grams are matched in one pass over the text for all tasks at once.

This module knows words, n-grams and how to read training text back. It judges nothing: a task whose
overlap is expected says so in `overlap_expected`, which the report carries.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from muse.tasks.spec import Sample, Task, TaskError

DEFAULT_N = 13
MIN_WORDS = 8
_WORD = re.compile(r"\w+")
_CHUNK_TOKENS = 1 << 20  # decode at most this many tokens at once


def words_of(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def item_text(sample: Sample) -> str:
    """The text of a test item that must not occur in training (module docstring)."""
    if isinstance(sample.metadata.get("overlap_text"), str):
        return sample.metadata["overlap_text"]
    if sample.choices is not None and sample.gold is not None:
        context = sample.prompt if sample.prompt is not None else sample.chat_messages()[-1]["content"]
        return f"{context} {sample.choices[sample.gold]}"
    if sample.messages is not None or sample.prompt is None:
        return " ".join(m["content"] for m in sample.chat_messages() if m["role"] != "system")
    return sample.prompt


def text_of(row) -> str:
    """A training row as plain text: str, {"messages": [...]}, or any dict of strings."""
    if isinstance(row, str):
        return row
    if isinstance(row, Mapping):
        messages = row.get("messages")
        if isinstance(messages, Sequence) and not isinstance(messages, str):
            return "\n".join(m.get("content", "") for m in messages if isinstance(m, Mapping)
                             and isinstance(m.get("content"), str))
        return "\n".join(v for v in row.values() if isinstance(v, str))
    raise TaskError(f"training rows must be strings or dicts, got {type(row).__name__}")


@dataclass
class ContaminationReport:
    task: str
    split: str
    n: int
    items: int  # in the split
    checked: int  # long enough to check
    too_short: int
    contaminated: int
    examples: list[dict] = field(default_factory=list)  # {"id", "ngram", "source"}, a few
    sources: list[str] = field(default_factory=list)
    overlap_expected: str = ""

    @property
    def rate(self) -> float:
        return self.contaminated / self.checked if self.checked else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "rate": round(self.rate, 6)}


class _Index:
    """Test items as word tuples: n-grams in `grams`; whole items under their first `prefix` words."""

    def __init__(self, n: int, prefix: int) -> None:
        self.n, self.prefix = n, prefix
        self.grams: dict[tuple[str, ...], list[tuple[int, str]]] = {}
        self.whole: dict[tuple[str, ...], list[tuple[tuple[int, str], tuple[str, ...]]]] = {}
        self.hits: dict[tuple[int, str], tuple[str, str]] = {}  # (task, id) -> (first match, source)

    def add(self, owner: tuple[int, str], words: list[str], whole: bool) -> None:
        if whole or len(words) < self.n:
            self.whole.setdefault(tuple(words[: self.prefix]), []).append((owner, tuple(words)))
            return
        for i in range(len(words) - self.n + 1):
            self.grams.setdefault(tuple(words[i : i + self.n]), []).append(owner)

    def scan(self, words: list[str], source: str) -> None:
        n, prefix = self.n, self.prefix
        if self.grams:
            for i in range(len(words) - n + 1):
                for owner in self.grams.get(tuple(words[i : i + n]), ()):
                    self.hits.setdefault(owner, (" ".join(words[i : i + n]), source))
        if self.whole:
            for i in range(len(words) - prefix + 1):
                for owner, item in self.whole.get(tuple(words[i : i + prefix]), ()):
                    if owner not in self.hits and tuple(words[i : i + len(item)]) == item:
                        self.hits[owner] = (" ".join(item), source)


def _cut_points(tok, ids) -> Iterator[int]:
    """Positions at most _CHUNK_TOKENS apart where a token starting with whitespace begins (so no word and
    no UTF-8 character is split between two decoded chunks), and len(ids) last."""
    start, n = 0, len(ids)
    while n - start > _CHUNK_TOKENS:
        cut = start + _CHUNK_TOKENS
        while cut > start + 1 and tok.token_bytes(int(ids[cut]))[:1] not in (b" ", b"\n"):
            cut -= 1
        cut = cut if cut > start + 1 else start + _CHUNK_TOKENS
        yield cut
        start = cut
    yield n


def shard_documents(data_dir: str | os.PathLike, split: str = "train", tokenizer=None) -> Iterator[list[str]]:
    """The words of each document in a run's token shards (a run directory or its data/ directory)."""
    import numpy as np

    from muse.data.shards import open_shards
    from muse.tokenizer import Tokenizer

    data_dir = Path(data_dir)
    if (data_dir / "data").is_dir():
        data_dir = data_dir / "data"
    tok = tokenizer or Tokenizer.from_file(data_dir)
    carry: list = []  # ids of a document that continues in the next shard
    for shard in open_shards(data_dir, split):
        ends = np.flatnonzero(np.asarray(shard) == tok.eot_id)
        start = 0
        for end in [*ends.tolist(), None]:
            piece = shard[start:end] if end is not None else shard[start:]
            ids = np.concatenate([np.asarray(carry, dtype=np.int64), np.asarray(piece, dtype=np.int64)]) if len(carry) else np.asarray(piece)
            if end is None:
                carry = ids
                break
            if len(ids):
                yield _decode_words(tok, ids)
            carry = []
            start = end + 1
    if len(carry):
        yield _decode_words(tok, carry)


def _decode_words(tok, ids) -> list[str]:
    words: list[str] = []
    start = 0
    for cut in _cut_points(tok, ids):
        words += words_of(tok.decode(ids[start:cut].tolist()))
        start = cut
    return words


def check_contamination(tasks: Sequence[Task], texts: Iterable | None = None,
                        data_dir: str | os.PathLike | None = None, split: str = "test",
                        shard_split: str = "train", n: int = DEFAULT_N, min_words: int = MIN_WORDS,
                        max_examples: int = 5, tokenizer=None) -> list[ContaminationReport]:
    """One report per task: how many of its `split` items occur in `texts` and/or the run's shards."""
    if texts is None and data_dir is None:
        raise TaskError("nothing to check against: give training texts, a run directory, or both")
    if not 1 <= min_words <= n:
        raise TaskError(f"min_words must be between 1 and n ({n}), got {min_words}")
    index = _Index(n, min_words)
    reports = []
    for t, task in enumerate(tasks):
        samples = task.samples(split) if task.kind != "bpb" else []
        checked = too_short = 0
        for sample in samples:
            words = words_of(item_text(sample))
            if len(words) < min_words:
                too_short += 1
                continue
            checked += 1
            index.add((t, sample.id), words, task.overlap_whole_item)
        reports.append(ContaminationReport(task.name, split, n, len(samples), checked, too_short, 0,
                                           overlap_expected=task.overlap_expected))
    sources = []
    if texts is not None:
        sources.append("texts")
        for i, row in enumerate(texts):
            index.scan(words_of(text_of(row)), f"texts[{i}]")
    if data_dir is not None:
        sources.append(f"{data_dir} ({shard_split} shards)")
        for d, words in enumerate(shard_documents(data_dir, shard_split, tokenizer)):
            index.scan(words, f"{shard_split} document {d}")
    for (t, sid), (gram, source) in sorted(index.hits.items(), key=lambda kv: kv[0]):
        report = reports[t]
        report.contaminated += 1
        if len(report.examples) < max_examples:
            report.examples.append({"id": sid, "ngram": gram, "source": source})
    for report in reports:
        report.sources = list(sources)
    return reports
