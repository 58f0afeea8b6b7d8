"""Graders: a generated output and a sample in, `Grade(score, reason)` out.

    exact     equal to one of the answers after normalisation (below).
    contains  one of the answers (or all, `require_all`) occurs in the output as whole words, normalised.
    numeric   the output's number (extraction rule below) equals a number in an answer, within tolerance.
    regex     a capture of `pattern` compared to the answers (`compare`: exact | numeric | match).
    python    `module:function`, called as fn(output, sample, **options) -> float | bool | (score, reason).
    judge     a rubric sent to a judge model through `ask(prompt) -> reply`; its verdict parsed (judge.py).

Normalisation (exact, contains, regex): Unicode NFKC, case folded, punctuation replaced by spaces, the
articles a/an/the dropped, whitespace collapsed; each step can be switched off. Like SQuAD's answer
normaliser, except that punctuation becomes a space instead of vanishing, so "n-i-g-h-t" reads as five
letters rather than the word "night" (the spelling task depends on it). An answer that normalises to
nothing ("?") is compared with its punctuation kept, so it can never match every output.

Number extraction (numeric): the value after the LAST answer marker ("####", "answer is", "answer:",
"answer =", "=") if a number follows it, otherwise the LAST number in the text (GSM8K's convention, made
robust to a model that keeps talking: "the answer is 12. Next question 13" reads 12, "2 + 3 = 5" reads 5).
A number may carry a sign (- + or U+2212), a currency sign ($ £ € ¥), thousands separators used
consistently in groups of three ("1,234", "1 234", with a no-break or thin space too), a decimal part
("-3.50", ".5"; a trailing "12." is a sentence's period), and a fraction bar ("3/4"). Not read: "1e5"
(reads 1), words ("twelve"), European decimal commas ("1.234,5"). Values are exact fractions, so 3.50
equals 3.5 with no float error.

Every grader returns a score in [0, 1] and a one-line reason for the per-sample record; an empty output
scores 0 with the reason "empty output". This module knows samples and task settings; it does not
generate, call models (the judge's `ask` is given to it) or cut outputs at stop strings beyond the
`truncate_at_stop` safety net that a runner may apply.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import re
import string
import sys
import unicodedata
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

from muse.common.errors import closest
from muse.tasks.spec import GRADERS, GraderError, GraderSpec, Sample, Task, TaskError


class Grade(NamedTuple):
    score: float
    reason: str


# --------------------------------------------------------------------------------------------------
# Text normalisation

_ARTICLES = frozenset({"a", "an", "the"})


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_text(text: str, ignore_case: bool = True, ignore_punctuation: bool = True,
                   ignore_articles: bool = True) -> str:
    """The comparison form of `text` (module docstring)."""
    text = unicodedata.normalize("NFKC", text)
    if ignore_case:
        text = text.casefold()
    if ignore_punctuation:
        text = "".join(" " if _is_punctuation(ch) else ch for ch in text)
    words = text.split()
    if ignore_articles:
        words = [w for w in words if w.casefold() not in _ARTICLES]
    return " ".join(words)


def _normalized_answers(answers: Sequence[str], opts: dict) -> list[tuple[str, dict]]:
    """(normalised answer, the options that made it) for each answer; see the '?' rule above."""
    out = []
    for answer in answers:
        form = normalize_text(answer, **opts)
        used = opts
        if not form:
            used = {**opts, "ignore_punctuation": False, "ignore_articles": False}
            form = normalize_text(answer, **used)
        if form:
            out.append((form, used))
    return out


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (the stop itself removed).

    Engines and most endpoints already stop there; this is for endpoints that return text past a stop
    (some accept only four stop strings). Idempotent, so applying it twice is harmless.
    """
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


# --------------------------------------------------------------------------------------------------
# Numbers

_SIGNS = "-+\u2212"
_NUMBER = re.compile(
    r"(?<![\w.])"  # not inside a word ("x2", "H2O") or after a decimal point
    rf"(?P<sign>[{_SIGNS}]?)(?P<cur>[$£€¥]?)(?P<sign2>[{_SIGNS}]?)"
    r"(?:"
    # thousands groups, the same separator throughout: 1,234,567 / 1 234 / 1\u00a0234
    r"(?P<int>\d{1,3}(?P<sep>[, \u00a0\u202f\u2009])\d{3}(?:(?P=sep)\d{3})*(?!\d)|\d+)"
    r"(?:\.(?P<frac>\d+))?"
    r"|\.(?P<bare>\d+)"
    r")"
    r"(?:[/\u2044](?P<den>\d+))?"
)
_MARKER = re.compile(r"####|\banswer\s*(?:is\s*:?|:|=)|=", re.IGNORECASE)


