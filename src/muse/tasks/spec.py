"""What a task and a sample are: plain dataclasses, the kinds, and the checks that turn a dict into them.

A task is one of four kinds (docs/eval.md has the full spec a user writes by hand):

    bpb              bits per byte of a text: the run's `val` split by default, or a file (`data`).
    multiple_choice  a context and 2+ choices; the model's log-likelihood of each choice after the
                     context picks one. Metrics `acc` and `acc_norm` (log-likelihood per byte of choice).
    generate         a prompt; the model writes until a stop string or `max_tokens`, a grader scores it.
    chat             the same over `messages` (multi-turn), rendered by the model's chat template or sent
                     as `messages` to a chat endpoint.

A sample keeps whatever its kind needs: `prompt` (called `context` in lm-eval style files, accepted as
an alias), `messages`, `choices` + `gold`, `answer` (one or several acceptable strings), `target` (what a
demonstration shows: a few-shot example's answer, the assistant turn of SFT data), `text` (bpb rows) and
free-form `metadata`. Samples of a task live in named splits (`train`, `validation`, `test`), generated
(built-in tasks) or read from files (files.py), loaded lazily and cached.

This module knows the shapes and their validation. It does not read files (files.py), grade (graders.py),
assemble prompts (prompts.py) or know any model, tokenizer or engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muse.common.errors import DataError, UsageError, closest
from muse.tokenizer.special import ROLES

KINDS = ("bpb", "multiple_choice", "generate", "chat")
SPLITS = ("train", "validation", "test")
GRADERS = ("exact", "regex", "numeric", "contains", "python", "judge")
DEFAULT_METRICS = {
    "bpb": ("bpb",),
    "multiple_choice": ("acc", "acc_norm"),
    "generate": ("score",),
    "chat": ("score",),
}


class TaskError(UsageError):
    """An unknown task, a task setting that does not make sense, or a grader that cannot be used."""


class TaskFileError(TaskError, DataError):
    """A task file (TOML or JSONL) that cannot be read; the message names the file and the line."""


class GraderError(TaskError):
    """A grader that cannot run: a custom function that does not import or has the wrong signature,
    a judge with no model to ask."""


# --------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class GraderSpec:
    """Which grader scores a generated output, and its options (graders.py documents each one)."""

    type: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str, default=None):
        return self.options.get(key, default)


@dataclass(frozen=True)
class Generation:
    """How to generate. `stop` applies to completion-style prompts; in chat mode the end-of-turn token
    ends a reply, and `chat_stop` adds strings to that (usually none)."""

    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    chat_stop: tuple[str, ...] = ()
    temperature: float = 0.0


@dataclass(frozen=True)
class FewShot:
    """k examples from `split`, chosen per sample with `seed` (prompts.py); joined by `separator`."""

    k: int = 0
    seed: int = 1234
    split: str = "train"
    separator: str = "\n\n"


@dataclass
class Sample:
    id: str
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    choices: tuple[str, ...] | None = None
    gold: int | None = None
    answer: tuple[str, ...] = ()
    target: str | None = None
    text: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def demonstration(self) -> str:
        """The answer a worked example shows: `target`, else the first answer, else the gold choice."""
        if self.target is not None:
            return self.target
        if self.answer:
            return self.answer[0]
        if self.choices is not None and self.gold is not None:
            return self.choices[self.gold]
        return ""

    def chat_messages(self) -> list[dict]:
        """The conversation so far: `messages`, or the prompt as one user turn."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def to_dict(self) -> dict:
        """The JSONL form of this sample (the same fields files.py reads)."""
        row: dict[str, Any] = {"id": self.id}
        for key in ("prompt", "choices", "gold", "target", "text"):
            value = getattr(self, key)
            if value is not None:
                row[key] = list(value) if isinstance(value, tuple) else value
        if self.messages is not None:
            row["messages"] = [dict(m) for m in self.messages]
        if self.answer:
            row["answer"] = self.answer[0] if len(self.answer) == 1 else list(self.answer)
        if self.metadata:
            row["metadata"] = dict(self.metadata)
        return row


