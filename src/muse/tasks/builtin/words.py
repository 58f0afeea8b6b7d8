"""Tasks about the letters of words: spelling, letter counting, and sorting words alphabetically.

The words are the lower-case words of the plays (the embedded corpus, muse.data.sources): 3 to 12 letters
a-z, no names (a capitalised word is never taken), ~19,000 of them.

    spelling      "Spell the word 'night' letter by letter." -> "n-i-g-h-t"
                  graded `exact` without dropping articles (a lone "a" is a letter here); punctuation is
                  read as spaces, so "n-i-g-h-t", "N I G H T" and "n, i, g, h, t" all match. Key: the word.
    letter_count  "How many times does the letter 'r' appear in 'strawberry'?" -> "3"
                  the answer is drawn uniformly from 0..3 first, then a word and letter with that count;
                  graded `numeric`. The demonstration spells the word out first. Key: (word, letter).
    word_sort     "Sort these words alphabetically: pear, apple, fig" -> "apple, fig, pear"
                  3 to 6 distinct words of 4-10 letters; graded `exact` (commas or spaces both fine).
                  Key: the set of words (the same words in another order are the same question).

Chance: spelling 0 (no two answers alike); letter_count the majority-answer baseline (~0.25);
word_sort the mean of 1/n! over the test split (a random order of the given words).
This module knows the questions; splits are common.py's, the words come from the corpus reader.
"""

from __future__ import annotations

import math
import random
import re
import string
from functools import lru_cache

from muse.tasks.builtin.common import DEFAULT_SIZES, collect, majority_baseline, split_loader
from muse.tasks.spec import FewShot, Generation, GraderSpec, Sample, Task

_WORD = re.compile(r"(?<![\w'’-])[a-z]+(?![\w'’-])")


@lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    """The distinct lower-case words of the plays, sorted (sorted, so a seeded choice is reproducible)."""
    from muse.data.sources import shakespeare_documents

    words: set[str] = set()
    for doc in shakespeare_documents():
        words.update(_WORD.findall(doc.text))
    return tuple(sorted(w for w in words if 3 <= len(w) <= 12))


def _sample(prompt: str, question: str, answer: str, target: str | None = None, **meta) -> Sample:
    return Sample(id="", prompt=f"Question: {prompt}\nAnswer:", messages=({"role": "user", "content": question},),
                  answer=(answer,), target=target, metadata=meta)


_SPELL = (
    "Spell the word '{w}' letter by letter.",
    "How do you spell '{w}'? Give its letters separated by hyphens.",
    "Write out the letters of '{w}', one at a time.",
)


def _spelling(seed: int):
    rng = random.Random(f"spelling:{seed}")
    words = corpus_words()
    while True:
        w = rng.choice(words)
        q = rng.choice(_SPELL).format(w=w)
        yield w, lambda w=w, q=q: _sample(q, q, "-".join(w), word=w)


_COUNT = (
    "How many times does the letter '{c}' appear in '{w}'?",
    "How many {c}'s are in the word '{w}'?",
    "Count the letter '{c}' in '{w}'.",
)


def _letter_count(seed: int):
    rng = random.Random(f"letter_count:{seed}")
    words = corpus_words()
    while True:
        # The count is drawn first, uniform over 0..3, so that no answer dominates (drawing a letter of
        # the word instead makes "1" the answer two times in three).
        want = rng.randint(0, 3)
        letters: list[str] = []
        while not letters:  # ~1 word in 12 has a letter three times
            w = rng.choice(words)
            letters = sorted({c for c in string.ascii_lowercase if w.count(c) == want})
        c = rng.choice(letters)
        q = rng.choice(_COUNT).format(c=c, w=w)
        times = "once" if want == 1 else f"{want} times"
        target = f"{'-'.join(w)}: the letter '{c}' appears {times}. The answer is {want}."
        yield f"{w}\0{c}", lambda q=q, n=want, t=target, w=w, c=c: _sample(q, q, str(n), t, word=w, letter=c)


_SORT = (
    "Sort these words alphabetically: {ws}",
    "Put these words in alphabetical order: {ws}",
)


def _word_sort(seed: int):
    rng = random.Random(f"word_sort:{seed}")
    words = [w for w in corpus_words() if 4 <= len(w) <= 10]
    while True:
        chosen = rng.sample(words, rng.randint(3, 6))
        q = rng.choice(_SORT).format(ws=", ".join(chosen))
        answer = ", ".join(sorted(chosen))
        n = len(chosen)
        yield " ".join(sorted(chosen)), lambda q=q, a=answer, n=n: _sample(q, q, a, n_words=n)


def _mean_inverse_factorial(samples: list[Sample]) -> float:
    return sum(1 / math.factorial(s.metadata["n_words"]) for s in samples) / len(samples) if samples else 0.0


def spelling_task(seed: int = 0, sizes: dict | None = None) -> Task:
    sizes = dict(sizes or DEFAULT_SIZES)
    return Task(
        name="spelling", kind="generate",
        description="Spell a word letter by letter, hyphens between the letters.",
        grader=GraderSpec("exact", {"ignore_articles": False}),
        generation=Generation(max_tokens=48, stop=("\n",)), fewshot=FewShot(k=3), overlap_whole_item=True, chance=0.0,
        splits=tuple(sizes), loader=split_loader(lambda: collect(_spelling(seed), "spelling", sizes)),
    )


def letter_count_task(seed: int = 0, sizes: dict | None = None) -> Task:
    sizes = dict(sizes or DEFAULT_SIZES)
    return Task(
        name="letter_count", kind="generate",
        description="Count how many times a letter occurs in a word.",
        grader=GraderSpec("numeric"), generation=Generation(max_tokens=64, stop=("\n",)),
        fewshot=FewShot(k=3), overlap_whole_item=True, chance=majority_baseline,
        splits=tuple(sizes), loader=split_loader(lambda: collect(_letter_count(seed), "letter_count", sizes)),
    )


def word_sort_task(seed: int = 0, sizes: dict | None = None) -> Task:
    sizes = dict(sizes or DEFAULT_SIZES)
    return Task(
        name="word_sort", kind="generate",
        description="Sort 3 to 6 words alphabetically; answer them comma-separated.",
        grader=GraderSpec("exact", {"ignore_articles": False}),
        generation=Generation(max_tokens=64, stop=("\n",)), fewshot=FewShot(k=3),
        chance=_mean_inverse_factorial,
        splits=tuple(sizes), loader=split_loader(lambda: collect(_word_sort(seed), "word_sort", sizes)),
    )
