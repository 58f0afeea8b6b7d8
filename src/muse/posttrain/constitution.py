"""The constitution on the RL side: what a model critic is asked, how its answers are read, and the
constitution as a reward function.

    from muse.posttrain.constitution import ConstitutionReward, critique_messages, parse_choice
    reward = ConstitutionReward(None)              # the sample constitution; or a path
    reward.score([Rollout(messages, completion)])  # [Reward(share of checked principles met, failures)]
                                                   # judged against the user's last message in `messages`

The file format, the checks and the fixes are muse.tasks.constitution's (re-exported here): evaluation
(the `compliance` task) and RL share them, and muse.tasks may not import muse.posttrain.

Prompts follow Constitutional AI (Bai et al. 2022, appendix): the critic sees the conversation, a
critique request (the principle's `critique`), and writes a critique; then, with its critique, a revision
request (the principle's `revision`), and writes the revised response. For preference labels it sees the
conversation, two responses (A and B) and every principle's critique request, and answers with a letter.

`parse_choice` reads that letter: the answer is the one of the standalone capital letters A and B (between
spaces, punctuation or the ends of the text) that the reply names ("B", "(A)", "**B**", "Response B is
better."); when it names both, the one it opens with ("A. Response B repeats itself"); otherwise the
answer is unparseable (None), which the caller records and counts. This module knows prompts and text; it runs no model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from muse.tasks.constitution import (
    CHECKS,
    DEFAULT_CONSTITUTION,
    FIXES,
    CheckResult,
    Constitution,
    ConstitutionError,
    Principle,
    Verdict,
    load_constitution,
    parse_constitution,
    prompt_text,
)

_ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}


def render_conversation(messages: Sequence[Mapping], response: str | None = None) -> str:
    """The conversation as plain text lines ("User: ...", "Assistant: ..."), with `response` as the last
    assistant turn when given."""
    lines = [f"{_ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in messages]
    if response is not None:
        lines.append(f"Assistant: {response}")
    return "\n".join(lines)


def critique_messages(messages: Sequence[Mapping], response: str, principle: Principle) -> list[dict]:
    text = ("Here is a conversation between a user and an assistant.\n\n"
            f"{render_conversation(messages, response)}\n\n"
            f"Critique request: {principle.critique}\n"
            "Answer in one or two sentences.")
    return [{"role": "user", "content": text}]


def revision_messages(messages: Sequence[Mapping], response: str, principle: Principle, critique: str) -> list[dict]:
    text = ("Here is a conversation between a user and an assistant.\n\n"
            f"{render_conversation(messages, response)}\n\n"
            f"Critique request: {principle.critique}\n"
            f"Critique: {critique.strip()}\n\n"
            f"Revision request: {principle.revision}\n"
            "Write only the revised response of the assistant, nothing else.")
    return [{"role": "user", "content": text}]


def compare_messages(messages: Sequence[Mapping], a: str, b: str, constitution: Constitution) -> list[dict]:
    rules = "\n".join(f"- {p.critique}" for p in constitution.principles)
    text = ("Here is a conversation between a user and an assistant, and two possible responses of the assistant.\n\n"
            f"{render_conversation(messages)}\n\n"
            f"Response A: {a}\n\n"
            f"Response B: {b}\n\n"
            f"Which response better follows these principles?\n{rules}\n\n"
            "Answer with the single letter A or B.")
    return [{"role": "user", "content": text}]


# A letter stands alone between the text's ends, spaces and ASCII punctuation: "A\x06mJ" from a tiny
# model's garbage does not name A.
_LETTER = re.compile(r"(?:^|(?<=[\s(\[\"'*]))([AB])(?=$|[\s.,:;!?)\]\"'*])")
_OPENING = re.compile(r"^[\s(\[\"'*]*(?:response\s+|answer\s*:?\s*)?\(?([AB])\)?(?=$|[\s.,:;!?)\]\"'*])",
                      re.IGNORECASE)


def parse_choice(answer: str) -> str | None:
    """"A", "B", or None when the critic's answer names neither or both without opening with one."""
    letters = {m.group(1) for m in _LETTER.finditer(answer)}
    if len(letters) == 1:
        return letters.pop()
    m = _OPENING.match(answer)
    if letters and m:
        return m.group(1).upper()
    return None


def critique_from_verdict(verdict: Verdict) -> str:
    """The programmatic critic's critique: one line per failed principle, with the check's reason."""
    return "\n".join(f"{r.principle}: {r.reason}" for r in verdict.results if not r.passed)


class ConstitutionReward:
    """A reward function (muse.posttrain.rewards' RewardFunction): the share of the constitution's checked
    principles a completion meets, with the failed ones as the reason. `--reward constitution[:FILE]`."""

    name = "constitution"

    def __init__(self, path: str | Path | None = None):
        self.constitution = load_constitution(path)
        if not self.constitution.checked:
            raise ConstitutionError(f"{self.constitution.where}: no principle has a programmatic check, so it "
                                    "cannot score completions; add check, must_match or must_not_match")

    def score(self, batch) -> list:
        from muse.posttrain.rewards import Reward

        out = []
        for rollout in batch:
            verdict = self.constitution.check(rollout.completion, prompt_text(rollout.messages))
            out.append(Reward(verdict.score, verdict.reason()))
        return out


__all__ = [
    "CHECKS", "DEFAULT_CONSTITUTION", "FIXES", "CheckResult", "Constitution", "ConstitutionError",
    "ConstitutionReward", "Principle", "Verdict", "compare_messages", "critique_from_verdict",
    "critique_messages", "load_constitution", "parse_choice", "parse_constitution", "prompt_text",
    "render_conversation", "revision_messages",
]
