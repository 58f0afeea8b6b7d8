"""Task scores of a chat model: greedy replies to the built-in generative tasks, graded, with standard errors.

    scores = score_tasks(model, tok, ["arithmetic_2digit", "identity"], limit=200)
    scores["arithmetic_2digit"]   # TaskScore(score=0.41, se=0.035, n=200)

A stopgap with a small job: the speedrun report and bench/posttrain.py need "task scores before and after
SFT" before the evaluation harness (muse.eval, `muse eval`) exists. That harness will replace this module;
until then keep it this small. Each sample is asked zero-shot as a chat (muse.tasks.build_messages, then
the one chat renderer, render_prompt), answered greedily by the paged engine until <|end|>, and graded by
the task's grader (muse.tasks.grade_sample). The standard error is a bootstrap over samples.

What it does not know: training, checkpoints, servers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

import muse.tasks as tasks
from muse.infer.engine import LLM, EngineConfig
from muse.infer.sampling_params import SamplingParams
from muse.tokenizer import END_ID, render_prompt


@dataclass(frozen=True)
class TaskScore:
    score: float  # mean grade in [0, 1]
    se: float  # bootstrap standard error of the mean
    n: int


@lru_cache(maxsize=1)
def _generative() -> tuple[str, ...]:
    return tuple(name for name in tasks.names() if tasks.get(name).kind in ("generate", "chat"))


def generative_tasks() -> list[str]:
    """The built-in tasks a chat model answers in words (not multiple-choice, not bits per byte)."""
    return list(_generative())


def bootstrap_se(scores: list[float], reps: int = 1000, seed: int = 0) -> float:
    """Standard deviation of the mean over `reps` resamples with replacement (fixed seed: reproducible)."""
    if len(scores) < 2:
        return 0.0
    a = np.asarray(scores, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(reps, len(a)))
    return float(a[idx].mean(axis=1).std(ddof=1))


def score_tasks(model, tok, names: list[str], *, limit: int | None = None, split: str = "test",
                max_num_seqs: int = 64, with_outputs: bool = False):
    """{task: TaskScore} for the first `limit` samples of each task's `split` (all when None).
    with_outputs=True returns ({task: TaskScore}, {task: [(question, reply, score), ...]})."""
    llm = LLM(model, EngineConfig(max_num_seqs=max_num_seqs), tokenizer=tok)
    context = llm.engine.max_model_len
    results, outputs = {}, {}
    for name in names:
        task = tasks.get(name)
        samples = task.samples(split)[:limit]
        prompts, params, keep = [], [], []
        for s in samples:
            ids = render_prompt(tok, tasks.build_messages(task, s))
            room = min(task.generation.max_tokens, context - len(ids))
            if room < 1:  # a prompt that fills the context cannot be answered: it scores 0
                continue
            keep.append(s)
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=room, temperature=0.0, stop_token_ids=(END_ID,)))
        replies = [o.text or "" for o in llm.generate(prompts, params, show_progress=False)] if prompts else []
        if task.generation.chat_stop:
            replies = [tasks.truncate_at_stop(r, task.generation.chat_stop) for r in replies]
        graded = {s.id: tasks.grade_sample(task, s, r).score for s, r in zip(keep, replies)}
        scores = [graded.get(s.id, 0.0) for s in samples]
        results[name] = TaskScore(float(np.mean(scores)) if scores else 0.0, bootstrap_se(scores), len(scores))
        by_id = dict(zip((s.id for s in keep), replies))
        outputs[name] = [(s.chat_messages()[-1]["content"], by_id.get(s.id, ""), graded.get(s.id, 0.0))
                         for s in samples]
    return (results, outputs) if with_outputs else results