@dataclass
class Task:
    """A named evaluation: its kind, settings, and a loader for its splits.

    `loader(split)` returns that split's samples; it is called at most once per split. `splits` lists the
    splits the loader can produce. `chance` is the score of a model that guesses (a number, or a function
    of the test samples); None means the kind's default (multiple choice: the mean of 1/len(choices)).
    `overlap_expected` says why this task's test items are expected to occur in training text (the
    contamination report shows it), or is empty. `overlap_whole_item` makes the contamination check match
    whole items instead of n-grams (templated items share long n-grams; contamination.py).
    """

    name: str
    kind: str
    description: str = ""
    grader: GraderSpec | None = None
    generation: Generation = field(default_factory=Generation)
    fewshot: FewShot = field(default_factory=FewShot)
    metrics: tuple[str, ...] = ()
    target_delimiter: str = " "
    system: str | None = None
    data: str | None = None
    chance: float | Callable[[list[Sample]], float] | None = None
    overlap_expected: str = ""
    overlap_whole_item: bool = False
    source: str = "builtin"
    base_dir: Path | None = None
    splits: tuple[str, ...] = ("test",)
    loader: Callable[[str], list[Sample]] | None = field(default=None, repr=False)
    _cache: dict[str, list[Sample]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_kind(self.kind, self.name)
        if not self.metrics:
            self.metrics = DEFAULT_METRICS[self.kind]

    def samples(self, split: str = "test") -> list[Sample]:
        """The samples of one split (cached). TaskError for a split this task does not have."""
        if split not in self.splits or self.loader is None:
            have = ", ".join(self.splits) if self.loader is not None else "none (a bpb task reads `data`)"
            raise TaskError(f"task '{self.name}' has no '{split}' split.{closest(split, self.splits)} Splits: {have}")
        if split not in self._cache:
            self._cache[split] = list(self.loader(split))
        return self._cache[split]

    def sizes(self) -> dict[str, int]:
        return {split: len(self.samples(split)) for split in self.splits} if self.loader else {}

    def chance_level(self) -> float | None:
        """The score of guessing on the test split (see the class docstring)."""
        if callable(self.chance):
            return float(self.chance(self.samples("test")))
        if self.chance is not None:
            return float(self.chance)
        if self.kind == "multiple_choice" and self.loader is not None:
            test = self.samples("test")
            return sum(1 / len(s.choices) for s in test) / len(test) if test else None
        return None


def check_kind(kind, where: str) -> None:
    if kind not in KINDS:
        hint = closest(kind, KINDS) if isinstance(kind, str) else ""
        raise TaskError(f"{where}: unknown task kind {kind!r}.{hint} Kinds: {', '.join(KINDS)}")


# --------------------------------------------------------------------------------------------------
# A sample from a dict (a JSONL row or a generator's output)

_SAMPLE_FIELDS = ("id", "prompt", "context", "messages", "choices", "gold", "answer", "target", "text", "metadata")


def _as_text(value, what: str) -> str:
    """Strings stay; numbers become their usual text (an answer of 12 means "12"); anything else fails."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{what} is a boolean; write it as a string")
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return str(value)
    raise ValueError(f"{what} must be a string or a number, got {type(value).__name__}")


def check_messages(messages, what: str = "messages") -> tuple[dict, ...]:
    """A tuple of {"role", "content"} dicts; ValueError naming the bad message otherwise."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"{what} must be a non-empty list of {{'role': ..., 'content': ...}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"{what}[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            hint = closest(role, ROLES) if isinstance(role, str) else ""
            raise ValueError(f"{what}[{i}] has role {role!r}; use one of {', '.join(ROLES)}.{hint}")
        if not isinstance(content, str):
            raise ValueError(f"{what}[{i}] ({role}) has content of type {type(content).__name__}; it must be a string")
        out.append({"role": role, "content": content})
    return tuple(out)


def sample_from_dict(row: Mapping, kind: str, default_id: str, needs_answer: bool = True) -> Sample:
    """Validate one row for a task of `kind`; ValueError with a message naming the field otherwise.

    Fields outside the spec are kept in `metadata` (a row may carry its source, a difficulty, ...).
    `needs_answer=False` lets a generate/chat row go without `answer` (judge and python graders).
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "prompt" in row and "context" in row:
        raise ValueError("give 'prompt' or its alias 'context', not both")
    prompt = row.get("prompt", row.get("context"))
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
    messages = check_messages(row["messages"]) if row.get("messages") is not None else None
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"'metadata' must be an object, got {type(metadata).__name__}")
    metadata = {**{k: v for k, v in row.items() if k not in _SAMPLE_FIELDS}, **metadata}
    sid = row.get("id", default_id)
    if not isinstance(sid, (str, int)) or isinstance(sid, bool):
        raise ValueError(f"'id' must be a string or an integer, got {type(sid).__name__}")

    answer = row.get("answer")
    if answer is None:
        answers: tuple[str, ...] = ()
    elif isinstance(answer, list):
        answers = tuple(_as_text(a, f"answer[{i}]") for i, a in enumerate(answer))
    else:
        answers = (_as_text(answer, "answer"),)
    target = row.get("target")
    if target is not None:
        target = _as_text(target, "target")

    def missing(name: str, alternatives: str = "") -> ValueError:
        return ValueError(f"no '{name}' field{alternatives}.{closest(name, row)} A {kind} sample needs it")

    choices = gold = text = None
    if kind == "bpb":
        text = row.get("text")
        if not isinstance(text, str):
            raise missing("text") if text is None else ValueError("'text' must be a string")
    elif kind == "chat":
        if messages is None:
            raise missing("messages")
        if messages[-1]["role"] == "assistant":
            raise ValueError("the last message is the assistant's; a chat sample ends where the model speaks")
    elif prompt is None and messages is None:
        raise missing("prompt", " (or 'context' or 'messages')")
    if kind == "multiple_choice":
        raw = row.get("choices")
        if raw is None:
            raise missing("choices")
        if not isinstance(raw, list) or len(raw) < 2:
            raise ValueError("'choices' must be a list of at least two strings")
        choices = tuple(_as_text(c, f"choices[{i}]") for i, c in enumerate(raw))
        gold = row.get("gold")
        if gold is None:
            raise missing("gold", " (the index of the right choice)")
        if isinstance(gold, str) and gold in choices:
            gold = choices.index(gold)
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise ValueError(f"'gold' must be an index 0..{len(choices) - 1} into choices (or one of them), got {gold!r}")
    elif kind in ("generate", "chat") and needs_answer and not answers:
        raise missing("answer")
    return Sample(str(sid), prompt, messages, choices, gold, answers, target, text, dict(metadata))