class NumberMatch(NamedTuple):
    value: Fraction
    text: str  # as written in the output
    rule: str  # how it was chosen, for the reason string


def _digits(s: str) -> int:
    return int("".join(str(unicodedata.digit(ch)) for ch in s))  # any script's digits, no separators


def _parse(m: re.Match) -> Fraction | None:
    if m.group("bare") is not None:
        value = Fraction(_digits(m.group("bare")), 10 ** len(m.group("bare")))
    else:
        value = Fraction(_digits(re.sub(r"\D", "", m.group("int"))))
        if m.group("frac"):
            value += Fraction(_digits(m.group("frac")), 10 ** len(m.group("frac")))
    if m.group("den") is not None:
        den = _digits(m.group("den"))
        if den == 0:
            return None
        value /= den
    if "-" in (m.group("sign") + m.group("sign2")) or "\u2212" in (m.group("sign") + m.group("sign2")):
        value = -value
    return value


def find_numbers(text: str) -> list[tuple[int, Fraction, str]]:
    """(start, value, as written) of every number in `text`, in order."""
    out = []
    for m in _NUMBER.finditer(text):
        value = _parse(m)
        if value is not None:
            out.append((m.start(), value, m.group(0)))
    return out


def extract_number(text: str) -> NumberMatch | None:
    """The number an output commits to (module docstring), or None when it holds none."""
    numbers = find_numbers(text)
    if not numbers:
        return None
    markers = list(_MARKER.finditer(text))
    if markers:
        last = markers[-1]
        after = [n for n in numbers if n[0] >= last.end()]
        if after:
            return NumberMatch(after[0][1], after[0][2], f"first number after {last.group(0).strip()!r}")
    return NumberMatch(numbers[-1][1], numbers[-1][2], "last number")


def _fmt(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):g}"


def numbers_equal(a: Fraction, b: Fraction, abs_tol: float = 1e-9, rel_tol: float = 0.0) -> bool:
    diff = abs(a - b)
    return diff <= Fraction(abs_tol) or diff <= Fraction(rel_tol) * abs(b)


# --------------------------------------------------------------------------------------------------
# The graders


def _norm_opts(ignore_case=True, ignore_punctuation=True, ignore_articles=True) -> dict:
    return {"ignore_case": bool(ignore_case), "ignore_punctuation": bool(ignore_punctuation),
            "ignore_articles": bool(ignore_articles)}


def grade_exact(output: str, answers: Sequence[str], **opts) -> Grade:
    if not output.strip():
        return Grade(0.0, "empty output")
    if not answers:
        return Grade(0.0, "the sample has no answer to compare with")
    for form, used in _normalized_answers(answers, _norm_opts(**opts)):
        if normalize_text(output, **used) == form:
            return Grade(1.0, f"exact match with {form!r}")
    got = normalize_text(output, **_norm_opts(**opts))
    return Grade(0.0, f"{_short(got)!r} matches none of {_short(' | '.join(answers))!r}")


def grade_contains(output: str, answers: Sequence[str], require_all: bool = False, **opts) -> Grade:
    if not output.strip():
        return Grade(0.0, "empty output")
    if not answers:
        return Grade(0.0, "the sample has no answer to look for")
    found, missing = [], []
    for form, used in _normalized_answers(answers, _norm_opts(**opts)):
        (found if f" {form} " in f" {normalize_text(output, **used)} " else missing).append(form)
    ok = not missing if require_all else bool(found)
    if ok:
        return Grade(1.0, f"contains {', '.join(map(repr, found))}")
    want = "all of" if require_all else "none of"
    return Grade(0.0, f"output lacks {want} {', '.join(map(repr, missing))}" if require_all
                 else f"output contains {want} {', '.join(map(repr, missing))}")


