"""muse.tasks: task data and graders, shared by evaluation and RL. Torch-free.

    import muse.tasks as tasks
    tasks.names()                                   # the built-in tasks
    task = tasks.get("arithmetic_2digit")           # or a path: tasks.get("my_task.toml")
    for sample in task.samples("test"):
        shots = tasks.fewshot_examples(task, sample)
        prompt = tasks.build_prompt(task, sample, shots)        # or build_messages(...) for chat models
        grade = tasks.grade_sample(task, sample, output)        # Grade(score, reason)
    sft_rows = list(tasks.train_conversations(task))           # {"messages": [...]} per train sample

spec.py (Task, Sample, settings, errors), files.py (TOML / JSONL task files), graders.py and judge.py
(scoring outputs), prompts.py (few-shot, prompts, multiple-choice metrics, SFT conversations),
contamination.py (n-gram overlap of test items with training text), builtin/ (the generators).
docs/eval.md is the user's guide. This package knows tasks; running models on them is muse.eval's.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from muse.common.errors import closest
from muse.tasks.builtin import BUILTIN
from muse.tasks.files import TASK_SUFFIXES, load_task_file
from muse.tasks.graders import (
    Grade,
    extract_number,
    grade_output,
    grade_sample,
    normalize_text,
    truncate_at_stop,
)
from muse.tasks.prompts import (
    bits_per_byte,
    build_messages,
    build_prompt,
    fewshot_examples,
    multiple_choice_requests,
    score_multiple_choice,
    train_conversations,
)
from muse.tasks.spec import (
    KINDS,
    FewShot,
    Generation,
    GraderError,
    GraderSpec,
    Sample,
    Task,
    TaskError,
    TaskFileError,
)

ALL = "all"


def names() -> list[str]:
    """The built-in task names, in table order (docs/eval.md)."""
    return list(BUILTIN)


def _build(name: str, options: dict, strict: bool) -> Task:
    factory = BUILTIN[name]
    accepted = inspect.signature(factory).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown and strict:
        takes = ", ".join(k for k in accepted) or "no options"
        raise TaskError(f"task '{name}' has no option {unknown[0]!r}.{closest(unknown[0], accepted)} It takes: {takes}")
    return factory(**{k: v for k, v in options.items() if k in accepted})


def _looks_like_path(name: str) -> bool:
    return name.endswith(TASK_SUFFIXES) or os.sep in name or "/" in name


def get(name: str | os.PathLike, **options) -> Task:
    """A built-in task by name (options such as seed=, sizes=), or a task file (.toml / .jsonl) by path.

    TaskError for an unknown name, listing the closest names and all built-ins.
    """
    if isinstance(name, os.PathLike) or _looks_like_path(str(name)):
        if options:
            raise TaskError(f"options {sorted(options)} apply to built-in tasks, not to the task file {name}")
        return load_task_file(Path(name))
    if name not in BUILTIN:
        if name == ALL:
            raise TaskError("'all' names many tasks; use muse.tasks.resolve('all') or all_tasks()")
        raise TaskError(f"unknown task '{name}'.{closest(name, BUILTIN)} Built-in tasks: {', '.join(BUILTIN)}; "
                        "or give the path of a .toml/.jsonl task file")
    return _build(name, options, strict=True)


def all_tasks(**options) -> list[Task]:
    """Every built-in task; each gets the options it accepts (seed=1 reaches all, profile= only identity)."""
    return [_build(name, options, strict=False) for name in BUILTIN]


def resolve(spec: str, **options) -> list[Task]:
    """'all', one name or path, or a comma-separated list of them -> tasks, in the order given."""
    out: list[Task] = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        out += all_tasks(**options) if part == ALL else [get(part, **options)]
    if not out:
        raise TaskError(f"no task named in {spec!r}; give a task name, 'all', or a task file")
    return out


__all__ = [
    "ALL", "KINDS", "FewShot", "Generation", "Grade", "GraderError", "GraderSpec", "Sample", "Task",
    "TaskError", "TaskFileError", "all_tasks", "bits_per_byte", "build_messages", "build_prompt",
    "extract_number", "fewshot_examples", "get", "grade_output", "grade_sample", "load_task_file", "names",
    "normalize_text", "multiple_choice_requests", "resolve", "score_multiple_choice", "train_conversations",
    "truncate_at_stop",
]
