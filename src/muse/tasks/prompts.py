"""From a task and a sample to what a model is asked, and from log-likelihoods to multiple-choice metrics.

Few-shot. `fewshot_examples(task, sample)` picks `task.fewshot.k` samples of the task's few-shot split
(`train` by default) with a generator seeded by (fewshot seed, task name, sample id): the same sample
gets the same examples in any order, on any machine, with or without the other samples. A sample never
gets itself, nor another sample with the same prompt/messages (which matters when the few-shot split is
the evaluated one).

Two prompt styles:
    completion  build_prompt(): [system + sep] shot.prompt + delim + shot.demonstration, sep, ..., prompt.
                `delim` is task.target_delimiter (" " by default, as in "Answer:" + " " + "12");
                `sep` is fewshot.separator ("\\n\\n").
    chat        build_messages(): [system], then per shot its messages and an assistant turn with its
                demonstration, then the sample's messages (or its prompt as one user turn). A tokenizer's
                render_prompt (muse.tokenizer.chat) or a chat endpoint takes it from there.

Multiple choice is scored as lm-eval does: the log-likelihood of `delim + choice` after the context.
`acc` takes the argmax of the summed log-likelihoods; `acc_norm` the argmax of log-likelihood per UTF-8
byte of the choice (delimiter excluded), which removes the bias toward short choices without depending on
the tokenizer. Ties go to the first choice.

This module builds strings and message lists. It knows no tokenizer, model or endpoint.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from muse.tasks.spec import Sample, Task, TaskError


def _content(sample: Sample) -> tuple:
    messages = tuple((m["role"], m["content"]) for m in sample.messages) if sample.messages else None
    return sample.prompt, messages


def fewshot_examples(task: Task, sample: Sample, k: int | None = None, seed: int | None = None) -> list[Sample]:
    """`k` examples for `sample` from the few-shot split; TaskError when the split holds too few."""
    k = task.fewshot.k if k is None else k
    if k <= 0:
        return []
    seed = task.fewshot.seed if seed is None else seed
    pool = task.samples(task.fewshot.split)
    own = _content(sample)

    def ok(i: int) -> bool:
        return pool[i].id != sample.id and _content(pool[i]) != own

    rng = random.Random(f"{seed}\0{task.name}\0{sample.id}")
    # A few extra draws cover the rare excluded one; the full shuffle is the fallback for tiny pools.
    picked = [i for i in rng.sample(range(len(pool)), min(len(pool), k + 4)) if ok(i)][:k]
    if len(picked) < k:
        order = list(range(len(pool)))
        rng.shuffle(order)
        picked = [i for i in order if ok(i)][:k]
    if len(picked) < k:
        raise TaskError(
            f"task '{task.name}': {k} few-shot examples asked for, but its '{task.fewshot.split}' split has only "
            f"{len(picked)} other samples; lower fewshot k"
        )
    return [pool[i] for i in picked]


def build_prompt(task: Task, sample: Sample, shots: Sequence[Sample] = ()) -> str:
    """The completion-style prompt (module docstring)."""
    if sample.prompt is None:
        raise TaskError(f"task '{task.name}' sample {sample.id} has messages and no prompt; use build_messages")
    sep, delim = task.fewshot.separator, task.target_delimiter
    parts = [task.system] if task.system else []
    for shot in shots:
        if shot.prompt is None:
            raise TaskError(f"task '{task.name}' few-shot sample {shot.id} has no prompt")
        parts.append(shot.prompt + delim + shot.demonstration)
    parts.append(sample.prompt)
    return sep.join(parts)


def build_messages(task: Task, sample: Sample, shots: Sequence[Sample] = ()) -> list[dict]:
    """The chat-style conversation, ending where the model speaks (module docstring)."""
    messages = [{"role": "system", "content": task.system}] if task.system else []
    for shot in shots:
        messages += [m for m in shot.chat_messages() if m["role"] != "system"]
        messages.append({"role": "assistant", "content": shot.demonstration})
    messages += sample.chat_messages()
    return messages


def multiple_choice_requests(task: Task, sample: Sample, shots: Sequence[Sample] = ()) -> list[tuple[str, str]]:
    """(context, continuation) per choice: the texts whose log-likelihoods `score_multiple_choice` reads."""
    if not sample.choices:
        raise TaskError(f"task '{task.name}' sample {sample.id} has no choices")
    context = build_prompt(task, sample, shots)
    return [(context, task.target_delimiter + choice) for choice in sample.choices]


def score_multiple_choice(sample: Sample, logliks: Sequence[float]) -> dict:
    """{'acc', 'acc_norm', 'pred', 'pred_norm'} from one log-likelihood (natural log, summed over the
    continuation's tokens) per choice."""
    if sample.choices is None or sample.gold is None:
        raise TaskError(f"sample {sample.id} is not a multiple-choice sample")
    if len(logliks) != len(sample.choices):
        raise ValueError(f"{len(logliks)} log-likelihoods for {len(sample.choices)} choices")
    per_byte = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(logliks, sample.choices)]
    pred = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    pred_norm = max(range(len(per_byte)), key=lambda i: (per_byte[i], -i))
    return {"acc": float(pred == sample.gold), "acc_norm": float(pred_norm == sample.gold),
            "pred": pred, "pred_norm": pred_norm}


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Bits per UTF-8 byte from a summed negative log-likelihood in nats (the bpb kind's metric)."""
    if n_bytes <= 0:
        raise ValueError("bits per byte of an empty text is undefined")
    return nll_nats / (math.log(2) * n_bytes)


def train_conversations(task: Task, split: str = "train") -> Iterator[dict]:
    """`{"messages": [...]}` per sample of `split`, the demonstration as the last (assistant) turn.

    This is SFT data: what a chat model should answer to each training sample. Samples with nothing to
    demonstrate (a judge-graded row without an answer) are skipped.
    """
    if task.kind == "bpb":
        raise TaskError(f"task '{task.name}' is a bpb task; it has no conversations")
    for sample in task.samples(split):
        reply = sample.demonstration
        if not reply:
            continue
        messages = [{"role": "system", "content": task.system}] if task.system else []
        messages += sample.chat_messages()
        messages.append({"role": "assistant", "content": reply})
        yield {"messages": messages}
