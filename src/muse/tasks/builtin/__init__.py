"""The built-in tasks: name -> a factory taking keyword options (seed, sizes, and per-task ones).

    arithmetic_1digit, arithmetic_2digit, arithmetic_3digit, arithmetic_multistep   (arithmetic.py)
    spelling, letter_count, word_sort                                             (words.py)
    quote_completion, which_play                                                  (plays.py)
    identity                                                                      (identity.py)
    compliance                                                                    (compliance.py)
    val_bpb                                                                       (the run's val split)

Every generator is deterministic: the same options give the same samples, in the same order, on any
machine. docs/eval.md has the table of formats, split sizes and chance levels. Factories are called
lazily (the registry in muse.tasks); samples are made on first use of a split.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from muse.tasks.builtin.arithmetic import arithmetic_task
from muse.tasks.builtin.compliance import compliance_task
from muse.tasks.builtin.identity import identity_task
from muse.tasks.builtin.plays import quote_completion_task, which_play_task
from muse.tasks.builtin.words import letter_count_task, spelling_task, word_sort_task
from muse.tasks.spec import Task


def val_bpb_task(seed: int = 0) -> Task:
    return Task(name="val_bpb", kind="bpb", data="val", splits=(),
                description="Bits per byte on the run's validation split (data/val_*.bin).")


BUILTIN: dict[str, Callable[..., Task]] = {
    "arithmetic_1digit": partial(arithmetic_task, "1digit"),
    "arithmetic_2digit": partial(arithmetic_task, "2digit"),
    "arithmetic_3digit": partial(arithmetic_task, "3digit"),
    "arithmetic_multistep": partial(arithmetic_task, "multistep"),
    "spelling": spelling_task,
    "letter_count": letter_count_task,
    "word_sort": word_sort_task,
    "quote_completion": quote_completion_task,
    "which_play": which_play_task,
    "identity": identity_task,
    "compliance": compliance_task,
    "val_bpb": val_bpb_task,
}

__all__ = ["BUILTIN"]
