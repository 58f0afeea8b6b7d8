"""Reward functions: a batch of (conversation, completion) rollouts in, one `Reward(score, reason)` each out.

    reward = build_reward(["task", "mymod:brevity*0.2"], {"arithmetic_2digit": task})
    rewards = reward.score([Rollout(messages, "7 + 5 = 12. The answer is 12.", sample, task="arithmetic_2digit")])
    reward.errors                       # samples a raising verifier scored 0, so far

The interface (`RewardFunction`: a `name`, `score(batch) -> list[Reward]`) is what GRPO (muse.posttrain.grpo)
calls once per step on all of a step's samples, and what every scorer implements:

    task               the task's own grader as a verifier (muse.tasks.grade_sample): 1.0 right, 0.0 wrong,
                       the grader's reason. `TaskReward`.
    module:function    a Python function called as fn(rollouts) -> one float | bool | (score, reason) |
                       Reward per rollout (the module is imported from sys.path; cwd included). `PythonReward`.
    rm:PATH            a trained reward model's scalar (muse.posttrain.rm.RewardModelReward).
    constitution[:FILE] the constitution's checks (muse.posttrain.constitution.ConstitutionReward).

`--reward` specs may carry a weight, `SPEC*WEIGHT` (`task*0.5`, `mymod:fn*0.2`); several specs make a
`WeightedSum`: score = sum of weight x score, reason = each part's, joined. One failing sample never
crashes a step: a verifier (or a Python reward) that raises on a sample scores that sample 0 with the
exception as its reason, and counts it in `errors`, which GRPO logs as `reward_errors`.

What it does not know: models, engines, training. It imports the RM and constitution scorers only
when a spec names them.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from muse.common.errors import UsageError, closest
from muse.tasks import Sample, Task, grade_sample

KINDS = ("task", "module:function", "rm:PATH", "constitution[:FILE]")


@dataclass(frozen=True)
class Rollout:
    """What a reward function scores: one sampled reply to one conversation."""

    messages: tuple[dict, ...]  # the conversation up to the reply (system/user turns, {"role", "content"})
    completion: str  # the policy's reply text (cut at the end-of-turn token and the task's chat stops)
    sample: Sample | None = None  # the muse.tasks Sample it came from (answers for verifiers); None for free prompts
    task: str = ""  # the name of that sample's task ("" for free prompts): which grader TaskReward uses


@dataclass(frozen=True)
class Reward:
    score: float
    reason: str = ""


@runtime_checkable
class RewardFunction(Protocol):
    name: str

    def score(self, batch: Sequence[Rollout]) -> list[Reward]: ...


def reward_errors(fn: RewardFunction) -> int:
    """The samples `fn` scored 0 because a scorer raised (0 for scorers that do not count them)."""
    return int(getattr(fn, "errors", 0))


def _failed(e: BaseException) -> Reward:
    return Reward(0.0, f"error: {type(e).__name__}: {e}"[:200])


class TaskReward:
    """A task's grader as a verifier: Grade(score, reason) -> Reward, 0 for a grader that raises."""

    name = "task"

    def __init__(self, tasks: Mapping[str, Task]):
        self.tasks = dict(tasks)
        self.errors = 0

    def score(self, batch: Sequence[Rollout]) -> list[Reward]:
        out = []
        for r in batch:
            task = self.tasks.get(r.task)
            if task is None or r.sample is None:
                raise UsageError(f"the task reward scores replies to task samples; this rollout has "
                                 f"{'no sample' if r.sample is None else f'the unknown task {r.task!r}'}")
            try:
                grade = grade_sample(task, r.sample, r.completion)
                out.append(Reward(float(grade.score), grade.reason))
            except Exception as e:  # a broken verifier costs one sample, never the step
                self.errors += 1
                out.append(_failed(e))
        return out


def _as_reward(value, ref: str) -> Reward:
    """A Python reward's return value for one rollout -> Reward; ValueError for anything else."""
    if isinstance(value, Reward):
        score, reason = value.score, value.reason
    elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        score, reason = value
    elif isinstance(value, (bool, int, float)):
        score, reason = value, ""
    else:
        raise ValueError(f"{ref} returned {type(value).__name__}; return a float, a bool, (score, reason) or a Reward")
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"{ref} returned the score {score!r}; a score is a finite number")
    return Reward(score, reason)


class PythonReward:
    """`module:function`, called as fn(rollouts) -> one value per rollout (module docstring).

    When the call raises, each rollout is retried alone so that only the failing ones score 0 (and count
    as errors). A function that returns the wrong number of values is a bug in it: UsageError.
    """

    def __init__(self, ref: str, fn: Callable):
        self.name, self.fn, self.errors = ref, fn, 0

    def _call(self, batch: Sequence[Rollout]) -> list[Reward]:
        values = list(self.fn(list(batch)))
        if len(values) != len(batch):
            raise UsageError(f"reward {self.name} returned {len(values)} scores for {len(batch)} rollouts; "
                             "return one per rollout")
        return [_as_reward(v, self.name) for v in values]

    def score(self, batch: Sequence[Rollout]) -> list[Reward]:
        if not batch:
            return []
        try:
            return self._call(batch)
        except UsageError:
            raise
        except Exception:
            pass
        out = []
        for r in batch:
            try:
                out += self._call([r])
            except UsageError:
                raise
            except Exception as e:
                self.errors += 1
                out.append(_failed(e))
        return out