def grade_numeric(output: str, answers: Sequence[str], abs_tol: float = 1e-9, rel_tol: float = 0.0) -> Grade:
    if not output.strip():
        return Grade(0.0, "empty output")
    got = extract_number(output)
    if got is None:
        return Grade(0.0, f"no number in the output {_short(output)!r}")
    wanted = []
    for answer in answers:
        ref = extract_number(answer)
        if ref is None:
            raise TaskError(f"answer {answer!r} holds no number; the numeric grader needs numeric answers")
        wanted.append(ref.value)
        if numbers_equal(got.value, ref.value, abs_tol, rel_tol):
            return Grade(1.0, f"{got.text.strip()!r} ({got.rule}) = {_fmt(ref.value)}")
    if not wanted:
        return Grade(0.0, "the sample has no answer to compare with")
    return Grade(0.0, f"{got.text.strip()!r} ({got.rule}) != {' | '.join(map(_fmt, wanted))}")


def grade_regex(output: str, answers: Sequence[str], pattern: str, group: int | str | None = None,
                match: str = "first", compare: str = "exact", ignore_case: bool = False,
                abs_tol: float = 1e-9, rel_tol: float = 0.0) -> Grade:
    if not output.strip():
        return Grade(0.0, "empty output")
    rx = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    found = list(rx.finditer(output))
    if not found:
        return Grade(0.0, f"pattern {pattern!r} does not match the output {_short(output)!r}")
    m = found[0] if match == "first" else found[-1]
    if group is None:
        group = 1 if rx.groups else 0
    captured = m.group(group)
    if captured is None:
        return Grade(0.0, f"pattern matched {_short(m.group(0))!r} but group {group!r} captured nothing")
    if compare == "match":
        return Grade(1.0, f"pattern matched {_short(captured)!r}")
    if compare == "numeric":
        g = grade_numeric(captured, answers, abs_tol=abs_tol, rel_tol=rel_tol)
    else:
        g = grade_exact(captured, answers)
    return Grade(g.score, f"captured {_short(captured)!r}: {g.reason}")


