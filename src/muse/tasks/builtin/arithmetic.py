"""Arithmetic word problems with verifiable integer answers, at four levels.

    arithmetic_1digit    one operation on one-digit numbers: "Viola has 3 roses. She..."
    arithmetic_2digit    + and - on two-digit numbers, x of a two-digit by a one-digit number
    arithmetic_3digit    + and - on three-digit numbers, x of a three-digit by a one-digit number
    arithmetic_multistep a short story of two or three steps (gain, give away, buy groups of), 10..60 to start

Every answer is a non-negative integer (subtraction never goes below zero). A sample:
    prompt   "Question: Viola has 7 roses and finds 5 more. How many roses does Viola have now?\\nAnswer:"
    messages [{"role": "user", "content": "Viola has 7 roses and finds 5 more. How many ..."}]
    answer   "12"
    target   "7 + 5 = 12. The answer is 12."   (the worked solution: few-shot examples and SFT replies)
Graded `numeric` (the answer-marker / last-number rule of graders.py); completion prompts stop at a newline.
Split key: the question text. There are only 81 one-digit pairs, so the same sum recurs across splits
under different stories; the two- and three-digit levels and the stories almost never repeat a question.
Chance: the majority-answer baseline on the test split (always answering the most common number).

This module knows how to write the problems; splits are common.py's.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from muse.tasks.builtin.common import DEFAULT_SIZES, collect, majority_baseline, split_loader
from muse.tasks.spec import FewShot, Generation, GraderSpec, Sample, Task

NAMES = ("Viola", "Orlando", "Rosalind", "Portia", "Miranda", "Hamlet", "Juliet", "Romeo", "Beatrice",
         "Benedick", "Olivia", "Sebastian", "Celia", "Helena", "Hermia", "Lysander", "Perdita", "Puck",
         "Ariel", "Imogen", "Antonio", "Bianca", "Horatio", "Ophelia", "Cordelia", "Edgar")
OBJECTS = ("apples", "roses", "coins", "books", "letters", "candles", "cups", "feathers", "pebbles", "rings",
           "ducats", "pears", "ribbons", "buttons", "shells", "keys", "quills", "plums")
CONTAINERS = ("bags", "boxes", "baskets", "jars", "crates", "purses")

ADD = (
    "{n} has {a} {o} and finds {b} more. How many {o} does {n} have now?",
    "There are {a} {o} in a basket and {b} {o} on the table. How many {o} are there in all?",
    "{n} picked {a} {o} in the morning and {b} {o} in the afternoon. How many {o} did {n} pick?",
    "{n} has {a} {o}. {m} gives {n} {b} more. How many {o} does {n} have?",
    "What is {a} plus {b}?",
)
SUB = (
    "{n} had {a} {o} and gave {b} of them to {m}. How many {o} does {n} have left?",
    "A shop had {a} {o} and sold {b} of them. How many {o} are left in the shop?",
    "{n} has {a} {o}. {m} has {b} fewer {o} than {n}. How many {o} does {m} have?",
    "There were {a} {o} on a shelf. {n} took {b} away. How many {o} are on the shelf now?",
    "What is {a} minus {b}?",
)
MUL = (
    "{n} has {a} {c} with {b} {o} in each. How many {o} does {n} have?",
    "Each of {a} friends gives {n} {b} {o}. How many {o} does {n} get?",
    "{n} buys {b} {o} every day for {a} days. How many {o} does {n} buy?",
    "A row holds {b} {o}. How many {o} are there in {a} rows?",
    "What is {a} times {b}?",
)
LEVELS = {"1digit": (1, 9), "2digit": (10, 99), "3digit": (100, 999)}


def _one_step(rng: random.Random, level: str) -> tuple[str, int, str]:
    lo, hi = LEVELS[level]
    op = rng.choice("+-x")
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if op == "x":
        b = rng.randint(1, 9) if level != "1digit" else rng.randint(2, 9)
        template, answer, work = rng.choice(MUL), a * b, f"{a} x {b} = {a * b}"
    elif op == "-":
        a, b = max(a, b), min(a, b)
        template, answer, work = rng.choice(SUB), a - b, f"{a} - {b} = {a - b}"
    else:
        template, answer, work = rng.choice(ADD), a + b, f"{a} + {b} = {a + b}"
    n, m = rng.sample(NAMES, 2)
    question = template.format(n=n, m=m, a=a, b=b, o=rng.choice(OBJECTS), c=rng.choice(CONTAINERS))
    return question, answer, f"{work}. The answer is {answer}."


def _multistep(rng: random.Random) -> tuple[str, int, str]:
    n, m = rng.sample(NAMES, 2)
    o, c = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    total = rng.randint(10, 60)
    story = [f"{n} has {total} {o}."]
    work = []
    for step in rng.sample(("gain", "lose", "groups"), rng.choice((2, 3))):
        if step == "gain":
            b = rng.randint(2, 30)
            story.append(f"{n} finds {b} more.")
            work.append(f"{total} + {b} = {total + b}")
            total += b
        elif step == "lose":
            b = rng.randint(1, total - 1)
            story.append(f"{n} gives {b} to {m}.")
            work.append(f"{total} - {b} = {total - b}")
            total -= b
        else:
            k, per = rng.randint(2, 6), rng.randint(2, 12)
            story.append(f"Then {n} buys {k} {c} with {per} {o} in each.")
            work.append(f"{k} x {per} = {k * per}, and {total} + {k * per} = {total + k * per}")
            total += k * per
    story.append(f"How many {o} does {n} have now?")
    return " ".join(story), total, f"{'; '.join(work)}. The answer is {total}."


def _proposals(level: str, seed: int) -> Iterator[tuple[str, object]]:
    rng = random.Random(f"arithmetic:{level}:{seed}")
    while True:
        question, answer, solution = _multistep(rng) if level == "multistep" else _one_step(rng, level)

        def make(q=question, a=answer, s=solution) -> Sample:
            return Sample(id="", prompt=f"Question: {q}\nAnswer:", messages=({"role": "user", "content": q},),
                          answer=(str(a),), target=s, metadata={"level": level, "question": q})

        yield question, make


def arithmetic_task(level: str, seed: int = 0, sizes: dict | None = None) -> Task:
    """One arithmetic level as a Task (levels: 1digit, 2digit, 3digit, multistep)."""
    if level not in (*LEVELS, "multistep"):
        raise ValueError(f"unknown arithmetic level {level!r}")
    sizes = dict(sizes or DEFAULT_SIZES)
    what = "multi-step word problems" if level == "multistep" else f"one-step problems on {level[0]}-digit numbers"
    return Task(
        name=f"arithmetic_{level}", kind="generate",
        description=f"Arithmetic {what}; integer answers graded numerically.",
        grader=GraderSpec("numeric"),
        generation=Generation(max_tokens=64, stop=("\n",)),
        fewshot=FewShot(k=3),
        chance=majority_baseline, overlap_whole_item=True,
        splits=tuple(sizes),
        # One family for all levels: a question can never be in one level's train and another's test.
        loader=split_loader(lambda: collect(_proposals(level, seed), "arithmetic", sizes)),
    )