class WeightedSum:
    """sum_i w_i * score_i over several reward functions; the reason names each part."""

    def __init__(self, parts: Sequence[tuple[RewardFunction, float]]):
        if not parts:
            raise UsageError("a weighted sum of rewards needs at least one reward")
        self.parts = list(parts)
        self.name = " + ".join(f"{fn.name}*{w:g}" if w != 1 else fn.name for fn, w in self.parts)

    @property
    def errors(self) -> int:
        return sum(reward_errors(fn) for fn, _ in self.parts)

    def score(self, batch: Sequence[Rollout]) -> list[Reward]:
        columns = []
        for fn, _ in self.parts:
            got = fn.score(batch)
            if len(got) != len(batch):
                raise UsageError(f"reward {fn.name} returned {len(got)} scores for {len(batch)} rollouts")
            columns.append(got)
        out = []
        for i in range(len(batch)):
            total = sum(w * col[i].score for (_, w), col in zip(self.parts, columns))
            reason = "; ".join(f"{fn.name}={col[i].score:g}" + (f" ({col[i].reason})" if col[i].reason else "")
                               for (fn, _), col in zip(self.parts, columns))
            out.append(Reward(float(total), reason))
        return out


# ----------------------------------------------------------------------------------------------------
# --reward specs


def parse_spec(spec: str) -> tuple[str, str, float]:
    """'KIND[:ARG][*WEIGHT]' -> (kind, arg, weight); kind is task, rm, constitution or python."""
    text = spec.strip()
    weight = 1.0
    head, star, tail = text.rpartition("*")
    if star:
        try:
            weight = float(tail)
        except ValueError:
            raise UsageError(f"--reward {spec!r}: the weight after '*' must be a number (e.g. task*0.5)") from None
        if not math.isfinite(weight):
            raise UsageError(f"--reward {spec!r}: the weight must be a finite number")
        text = head.strip()
    kind, colon, arg = text.partition(":")
    if kind == "task" and not colon:
        return "task", "", weight
    if kind == "rm" and colon:
        if not arg:
            raise UsageError(f"--reward {spec!r}: give the reward model's checkpoint, rm:PATH")
        return "rm", arg, weight
    if kind == "constitution":
        return "constitution", arg, weight
    if colon and kind and arg and kind not in ("task", "rm"):
        return "python", text, weight
    word = kind or text
    raise UsageError(f"unknown reward {spec!r}.{closest(word, ('task', 'rm', 'constitution'))} "
                     f"Rewards: {', '.join(KINDS)}, each optionally *WEIGHT (e.g. task*0.5)")


def load_python_reward(ref: str) -> PythonReward:
    module_name, _, fn_name = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise UsageError(f"reward {ref!r}: no module '{module_name}'; put {module_name.replace('.', '/')}.py "
                             "in the current directory or on PYTHONPATH") from None
        raise UsageError(f"reward {ref!r}: importing '{module_name}' failed: {e}") from None
    except Exception as e:
        raise UsageError(f"reward {ref!r}: importing '{module_name}' raised {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise UsageError(f"reward {ref!r}: module '{module_name}' has no function '{fn_name}'.{closest(fn_name, names)}")
    if not callable(fn):
        raise UsageError(f"reward {ref!r} is a {type(fn).__name__}, not a function")
    return PythonReward(ref, fn)


def _unavailable(kind: str, e: ImportError) -> UsageError:
    return UsageError(f"the {kind} reward is unavailable in this version of muse ({e}); use task or module:function")


def _build_one(kind: str, arg: str, tasks: Mapping[str, Task]) -> RewardFunction:
    if kind == "task":
        return TaskReward(tasks)
    if kind == "python":
        return load_python_reward(arg)
    if kind == "rm":
        try:
            from muse.posttrain.rm import RewardModelReward
        except ImportError as e:
            raise _unavailable("rm:PATH", e) from None
        return RewardModelReward(arg)
    try:
        from muse.posttrain.constitution import ConstitutionReward
    except ImportError as e:
        raise _unavailable("constitution", e) from None
    return ConstitutionReward(arg or None)


def build_reward(specs: Sequence[str], tasks: Mapping[str, Task]) -> RewardFunction:
    """The reward `--reward SPEC ...` names (the task verifier when none is given); UsageError for a bad spec."""
    parsed = [parse_spec(s) for s in (specs or ["task"])]  # every spec checked before anything loads
    parts = [(_build_one(kind, arg, tasks), w) for kind, arg, w in parsed]
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    return WeightedSum(parts)
