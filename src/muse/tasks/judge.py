"""The judge grader: a rubric prompt for a judge model, and the parser of its verdict.

    prompt = judge_prompt(rubric, question, response, reference)      # what the judge is asked
    grade = parse_verdict(reply, scale="pass_fail")                    # Grade(1.0, "PASS: ...")
    grade = grade_judge(output, sample, ask, rubric="...", scale="1-10")

Two scales. `pass_fail` asks for a last line `VERDICT: PASS` or `VERDICT: FAIL` (score 1 or 0). `1-10` asks
for `SCORE: n` with n in 1..10, scored (n - 1) / 9 so that both scales run 0..1. The parser takes the LAST
verdict line in the reply (a judge that reasons first may quote the format before it commits), tolerates
Markdown emphasis and case (`**Verdict:** pass`), and `n/10` for a score. A reply with no verdict scores 0
with the reason "no verdict" and the reply's start, so a broken judge shows in the records instead of
failing the run.

This module knows the prompt and the parse. It does not call any model: `ask(prompt) -> str` is given by
the caller (the eval providers own HTTP, retries and the judge's sampling settings).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from muse.tasks.graders import Grade
from muse.tasks.spec import GraderError, Sample, TaskError

SCALES = ("pass_fail", "1-10")

_INSTRUCTIONS = {
    "pass_fail": "Think briefly about how the response meets the rubric, then end your reply with one line "
                 "that is exactly `VERDICT: PASS` or `VERDICT: FAIL`.",
    "1-10": "Think briefly about how the response meets the rubric, then end your reply with one line "
            "`SCORE: n`, where n is an integer from 1 (does not meet the rubric at all) to 10 (meets it fully).",
}

_VERDICT = re.compile(r"verdict\W{0,4}[:=]\W{0,4}(pass|fail)\b", re.IGNORECASE)
_BARE_VERDICT = re.compile(r"^\W*(pass|fail)\W*$", re.IGNORECASE)
_SCORE = re.compile(r"score\W{0,4}[:=]\W{0,4}(\d+(?:\.\d+)?)(?:\s*/\s*10)?", re.IGNORECASE)
_OUT_OF_TEN = re.compile(r"\b(\d+(?:\.\d+)?)\s*/\s*10\b")


def check_judge_options(opts: Mapping) -> None:
    rubric = opts.get("rubric")
    if not isinstance(rubric, str) or not rubric.strip():
        raise TaskError("a judge grader needs rubric = '...': what a good response does, in plain words")
    if opts.get("scale", "pass_fail") not in SCALES:
        raise TaskError(f"judge scale must be one of {', '.join(SCALES)}, got {opts['scale']!r}")


def question_text(sample: Sample) -> str:
    """The sample's prompt, or its conversation as 'role: content' lines."""
    if sample.messages is not None:
        return "\n".join(f"{m['role']}: {m['content']}" for m in sample.messages)
    return sample.prompt or ""


def judge_prompt(rubric: str, question: str, response: str, reference: str | None = None,
                 scale: str = "pass_fail") -> str:
    """The text sent to the judge (as one user message)."""
    parts = [
        "You are grading a response written by an AI model. Judge it only by the rubric.",
        f"## Rubric\n{rubric.strip()}",
        f"## Question or conversation\n{question.strip()}",
    ]
    if reference:
        parts.append(f"## Reference answer\n{reference.strip()}")
    parts.append(f"## Response to grade\n{response.strip() or '(empty)'}")
    parts.append(_INSTRUCTIONS[scale])
    return "\n\n".join(parts)


def _gist(reply: str, n: int = 160) -> str:
    text = " ".join(reply.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def parse_verdict(reply: str, scale: str = "pass_fail") -> Grade:
    """The judge's verdict as a Grade; score 0 and reason 'no verdict ...' when none can be read."""
    if not isinstance(reply, str):
        raise GraderError(f"the judge's ask() returned {type(reply).__name__}; it must return the reply text")
    if scale == "pass_fail":
        found = _VERDICT.findall(reply)
        if not found:
            lines = [ln for ln in reply.strip().splitlines() if ln.strip()]
            bare = _BARE_VERDICT.match(lines[-1]) if lines else None
            found = [bare.group(1)] if bare else []
        if not found:
            return Grade(0.0, f"no verdict in the judge's reply: {_gist(reply)!r}")
        verdict = found[-1].upper()
        return Grade(1.0 if verdict == "PASS" else 0.0, f"judge: {verdict}: {_gist(reply)}")
    found = _SCORE.findall(reply) or _OUT_OF_TEN.findall(reply)
    if not found:
        return Grade(0.0, f"no score in the judge's reply: {_gist(reply)!r}")
    n = float(found[-1])
    if not 1 <= n <= 10:
        return Grade(0.0, f"judge score {found[-1]} is outside 1..10: {_gist(reply)!r}")
    return Grade((n - 1) / 9, f"judge: {found[-1]}/10: {_gist(reply)}")


def grade_judge(output: str, sample: Sample, ask: Callable[[str], str] | None, rubric: str,
                scale: str = "pass_fail") -> Grade:
    """Ask the judge about `output` and parse its verdict. An empty output scores 0 without asking."""
    if ask is None:
        raise GraderError("this task is graded by a judge model, and none was given; pass a judge endpoint")
    if not output.strip():
        return Grade(0.0, "empty output")
    reference = sample.target if sample.target is not None else (" | ".join(sample.answer) or None)
    return parse_verdict(ask(judge_prompt(rubric, question_text(sample), output, reference, scale)), scale)
