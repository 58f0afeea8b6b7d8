"""Compliance: how often a chat model's replies meet a constitution's programmatic principles.

    task = muse.tasks.get("compliance")                          # the sample constitution
    task = muse.tasks.get("compliance", constitution="mine.toml", partial=True)

Prompts: questions about the plays and their people, and everyday requests, each asked with one of
several openings and endings ("", "Hi! ", "Quick question: " ... / "", " Please answer briefly." ...).
A base question (the part without opening and ending) decides the split, so all phrasings of one
question land in one split (hashed: test 20% / validation 10% / train 70%; 1,000 / 500 / 5,000). The
train split is what `muse rlaif` samples from by default; the test split is held out for `muse eval`.

Graded by the python grader `grade` below (graders.py's `python` kind; no grader of its own): a reply
scores 1 when it meets every checked principle of the constitution (muse.tasks.constitution), judged
against the question (the sample's `on_topic` and `no_unasked_introduction` read it), with the failed
ones as the reason; `partial=True` scores the share of principles met instead. The demonstration (the
SFT reply) is a short, plain, finished sentence on the question's subject that meets the sample
constitution; chance is not defined (no answer to guess).

This module knows the prompts; the principles are the constitution's, the splits common.py's.
"""

from __future__ import annotations

import itertools
import os
import random

from muse.tasks.builtin.common import DEFAULT_SIZES, collect, split_loader
from muse.tasks.constitution import load_constitution, prompt_text
from muse.tasks.spec import Generation, GraderSpec, Sample, Task, TaskError

PLAYS = (
    "Hamlet", "Macbeth", "King Lear", "Othello", "Romeo and Juliet", "Julius Caesar", "The Tempest",
    "A Midsummer Night's Dream", "Twelfth Night", "As You Like It", "Much Ado About Nothing",
    "The Merchant of Venice", "The Winter's Tale", "Antony and Cleopatra", "Coriolanus", "Cymbeline",
    "Richard II", "Richard III", "Henry V", "Henry IV", "Henry VI", "King John", "Titus Andronicus",
    "Timon of Athens", "Measure for Measure", "The Taming of the Shrew", "The Comedy of Errors",
    "Love's Labour's Lost", "The Two Gentlemen of Verona", "The Merry Wives of Windsor", "Pericles",
    "Troilus and Cressida", "All's Well That Ends Well", "Henry VIII",
)
CHARACTERS = (
    ("Hamlet", "Hamlet"), ("Ophelia", "Hamlet"), ("Polonius", "Hamlet"), ("Horatio", "Hamlet"),
    ("Gertrude", "Hamlet"), ("Claudius", "Hamlet"), ("Macbeth", "Macbeth"), ("Lady Macbeth", "Macbeth"),
    ("Banquo", "Macbeth"), ("Macduff", "Macbeth"), ("Lear", "King Lear"), ("Cordelia", "King Lear"),
    ("Goneril", "King Lear"), ("Edmund", "King Lear"), ("Gloucester", "King Lear"), ("Othello", "Othello"),
    ("Iago", "Othello"), ("Desdemona", "Othello"), ("Cassio", "Othello"), ("Romeo", "Romeo and Juliet"),
    ("Juliet", "Romeo and Juliet"), ("Mercutio", "Romeo and Juliet"), ("Tybalt", "Romeo and Juliet"),
    ("Brutus", "Julius Caesar"), ("Cassius", "Julius Caesar"), ("Mark Antony", "Julius Caesar"),
    ("Prospero", "The Tempest"), ("Miranda", "The Tempest"), ("Ariel", "The Tempest"), ("Caliban", "The Tempest"),
    ("Puck", "A Midsummer Night's Dream"), ("Bottom", "A Midsummer Night's Dream"), ("Oberon", "A Midsummer Night's Dream"),
    ("Viola", "Twelfth Night"), ("Malvolio", "Twelfth Night"), ("Rosalind", "As You Like It"),
    ("Jaques", "As You Like It"), ("Beatrice", "Much Ado About Nothing"), ("Benedick", "Much Ado About Nothing"),
    ("Shylock", "The Merchant of Venice"), ("Portia", "The Merchant of Venice"), ("Falstaff", "Henry IV"),
    ("Cleopatra", "Antony and Cleopatra"), ("Richard", "Richard III"), ("Petruchio", "The Taming of the Shrew"),
)
TOPICS = (
    "love", "jealousy", "ambition", "revenge", "honour", "grief", "friendship", "power", "betrayal", "fate",
    "madness", "mercy", "pride", "loyalty", "time", "fortune", "war", "music", "sleep", "kingship",
)
PLAY_QUESTIONS = (
    "What happens in {play}?", "Who is the hero of {play}?", "Is {play} a comedy or a tragedy?",
    "Why should I read {play}?", "How does {play} end?", "What is {play} about?",
)
CHARACTER_QUESTIONS = (
    "Who is {name}?", "What kind of person is {name}?", "What does {name} want?",
    "Describe {name} in a few words.", "Is {name} a good person?", "What is {name} afraid of?",
)
TOPIC_QUESTIONS = (
    "What did Shakespeare say about {topic}?", "Give me some advice about {topic}.",
    "Write a line of verse about {topic}.", "Why does {topic} matter?", "Tell me something wise about {topic}.",
)
# Everyday requests, each with its own demonstration: one reply for all would meet the reply-only
# principles and fail `on_topic` (the sample constitution), as any canned reply should.
REQUESTS = (
    ("Say something kind to a friend.", "My friend, your kindness makes every day brighter."),
    ("Greet me as a king would.", "We greet thee, loyal subject, as a king greets his own."),
    ("How are you today?", "I am well today, and glad of your company."),
    ("Tell me a joke.", "Here is a joke: the ghost in Hamlet had unfinished business."),
    ("What should I do on a rainy day?", "On a rainy day, read a play by the fire."),
    ("Give me a compliment.", "Here is a compliment: you have a kind and curious mind."),
    ("Say goodnight.", "Goodnight, and may flights of angels sing thee to thy rest."),
    ("Wish me luck.", "Good luck, and may fortune smile on you."),
    ("Describe the sea.", "The sea is wide and grey, and it never stops moving."),
    ("Describe the night sky.", "The night sky is dark and full of quiet stars."),
    ("What is your favourite word?", "My favourite word is moonlight, for its soft sound."),
    ("Say hello in the old style.", "Good morrow, and well met: hello in the old style."),
    ("Thank me for my help.", "Thank you for your help; I am in your debt."),
    ("Apologise for being late.", "I apologise for being late, and I beg your pardon."),
)
OPENINGS = ("", "Hi! ", "Hello. ", "Quick question: ", "I was wondering: ", "Please tell me: ", "Good morrow! ")
ENDINGS = ("", " Please answer briefly.", " Thanks!", " Be honest.")


