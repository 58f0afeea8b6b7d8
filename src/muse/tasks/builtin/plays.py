"""Multiple-choice tasks on the plays: finish a line (quote_completion), name its play (which_play).

Both read the embedded corpus (muse.data.sources) and split it into documents exactly as `muse prepare`
does (muse.data.prepare.split_documents with the run's `val_fraction` and `seed`; defaults 0.05 and 0,
prepare's defaults, which hold out Henry VI Part 2 and Cymbeline). A run prepared with other settings
passes them as `corpus_seed` / `val_fraction` (they are in its data/meta.json under `settings`).

A line is one line of dialogue inside a speech (a block opened by a `NAME:` line), 8 to 16 words, not a
stage direction. Its canonical key is its text, case folded with whitespace collapsed.

    quote_completion  context: the previous line of the speech (if any), a newline, and the first half of
                      the line; choices: the true second half and 3 second halves of other lines with
                      about as many words (+-1), from the same pool; chance 1/4.
                      TEST comes from the HELD-OUT plays (the run's val documents), minus any line that
                      also occurs in a training play, so a model cannot have memorised the answer; train
                      and validation come from the training plays (hashed 90/10 by key). Held-out plays
                      yield ~3,400 lines; test takes 1,000 of them.
    which_play        "Which play is this line from?" over the titles of the TRAINING plays (36 with the
                      defaults): the true title and 3 others; chance 1/4. A line occurring in two plays is
                      dropped. Splits hashed by key (test 20% / validation 10% / train 70%). This task asks
                      what the model remembers of its training text, so its test lines ARE in the training
                      shards by design; the contamination report says so (`overlap_expected`).

Completion prompts for base models (score `" " + choice` after the context), chat messages listing the
choices for chat models; the demonstration (SFT reply) is the choice's text. This module knows lines and
titles; splits are common.py's and prepare.py's.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

from muse.tasks.builtin.common import DEFAULT_SIZES, bucket_of, item_id
from muse.tasks.spec import FewShot, Sample, Task

_SPEAKER = re.compile(r"^[A-Z][A-Za-z0-9 ,.'&-]{0,40}:$")
_DIRECTION = ("Enter", "Exit", "Exeunt", "Re-enter", "Flourish", "Sennet", "Alarum", "Alarums")
_SMALL = {"of", "the", "and", "for", "that", "a", "in"}
MIN_WORDS, MAX_WORDS = 8, 16
LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class Line:
    play: str  # document name, e.g. tragedies/hamlet.md
    title: str
    text: str
    previous: str | None  # the line before it in the same speech

    @property
    def key(self) -> str:
        return " ".join(self.text.casefold().split())


def play_title(name: str, text: str) -> str:
    """The title on a play's first line, or one made from its file name when the file has none."""
    first = text.lstrip().split("\n", 1)[0].strip()
    if first and not first.upper().startswith(("ACT ", "PROLOGUE", "SCENE", "INDUCTION")):
        return first
    words = name.rsplit("/", 1)[-1].removesuffix(".md").split("-")
    return " ".join(w if i and w in _SMALL else w.capitalize() for i, w in enumerate(words))


def play_lines(name: str, text: str) -> list[Line]:
    """The eligible dialogue lines of one play (module docstring), in order."""
    title = play_title(name, text)
    out = []
    for block in text.split("\n\n"):
        rows = block.split("\n")
        if not _SPEAKER.match(rows[0]):
            continue
        previous = None
        for row in rows[1:]:
            row = row.strip()
            if not row or row.startswith(("[", "(")) or row.split()[0] in _DIRECTION:
                previous = None
                continue
            if MIN_WORDS <= len(row.split()) <= MAX_WORDS:
                out.append(Line(name, title, " ".join(row.split()), previous))
            previous = row
    return out


@lru_cache(maxsize=4)
def corpus_lines(corpus_seed: int = 0, val_fraction: float = 0.05) -> tuple[tuple[Line, ...], tuple[Line, ...]]:
    """(lines of the training plays, lines of the held-out plays) for a run prepared with these settings."""
    from muse.data.prepare import split_documents
    from muse.data.sources import shakespeare_documents

    train, val = split_documents(shakespeare_documents(), val_fraction, corpus_seed)
    return (tuple(x for d in train for x in play_lines(d.name, d.text)),
            tuple(x for d in val for x in play_lines(d.name, d.text)))


def _halves(line: Line) -> tuple[str, str]:
    words = line.text.split()
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])