def _short(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Custom graders: module:function

_LOADED: dict[tuple[str, str], Callable] = {}


def _import_module(module_name: str, ref: str, base_dir: Path | None):
    local = base_dir / (module_name.replace(".", "/") + ".py") if base_dir else None
    if local is not None and local.is_file():
        # A grader next to the task file: loaded under a private name so it cannot shadow a real module.
        private = "muse_task_grader_" + hashlib.sha256(str(local.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(private, local)
        module = importlib.util.module_from_spec(spec)
        sys.modules[private] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[private]
            raise GraderError(f"importing {local} for grader '{ref}' raised {type(e).__name__}: {e}") from None
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            where = f" or next to the task file ({base_dir})" if base_dir else ""
            raise GraderError(
                f"cannot import module '{module_name}' for grader '{ref}': no such module; put "
                f"{module_name.replace('.', '/')}.py on PYTHONPATH{where}"
            ) from None
        raise GraderError(f"importing '{module_name}' for grader '{ref}' failed: {e}") from None
    except Exception as e:
        raise GraderError(f"importing '{module_name}' for grader '{ref}' raised {type(e).__name__}: {e}") from None


def load_python_grader(ref: str, base_dir: str | Path | None = None, options: dict | None = None) -> Callable:
    """The function named by 'module:function', checked to accept fn(output, sample, **options).

    `module` is looked up first as `<base_dir>/<module>.py` (a grader shipped next to its task file),
    then on sys.path. GraderError says what is wrong: the form, the import, the name or the signature.
    """
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise GraderError(f"a python grader is named 'module:function' (e.g. 'mygraders:grade'), got {ref!r}")
    base_dir = Path(base_dir) if base_dir is not None else None
    key = (ref, str(base_dir))
    if key in _LOADED:
        return _LOADED[key]
    module_name, fn_name = ref.split(":")
    module = _import_module(module_name, ref, base_dir)
    fn = getattr(module, fn_name, None)
    if fn is None:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise GraderError(f"module '{module_name}' has no function '{fn_name}'.{closest(fn_name, names)}")
    if not callable(fn):
        raise GraderError(f"'{ref}' is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind("output", Sample(id="x"), **(options or {}))
    except TypeError as e:
        raise GraderError(
            f"'{ref}' cannot be called as {fn_name}(output, sample{', **options' if options else ''}) ({e}); "
            "a grader takes the output text and the Sample and returns a score, a bool or (score, reason)"
        ) from None
    except ValueError:
        pass  # builtins without a signature: the call will tell
    _LOADED[key] = fn
    return fn


def _as_grade(value, ref: str) -> Grade:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        score, reason = value
    elif isinstance(value, (bool, int, float)):
        score, reason = value, f"{ref} returned {value!r}"
    else:
        raise GraderError(f"grader '{ref}' returned {type(value).__name__}; return a float, a bool or (score, reason)")
    if isinstance(score, bool):
        score = 1.0 if score else 0.0
    if not isinstance(score, (int, float)) or not math.isfinite(score):
        raise GraderError(f"grader '{ref}' returned the score {score!r}; a score is a finite number")
    return Grade(float(score), reason)


# --------------------------------------------------------------------------------------------------
# Checking a spec (at load time) and grading a sample

_OPTIONS = {
    "exact": {"ignore_case", "ignore_punctuation", "ignore_articles"},
    "contains": {"ignore_case", "ignore_punctuation", "ignore_articles", "require_all"},
    "numeric": {"abs_tol", "rel_tol"},
    "regex": {"pattern", "group", "match", "compare", "ignore_case", "abs_tol", "rel_tol"},
    "judge": {"rubric", "scale"},
}


def check_grader(spec: GraderSpec, base_dir: str | Path | None = None) -> None:
    """TaskError/GraderError now, at load time, for a spec that would fail on the first sample."""
    if spec.type not in GRADERS:
        raise TaskError(f"unknown grader {spec.type!r}.{closest(spec.type, GRADERS)} Graders: {', '.join(GRADERS)}")
    opts = dict(spec.options)
    if spec.type == "python":
        if "function" not in opts:
            raise TaskError("a python grader needs function = 'module:function'")
        load_python_grader(opts.pop("function"), base_dir, opts)
        return
    unknown = sorted(set(opts) - _OPTIONS[spec.type])
    if unknown:
        raise TaskError(f"grader {spec.type!r} has no option {unknown[0]!r}.{closest(unknown[0], _OPTIONS[spec.type])} "
                        f"Options: {', '.join(sorted(_OPTIONS[spec.type]))}")
    for key in ("abs_tol", "rel_tol"):
        if key in opts and (not isinstance(opts[key], (int, float)) or isinstance(opts[key], bool) or opts[key] < 0):
            raise TaskError(f"grader option {key} must be a number >= 0, got {opts[key]!r}")
    if spec.type == "regex":
        if not isinstance(opts.get("pattern"), str):
            raise TaskError("a regex grader needs pattern = '...' (a Python regular expression)")
        try:
            rx = re.compile(opts["pattern"])
        except re.error as e:
            raise TaskError(f"regex grader pattern {opts['pattern']!r} does not compile: {e}") from None
        if opts.get("match", "first") not in ("first", "last"):
            raise TaskError(f"regex grader option match must be 'first' or 'last', got {opts['match']!r}")
        if opts.get("compare", "exact") not in ("exact", "numeric", "match"):
            raise TaskError(f"regex grader option compare must be exact, numeric or match, got {opts['compare']!r}")
        group = opts.get("group")
        if isinstance(group, int) and not 0 <= group <= rx.groups:
            raise TaskError(f"regex grader group {group} does not exist; the pattern has {rx.groups} group(s)")
    if spec.type == "judge":
        from muse.tasks.judge import check_judge_options

        check_judge_options(opts)


def grade_output(spec: GraderSpec, output: str, sample: Sample, ask: Callable[[str], str] | None = None,
                 base_dir: str | Path | None = None) -> Grade:
    """Score one output of one sample with `spec`."""
    opts = dict(spec.options)
    answers = sample.answer
    if spec.type == "exact":
        return grade_exact(output, answers, **opts)
    if spec.type == "contains":
        return grade_contains(output, answers, **opts)
    if spec.type == "numeric":
        return grade_numeric(output, answers, **opts)
    if spec.type == "regex":
        return grade_regex(output, answers, **opts)
    if spec.type == "python":
        ref = opts.pop("function")
        fn = load_python_grader(ref, base_dir, opts)
        return _as_grade(fn(output, sample, **opts), ref)
    if spec.type == "judge":
        from muse.tasks.judge import grade_judge

        return grade_judge(output, sample, ask, **opts)
    raise TaskError(f"unknown grader {spec.type!r}.{closest(spec.type, GRADERS)}")


def grade_sample(task: Task, sample: Sample, output: str, ask: Callable[[str], str] | None = None) -> Grade:
    """Score `output` for `sample` with the task's grader (generate and chat tasks)."""
    if task.grader is None:
        raise TaskError(f"task '{task.name}' ({task.kind}) has no grader; only generate and chat tasks are graded")
    return grade_output(task.grader, output, sample, ask=ask, base_dir=task.base_dir)