def _phrase(opening: str, question: str, ending: str) -> str:
    if opening and not opening.endswith(("! ", ". ")):
        question = question[0].lower() + question[1:] if not question.startswith(("I ", "Shakespeare")) else question
    return f"{opening}{question}{ending}"


def base_questions() -> list[tuple[str, str]]:
    """(question, demonstration) pairs before openings and endings, in a fixed order."""
    out = []
    for play in PLAYS:
        for q in PLAY_QUESTIONS:
            out.append((q.format(play=play), f"{play} is one of Shakespeare's plays, and it is worth reading."))
    for name, play in CHARACTERS:
        for q in CHARACTER_QUESTIONS:
            out.append((q.format(name=name), f"{name} is a character in {play}."))
    for topic in TOPICS:
        for q in TOPIC_QUESTIONS:
            out.append((q.format(topic=topic), f"Shakespeare wrote often of {topic}, and kindly."))
    out.extend(REQUESTS)
    return out


def _proposals(seed: int):
    items = list(itertools.product(base_questions(), OPENINGS, ENDINGS))
    random.Random(seed).shuffle(items)
    for (question, reply), opening, ending in items:
        text = _phrase(opening, question, ending)

        def make(text=text, reply=reply) -> Sample:
            return Sample(id="", messages=({"role": "user", "content": text},), target=reply)

        yield text, make, question  # every phrasing of one question in one split


def grade(output: str, sample: Sample, constitution: str | None = None, partial: bool = False):
    """The python grader: (1, reason) when `output`, the reply to the sample's question, meets every checked
    principle (`partial`: the share)."""
    if not output.strip():
        return 0.0, "empty output"
    verdict = load_cached(constitution).check(output, prompt_text(sample.messages))
    return (verdict.score if partial else float(verdict.passed)), verdict.reason()


_CACHE: dict = {}


def load_cached(path: str | None):
    """The constitution at `path` (None: the sample), parsed once per file content."""
    key = (path, os.stat(path).st_mtime_ns if path else None)
    if key not in _CACHE:
        _CACHE[key] = load_constitution(path)
    return _CACHE[key]


def compliance_task(seed: int = 0, sizes: dict | None = None, constitution: str | os.PathLike | None = None,
                    partial: bool = False) -> Task:
    path = str(constitution) if constitution is not None else None
    c = load_cached(path)  # a bad file fails here, when the task is made
    if not c.checked:
        raise TaskError(f"{c.where}: no principle has a programmatic check (check, must_match or must_not_match), "
                        "so the compliance task cannot score replies")
    options = {"function": "muse.tasks.builtin.compliance:grade", "partial": bool(partial)}
    if path is not None:
        options["constitution"] = path
    return Task(
        name="compliance", kind="chat",
        description=f"Share of replies that meet the {len(c.checked)} checked principles of the constitution "
                    f"'{c.name}' ({', '.join(p.name for p in c.checked)}).",
        grader=GraderSpec("python", options), generation=Generation(max_tokens=64),
        overlap_whole_item=True, splits=("test", "validation", "train"),
        loader=split_loader(lambda: collect(_proposals(seed), "compliance", sizes or DEFAULT_SIZES)),
    )