def _options(choices: tuple[str, ...]) -> str:
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def _quote_items(lines: list[Line], seed: int, limit: int) -> list[Sample]:
    """Samples for the first lines of `lines` (up to `limit`); distractors are second halves of other
    lines in `lines` with about as many words."""
    by_len: dict[int, list[str]] = {}
    for line in lines:
        end = _halves(line)[1]
        by_len.setdefault(len(end.split()), []).append(end)
    samples = []
    for line in lines:
        if len(samples) >= limit:
            break
        head, end = _halves(line)
        rng = random.Random(f"quote:{seed}:{line.key}")
        n = len(end.split())
        near = [by_len.get(n + d, []) for d in (0, -1, 1)]
        total = sum(map(len, near))
        distractors: list[str] = []
        seen = {end.casefold()}
        for _ in range(30):  # draws from the three length buckets as one list, without building it
            if len(distractors) == 3 or total == 0:
                break
            i = rng.randrange(total)
            for bucket in near:
                if i < len(bucket):
                    e = bucket[i]
                    break
                i -= len(bucket)
            if e.casefold() not in seen:
                distractors.append(e)
                seen.add(e.casefold())
        if len(distractors) < 3:
            continue
        choices = [end, *distractors]
        rng.shuffle(choices)
        context = f"{line.previous}\n{head}" if line.previous else head
        question = f"Which ending completes this line from Shakespeare?\n\"{context} ...\"\n\n{_options(tuple(choices))}"
        samples.append(Sample(
            id=item_id("quote", line.key), prompt=context, messages=({"role": "user", "content": question},),
            choices=tuple(choices), gold=choices.index(end), metadata={"play": line.play, "key": line.key},
        ))
    return samples


def quote_completion_task(seed: int = 0, sizes: dict | None = None, corpus_seed: int = 0,
                          val_fraction: float = 0.05) -> Task:
    sizes = dict(sizes or DEFAULT_SIZES)

    @lru_cache(maxsize=1)
    def build() -> dict[str, list[Sample]]:
        train_lines, held_out = corpus_lines(corpus_seed, val_fraction)
        train_keys = {x.key for x in train_lines}
        test_lines = list({x.key: x for x in held_out if x.key not in train_keys}.values())
        random.Random(f"quote:test:{seed}").shuffle(test_lines)
        # Train/validation lines never include a held-out line, nor a line of which_play's test bucket
        # (as the line or as its context): SFT on these must not show another task's test items.
        test_keys = {x.key for x in held_out}

        def usable(x: Line) -> bool:
            keys = [x.key] + ([" ".join(x.previous.casefold().split())] if x.previous else [])
            return x.key not in test_keys and all(bucket_of(k, "which_play") != "test" for k in keys)

        rest = list({x.key: x for x in train_lines if usable(x)}.values())
        random.Random(f"quote:rest:{seed}").shuffle(rest)
        out = {"test": _quote_items(test_lines, seed, sizes.get("test", 0))}
        for split in ("train", "validation"):
            mine = [x for x in rest if bucket_of(x.key, "quote", {"validation": 0.1, "train": 0.9}) == split]
            out[split] = _quote_items(mine, seed, sizes.get(split, 0))
        return {s: out[s] for s in sizes}

    return Task(
        name="quote_completion", kind="multiple_choice",
        description="Choose the true end of a line of verse from a held-out play among 4.",
        fewshot=FewShot(k=0), chance=0.25, splits=tuple(sizes), loader=lambda split: build()[split],
    )


def which_play_task(seed: int = 0, sizes: dict | None = None, corpus_seed: int = 0,
                    val_fraction: float = 0.05) -> Task:
    sizes = dict(sizes or DEFAULT_SIZES)

    @lru_cache(maxsize=1)
    def build() -> dict[str, list[Sample]]:
        train_lines, _ = corpus_lines(corpus_seed, val_fraction)
        plays_of: dict[str, set[str]] = {}
        for x in train_lines:
            plays_of.setdefault(x.key, set()).add(x.play)
        titles = sorted({x.title for x in train_lines})
        lines = list({x.key: x for x in train_lines if len(plays_of[x.key]) == 1}.values())
        random.Random(f"which_play:{seed}").shuffle(lines)
        out: dict[str, list[Sample]] = {s: [] for s in sizes}
        for line in lines:
            split = bucket_of(line.key, "which_play")
            if split not in out or len(out[split]) >= sizes[split]:
                continue
            rng = random.Random(f"which_play:{seed}:{line.key}")
            choices = [line.title, *rng.sample([t for t in titles if t != line.title], 3)]
            rng.shuffle(choices)
            prompt = f"Which play by Shakespeare is this line from?\n\"{line.text}\"\nAnswer:"
            question = f"Which play by Shakespeare is this line from?\n\"{line.text}\"\n\n{_options(tuple(choices))}"
            out[split].append(Sample(
                id=item_id("which_play", line.key), prompt=prompt, messages=({"role": "user", "content": question},),
                choices=tuple(choices), gold=choices.index(line.title),
                metadata={"play": line.play, "key": line.key, "overlap_text": line.text},
            ))
        return out

    return Task(
        name="which_play", kind="multiple_choice",
        description="Name the play (among 4 titles) that a line from a training play comes from.",
        fewshot=FewShot(k=3), chance=0.25, splits=tuple(sizes), loader=lambda split: build()[split],
        overlap_expected="the lines are quoted from the training plays on purpose: the task asks what the "
                         "model remembers of its training text",
    )
