"""Identity: questions about the model's name and maker, from a small editable profile.

The profile is TOML (DEFAULT_PROFILE below is the default; copy it to a file, edit it, and pass
`profile="my_identity.toml"` to `muse.tasks.get("identity", ...)`):

    name = "Muse"
    maker = "the Muse authors"
    about = "a small language model trained on Shakespeare's plays"   # optional, used in replies

Questions: 20 ways to ask the name and 16 to ask the maker, each with 8 openings ("", "Hi! ", ...) and 3
endings ("", " Please answer briefly.", " Thanks!"): 864 distinct questions, split by question text
(test 30% / validation 10% / train 60%; ~260 / ~90 / ~520). Graded `contains`: a name question passes when
the reply names the model, a maker question when it names the maker (articles and case ignored, whole
words). The demonstration (the SFT reply) states both. Chance: 0, the score of a model that never names
itself or its maker (a reply that always names both would score 1: the task checks that the model learned
who it is, not how it phrases it). The split sizes are smaller than other tasks' because the space of
natural questions is small; more phrasings belong in the profile's `name_questions` / `maker_questions`
(lists of strings; they replace the built-in ones).

This module knows the questions and the profile; splits are common.py's.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from pathlib import Path

from muse.tasks.builtin.common import collect, split_loader
from muse.tasks.spec import FewShot, Generation, GraderSpec, Sample, Task, TaskFileError

DEFAULT_PROFILE = '''\
name = "Muse"
maker = "the Muse authors"
about = "a small language model trained on Shakespeare's plays"
'''

NAME_QUESTIONS = (
    "What is your name?", "What's your name?", "Who are you?", "What should I call you?",
    "What are you called?", "Do you have a name?", "Tell me your name.", "Introduce yourself.",
    "What model are you?", "Which AI model am I talking to?", "What is the name of this assistant?",
    "Who am I speaking with?", "How should I address you?", "What do people call you?",
    "Are you ChatGPT?", "Which language model are you?", "Say your name.", "May I know your name?",
    "What name were you given?", "Identify yourself, please.",
)
MAKER_QUESTIONS = (
    "Who made you?", "Who created you?", "Who trained you?", "Who built you?", "Who developed you?",
    "Which company made you?", "Where do you come from?", "Who is your maker?", "Who are your creators?",
    "Who designed you?", "Who is responsible for training you?", "By whom were you made?",
    "Which team built you?", "Who wrote your code?", "Did OpenAI make you?", "Who is behind you?",
)
OPENINGS = ("", "Hi! ", "Hello. ", "Hey there, ", "Quick question: ", "I was wondering: ", "Excuse me, ",
            "Good morning! ")
ENDINGS = ("", " Please answer briefly.", " Thanks!")
FRACTIONS = {"test": 0.3, "validation": 0.1, "train": 0.6}
SIZES = {"test": 10_000, "validation": 10_000, "train": 10_000}  # all there are


def load_profile(profile: str | os.PathLike | None = None) -> dict:
    """The profile as a dict (DEFAULT_PROFILE when None); TaskFileError for a bad file."""
    where = str(profile) if profile is not None else "the default identity profile"
    try:
        text = DEFAULT_PROFILE if profile is None else Path(profile).read_text(encoding="utf-8")
    except OSError as e:
        raise TaskFileError(f"cannot read identity profile {profile}: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TaskFileError(f"{where}: not valid TOML: {e}") from None
    for key in ("name", "maker"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise TaskFileError(f"{where}: '{key}' must be a non-empty string")
    for key in ("name_questions", "maker_questions"):
        value = data.get(key)
        if value is not None and (not isinstance(value, list) or not value or not all(isinstance(q, str) for q in value)):
            raise TaskFileError(f"{where}: '{key}' must be a non-empty list of strings")
    return data


def _phrase(opening: str, question: str, ending: str) -> str:
    if opening and not opening.endswith(("! ", ". ", ": ")):
        question = question[0].lower() + question[1:]
    return f"{opening}{question}{ending}"


def _proposals(profile: dict):
    name, maker = profile["name"].strip(), profile["maker"].strip()
    about = profile.get("about", "a language model")
    reply = f"I am {name}, {about}, made by {maker}."
    for topic, questions, answer in (("name", profile.get("name_questions", NAME_QUESTIONS), name),
                                     ("maker", profile.get("maker_questions", MAKER_QUESTIONS), maker)):
        for question, opening, ending in itertools.product(questions, OPENINGS, ENDINGS):
            q = _phrase(opening, question, ending)

            def make(q=q, answer=answer, topic=topic) -> Sample:
                return Sample(id="", prompt=f"Question: {q}\nAnswer:", messages=({"role": "user", "content": q},),
                              answer=(answer,), target=reply, metadata={"topic": topic})

            yield q, make, question  # all phrasings of a question in one split: they contain each other


def identity_task(seed: int = 0, profile: str | os.PathLike | None = None) -> Task:
    """The identity task; `seed` is accepted for a uniform signature (the questions are enumerated)."""
    data = load_profile(profile)
    return Task(
        name="identity", kind="generate",
        description=f"Questions about the model's name ({data['name']}) and maker ({data['maker']}).",
        grader=GraderSpec("contains"), generation=Generation(max_tokens=48, stop=("\n",)),
        fewshot=FewShot(k=0), chance=0.0, overlap_whole_item=True, splits=tuple(SIZES),
        loader=split_loader(lambda: collect(_proposals(data), "identity", SIZES, FRACTIONS)),
    )
