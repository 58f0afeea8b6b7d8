"""A constitution: written principles, and the programmatic checks and fixes of those that have them.

    c = load_constitution()                        # the sample (constitutions/default.toml), or a path
    result = c.check("Thou art a villain, a villain", prompt="Who is Iago?")
    result.score, result.passed, result.failed     # share of checked principles met, all met?, names
    c.revise(text, prompt="Who is Iago?")          # the programmatic fixes of the failed principles

A constitution is a TOML file of `[[principle]]` tables (docs/posttrain.md, "Writing a constitution"):

    name = "my-rules"                     # optional; the file's stem otherwise
    [[principle]]
    name = "brief"                        # letters, digits, '_' and '-'; unique
    critique = "Is the response longer than it needs to be? Say which parts could go."
    revision = "Rewrite the response in at most 40 words."
    check = "word_count"                  # optional: a built-in check, or "module:function"
    fix = "truncate_words"                # optional: a built-in fix, or "module:function"
    options = { min_words = 3, max_words = 40 }   # optional: keyword arguments of the check and the fix

Instead of `check`, a principle may give a regular expression (Python syntax, searched in the
response): `must_match = '...'` (the principle holds when it matches) or `must_not_match = '...'` (when
it does not). A `must_not_match` principle may take `fix = "delete_matches"` (remove every match,
then tidy the spaces) or `fix = "delete_sentences"` (remove every sentence with a match). A principle without a check is for model critics only (critique and revision
prompts); the programmatic critic and the compliance task skip it.

A check is called as fn(text, **options) and returns a bool, a score in [0, 1], or (score, reason);
a principle is met when its score is 1. A check whose signature names a `prompt` parameter reads the
question too: it is called fn(text, prompt=..., **options), with the user's last message as `prompt`, so
it can tell an answer from a canned reply that would meet any reply-only rule (the built-in `on_topic`).
Checks of one argument keep working unchanged. `unless_prompt_matches = '...'` (a regex searched in the
prompt) limits any principle to the prompts it does not match: where it matches, the principle is met
(the sample's "do not introduce yourself unless asked who you are"); `if_prompt_matches` is its other
side, the principle applies only where the prompt matches ("asked who you are, say your name"). Principles that read the prompt are
left out of a verdict made without one (`check(text)`): they cannot be judged there.
A fix is fn(text, **options) -> str. Built-in checks: CHECKS; built-in fixes: FIXES. `module:function`
is imported like a task's python grader (graders.py): from a file next to the constitution first, then
from sys.path.

Errors: a missing field, an unknown key or check or fix, a bad regex, a function that does not import
are `ConstitutionError`s, one line naming the file and the principle.

This module knows text and TOML. It knows no model, critic or training: muse.posttrain.constitution
adds the critique/revision prompts and the reward function, muse.tasks.builtin.compliance the task.
It lives in muse.tasks because its checks are graders that evaluation and RL share.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muse.common.errors import DataError, closest

DEFAULT_CONSTITUTION = Path(__file__).with_name("constitutions") / "default.toml"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_PRINCIPLE_KEYS = ("name", "critique", "revision", "check", "must_match", "must_not_match", "unless_prompt_matches",
                   "if_prompt_matches", "fix", "options")
_PATTERN_FIXES = ("delete_matches", "delete_sentences")  # fixes that take the principle's must_not_match
_TOP_KEYS = ("name", "description", "principle")


class ConstitutionError(DataError):
    """A constitution file that cannot be used; the message names the file and the principle."""


# --------------------------------------------------------------------------------------------------
# Built-in checks and fixes: things a small chat model can be moved on, each checkable and fixable.

_END = re.compile(r"[.!?][\"')\]]*$")
_WORD = re.compile(r"[A-Za-z']+")
_ROMAN = re.compile(r"^[IVXLCDM]+$")


def _words(text: str) -> list[str]:
    return text.split()


def ends_sentence(text: str) -> bool | tuple[float, str]:
    """The reply ends with a full stop, '!' or '?' (closing quotes or brackets allowed after it)."""
    text = text.strip()
    if not text:
        return 0.0, "empty reply"
    if _END.search(text):
        return True
    return 0.0, f"ends with {text[-12:]!r}, not a full stop"


def end_sentence(text: str) -> str:
    """Cut after the last sentence end when that keeps at least half the text; else add a full stop."""
    text = text.strip()
    if not text or _END.search(text):
        return text
    last = max(text.rfind(p) for p in ".!?")
    if last >= len(text) // 2:
        return text[: last + 1]
    return text.rstrip(" ,;:-\u2014") + "."


def word_count(text: str, min_words: int = 0, max_words: int = 40) -> bool | tuple[float, str]:
    """Between `min_words` and `max_words` words. A minimum keeps a reply from meeting every other principle
    by saying nothing: DPO on a tiny model against a constitution without one learned to answer "." alone."""
    n = len(_words(text))
    if n < min_words:
        return 0.0, f"{n} words, fewer than {min_words}"
    return True if n <= max_words else (0.0, f"{n} words, more than {max_words}")


def truncate_words(text: str, max_words: int = 40) -> str:
    """The first `max_words` words, cut back to the last sentence end in them when there is one."""
    words = _words(text)
    if len(words) <= max_words:
        return text.strip()
    head = " ".join(words[:max_words])
    last = max(head.rfind(p) for p in ".!?")
    return head[: last + 1] if last > 0 else head


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s.strip()]


def _key(s: str) -> str:
    return " ".join(w.casefold() for w in _WORD.findall(s))


def no_repeats(text: str) -> bool | tuple[float, str]:
    """No word said twice in a row ("the the") and no sentence or line said twice."""
    words = [w.casefold().strip(".,;:!?\"'()") for w in _words(text)]
    for a, b in zip(words, words[1:]):
        if a and a == b:
            return 0.0, f"repeats the word {a!r}"
    seen = set()
    for s in _sentences(text):
        k = _key(s)
        if len(k.split()) >= 2 and k in seen:
            return 0.0, f"repeats {s.strip()[:40]!r}"
        seen.add(k)
    return True


def remove_repeats(text: str) -> str:
    """Drop a word said again right after itself, then every sentence or line said before."""
    out: list[str] = []
    for w in _words(text):
        if out and w.casefold().strip(".,;:!?\"'()") == out[-1].casefold().strip(".,;:!?\"'()"):
            out[-1] = w  # keep the later one: it may carry the sentence's punctuation
            continue
        out.append(w)
    kept, seen = [], set()
    for s in _sentences(" ".join(out)):
        k = _key(s)
        if len(k.split()) >= 2 and k in seen:
            continue
        seen.add(k)
        kept.append(s.strip())
    return " ".join(kept)


def _shouted(text: str, min_letters: int) -> list[str]:
    return [w for w in _WORD.findall(text) if len(w) >= min_letters and w.isupper() and not _ROMAN.match(w)]


def no_shouting(text: str, min_letters: int = 3) -> bool | tuple[float, str]:
    """No word of `min_letters` or more letters in capitals (roman numerals, as in Henry VI, allowed)."""
    loud = _shouted(text, min_letters)
    return True if not loud else (0.0, f"shouts {', '.join(loud[:3])}")


def unshout(text: str, min_letters: int = 3) -> str:
    """Words in capitals written in lower case, capitalised where they start a sentence."""
    def fix(m: re.Match) -> str:
        w = m.group(0)
        if len(w) < min_letters or not w.isupper() or _ROMAN.match(w):
            return w
        before = text[: m.start()].rstrip()
        return w.capitalize() if not before or before[-1] in ".!?" else w.lower()
    return _WORD.sub(fix, text)


def _tidy(text: str) -> str:
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([.,;:!?])", r"\1", text)
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())


def delete_matches(text: str, pattern: str) -> str:
    """Every match of `pattern` removed, spaces tidied; a reply that lost its opening starts with a capital."""
    out = _tidy(re.sub(pattern, " ", text))
    if out[:1].islower() and out[:1] != text.strip()[:1]:
        out = out[0].upper() + out[1:]
    return out


def delete_sentences(text: str, pattern: str) -> str:
    """Every sentence (or line) with a match of `pattern` removed; the rest kept in order."""
    return " ".join(s.strip() for s in _sentences(text) if not re.search(pattern, s))


# Words that say nothing about what a question is about: function words, greetings, politeness, and the
# verbs of asking ("tell me", "describe"). What is left of a question is its subject ("Who is Ophelia?":
# ophelia; "Give me some advice about love.": advice, love).
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing done down during each either else ever every few for from further
had has have having he her here hers herself him himself his how i if in into is it its itself just
least less let like made make many may me might mine more most much must my myself neither no nor not now
o of off often on once one only or other ought our ours ourselves out over own per quite rather really
same shall she should so some something such than that the their theirs them themselves then there
these they thing things this those though through thus to too under until up upon us very was we were
what whatever when where whether which while who whom whose why will with within without would ye yes
yet you your yours yourself yourselves thou thee thy thine art hath doth dost shalt wilt
hi hello hey dear please pray thanks thank kindly okay ok well oh ah good morrow morning evening day
quick question questions wondering wonder curious answer answers briefly brief short honest honestly
tell say said give gave describe explain write show know think want
""".split())


def _question_words(prompt: str) -> list[str]:
    """The content words of a question, in order: words not in STOPWORDS, and capitalised words of 4 or more
    letters inside a sentence whatever they are (titles: "As You Like It" gives "like"; not "The" of "The
    Tempest", which every reply has)."""
    out = []
    for m in _WORD.finditer(prompt):
        raw = m.group(0)
        w = raw.casefold().strip("'")
        w = w[:-2] if w.endswith("'s") else w
        before = prompt[: m.start()].rstrip()
        named = raw[:1].isupper() and len(w) >= 4 and before and before[-1] not in ".!?:"
        if len(w) >= 3 and (named or w not in STOPWORDS) and w not in out:
            out.append(w)
    return out


def _same_stem(a: str, b: str, min_letters: int) -> bool:
    """One word is the other plus an ending ("love"/"lovers", "jealous"/"jealousy"): a crude stemmer that
    needs no word list; `min_letters` keeps "art" from matching "artful"."""
    if a == b:
        return True
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    return len(short) >= min_letters and long_.startswith(short)


def on_topic(text: str, prompt: str, min_letters: int = 4) -> bool | tuple[float, str]:
    """The reply shares a content word with the question: the question's words less STOPWORDS (its names,
    nouns and verbs), matched whole or as one another's stem (`min_letters` or more letters). A question with
    no content word is met by any reply. A proxy, necessary and not sufficient: a reply that names nothing
    the question asks about does not take it up, whatever else it gets right (a canned reply, the
    answer to another question)."""
    wanted = _question_words(prompt)
    if not wanted:
        return True
    said = {w.casefold().strip("'").removesuffix("'s") for w in _WORD.findall(text)}
    if any(_same_stem(q, r, min_letters) for q in wanted for r in said):
        return True
    return 0.0, f"names nothing the question asks about ({', '.join(wanted[:4])})"


CHECKS: dict[str, Callable[..., Any]] = {
    "ends_sentence": ends_sentence,
    "word_count": word_count,
    "no_repeats": no_repeats,
    "no_shouting": no_shouting,
    "on_topic": on_topic,  # reads the prompt
}
FIXES: dict[str, Callable[..., str]] = {
    "end_sentence": end_sentence,
    "truncate_words": truncate_words,
    "remove_repeats": remove_repeats,
    "unshout": unshout,
    "delete_matches": delete_matches,  # for must_not_match principles
    "delete_sentences": delete_sentences,  # for must_not_match principles
}


def prompt_text(messages) -> str:
    """The user's last message in a conversation (what a reply answers): the `prompt` of prompt-reading
    checks. "" when there is none."""
    for m in reversed(list(messages)):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


# --------------------------------------------------------------------------------------------------
# The file format


@dataclass(frozen=True)
class CheckResult:
    principle: str
    score: float      # in [0, 1]; the principle is met at 1
    reason: str

    @property
    def passed(self) -> bool:
        return self.score >= 1.0


@dataclass(frozen=True)
class Verdict:
    """A response against every checked principle."""

    results: tuple[CheckResult, ...]

    @property
    def score(self) -> float:
        """The share of checked principles met (partial scores count as given); 1.0 with none checked."""
        return sum(r.score for r in self.results) / len(self.results) if self.results else 1.0

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[str]:
        return [r.principle for r in self.results if not r.passed]

    def reason(self) -> str:
        bad = [f"{r.principle}: {r.reason}" for r in self.results if not r.passed]
        return "; ".join(bad) if bad else f"meets all {len(self.results)} checked principles"


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    check: str | None = None           # a built-in name or "module:function"
    must_match: str | None = None
    must_not_match: str | None = None
    unless_prompt_matches: str | None = None  # a regex: where the prompt matches, the principle is met
    if_prompt_matches: str | None = None      # a regex: where the prompt does not match, the principle is met
    fix: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    _check_fn: Callable | None = field(default=None, repr=False, compare=False)
    _fix_fn: Callable | None = field(default=None, repr=False, compare=False)
    # whether the check / fix names a `prompt` parameter: read from their signatures once, not per call
    _check_takes_prompt: bool = field(init=False, repr=False, compare=False)
    _fix_takes_prompt: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_check_takes_prompt", _takes_prompt(self._check_fn))
        object.__setattr__(self, "_fix_takes_prompt", _takes_prompt(self._fix_fn))

    @property
    def checkable(self) -> bool:
        return self._check_fn is not None or self.must_match is not None or self.must_not_match is not None

    @property
    def fixable(self) -> bool:
        return self._fix_fn is not None

    @property
    def reads_prompt(self) -> bool:
        """Judged against the question too: a check that takes `prompt`, `unless_prompt_matches` or
        `if_prompt_matches`."""
        return (self.unless_prompt_matches is not None or self.if_prompt_matches is not None
                or self._check_takes_prompt)

    def run_check(self, text: str, prompt: str | None = None) -> CheckResult:
        if self.reads_prompt and prompt is None:
            raise ConstitutionError(f"principle '{self.name}' reads the prompt; check it with the prompt")
        if self.unless_prompt_matches is not None and re.search(self.unless_prompt_matches, prompt):
            return CheckResult(self.name, 1.0, "does not apply to this prompt")
        if self.if_prompt_matches is not None and not re.search(self.if_prompt_matches, prompt):
            return CheckResult(self.name, 1.0, "does not apply to this prompt")
        if self.must_match is not None:
            ok = re.search(self.must_match, text) is not None
            return CheckResult(self.name, float(ok), "matches" if ok else f"does not match {self.must_match!r}")
        if self.must_not_match is not None:
            m = re.search(self.must_not_match, text)
            return CheckResult(self.name, float(m is None), "no match" if m is None else f"has {m.group(0)[:30]!r}")
        extra = {"prompt": prompt} if self._check_takes_prompt else {}
        try:
            value = self._check_fn(text, **extra, **self.options)
        except Exception as e:  # a user's check: name it, not a traceback from inside it
            raise ConstitutionError(f"check '{self.check}' of principle '{self.name}' raised "
                                    f"{type(e).__name__}: {e}") from None
        return _as_result(self.name, value, self.check)

    def run_fix(self, text: str, prompt: str | None = None) -> str:
        opts = {"pattern": self.must_not_match} if self.fix in _PATTERN_FIXES else self._fix_options()
        if self._fix_takes_prompt:
            opts["prompt"] = prompt or ""
        out = self._fix_fn(text, **opts)
        if not isinstance(out, str):
            raise ConstitutionError(f"fix '{self.fix}' of principle '{self.name}' returned {type(out).__name__}, "
                                    "not the revised text")
        return out

    def _fix_options(self) -> dict:
        # A built-in fix takes only the options its signature names (a check may take more).
        try:
            params = inspect.signature(self._fix_fn).parameters
        except (TypeError, ValueError):
            return dict(self.options)
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return dict(self.options)
        return {k: v for k, v in self.options.items() if k in params}


def _takes_prompt(fn: Callable | None) -> bool:
    """Whether a check or fix names a `prompt` parameter (then it is passed the user's last message)."""
    if fn is None:
        return False
    try:
        return "prompt" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return False


def _as_result(name: str, value, ref: str | None) -> CheckResult:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        score, reason = value
    else:
        score, reason = value, ""
    if isinstance(score, bool):
        score = 1.0 if score else 0.0
    if isinstance(score, int):
        score = float(score)
    if not isinstance(score, float) or not math.isfinite(score) or not 0.0 <= score <= 1.0:
        raise ConstitutionError(f"check '{ref}' of principle '{name}' returned {value!r}; return a bool, a score "
                                "in [0, 1] or (score, reason)")
    return CheckResult(name, score, reason or ("met" if score >= 1.0 else "not met"))


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    path: Path | None = None
    sha256: str = ""
    description: str = ""

    @property
    def checked(self) -> tuple[Principle, ...]:
        return tuple(p for p in self.principles if p.checkable)

    def get(self, name: str) -> Principle:
        for p in self.principles:
            if p.name == name:
                return p
        names = [p.name for p in self.principles]
        raise ConstitutionError(f"{self.where}: no principle '{name}'.{closest(name, names)}")

    @property
    def where(self) -> str:
        return str(self.path) if self.path else f"constitution '{self.name}'"

    def _judged(self, prompt: str | None) -> tuple[Principle, ...]:
        return tuple(p for p in self.checked if prompt is not None or not p.reads_prompt)

    def check(self, text: str, prompt: str | None = None) -> Verdict:
        """Every checked principle against the reply `text` to the user's message `prompt` (prompt_text of a
        conversation). Without a prompt, the principles that read it are left out (module docstring)."""
        return Verdict(tuple(p.run_check(text, prompt) for p in self._judged(prompt)))

    def revise(self, text: str, prompt: str | None = None, passes: int = 2) -> str:
        """Apply the fixes of the failed principles, in file order, until nothing changes (at most `passes`
        rounds: one fix may undo another, e.g. cutting words removes a full stop)."""
        for _ in range(passes):
            before = text
            for p in self._judged(prompt):
                if p.fixable and not p.run_check(text, prompt).passed:
                    text = p.run_fix(text, prompt)
            if text == before:
                break
        return text

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path) if self.path else None, "sha256": self.sha256,
                "principles": [p.name for p in self.principles], "checked": [p.name for p in self.checked],
                "fixable": [p.name for p in self.principles if p.fixable],
                "reads_prompt": [p.name for p in self.checked if p.reads_prompt]}


# --------------------------------------------------------------------------------------------------
# Loading


def _load_function(ref: str, base_dir: Path | None, where: str, what: str) -> Callable:
    from muse.tasks.graders import _import_module
    from muse.tasks.spec import GraderError

    module_name, _, fn_name = ref.partition(":")
    if not module_name or not fn_name or ":" in fn_name:
        raise ConstitutionError(f"{where}: {what} {ref!r} is neither a built-in nor 'module:function'")
    try:
        module = _import_module(module_name, ref, base_dir)
    except GraderError as e:
        raise ConstitutionError(f"{where}: {what} {ref!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConstitutionError(f"{where}: {what} {ref!r}: module '{module_name}' has no function "
                                f"'{fn_name}'.{closest(fn_name, names)}")
    return fn


def _resolve(ref, table: Mapping[str, Callable], base_dir, where: str, what: str) -> Callable:
    if not isinstance(ref, str) or not ref:
        raise ConstitutionError(f"{where}: {what} must be a string, a built-in name or 'module:function'")
    if ref in table:
        return table[ref]
    if ":" not in ref:
        raise ConstitutionError(f"{where}: unknown {what} {ref!r}.{closest(ref, table)} Built-in: "
                                f"{', '.join(k for k in table)}; or 'module:function'")
    return _load_function(ref, base_dir, where, what)


def _principle(row, i: int, where: str, base_dir: Path | None) -> Principle:
    if not isinstance(row, Mapping):
        raise ConstitutionError(f"{where}: principle {i + 1} is not a table; write [[principle]] tables")
    name = row.get("name")
    at = f"{where}: principle {name!r}" if isinstance(name, str) and name else f"{where}: principle {i + 1}"
    for key in row:
        if key not in _PRINCIPLE_KEYS:
            raise ConstitutionError(f"{at}: unknown key {key!r}.{closest(key, _PRINCIPLE_KEYS)} "
                                    f"Keys: {', '.join(_PRINCIPLE_KEYS)}")
    for key in ("name", "critique", "revision"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ConstitutionError(f"{at}: missing field '{key}' (a non-empty string)")
    if not _NAME.match(name):
        raise ConstitutionError(f"{at}: a name is 1-64 letters, digits, '_' or '-'")
    options = row.get("options", {})
    if not isinstance(options, Mapping):
        raise ConstitutionError(f"{at}: options must be a table, e.g. options = {{ max_words = 40 }}")
    given = [k for k in ("check", "must_match", "must_not_match") if k in row]
    if len(given) > 1:
        raise ConstitutionError(f"{at}: give one of check, must_match, must_not_match, not {' and '.join(given)}")
    for key in ("must_match", "must_not_match", "unless_prompt_matches", "if_prompt_matches"):
        if key in row:
            if not isinstance(row[key], str) or not row[key]:
                raise ConstitutionError(f"{at}: {key} must be a non-empty regular expression")
            try:
                re.compile(row[key])
            except re.error as e:
                raise ConstitutionError(f"{at}: {key} {row[key]!r} is not a valid regular expression: {e}") from None
    for key in ("unless_prompt_matches", "if_prompt_matches"):
        if key in row and not given:
            raise ConstitutionError(f"{at}: {key} limits a check to some prompts; this principle has "
                                    "none (give check, must_match or must_not_match)")
    check_fn = _resolve(row["check"], CHECKS, base_dir, at, "check") if "check" in row else None
    if check_fn is not None:
        try:
            inspect.signature(check_fn).bind("text", **({"prompt": ""} if _takes_prompt(check_fn) else {}), **options)
        except TypeError as e:
            raise ConstitutionError(f"{at}: check {row['check']!r} cannot take options {dict(options)} ({e})") from None
        except ValueError:
            pass  # no signature to read (a builtin): the call will tell
    fix_fn = None
    if "fix" in row:
        if not given:
            raise ConstitutionError(f"{at}: a fix needs a check (check, must_match or must_not_match) to know "
                                    "when to apply")
        if row["fix"] in _PATTERN_FIXES and "must_not_match" not in row:
            raise ConstitutionError(f"{at}: fix '{row['fix']}' deletes the matches of must_not_match; this "
                                    "principle has none")
        fix_fn = _resolve(row["fix"], FIXES, base_dir, at, "fix")
    return Principle(name=name, critique=row["critique"].strip(), revision=row["revision"].strip(),
                     check=row.get("check"), must_match=row.get("must_match"),
                     must_not_match=row.get("must_not_match"), unless_prompt_matches=row.get("unless_prompt_matches"),
                     if_prompt_matches=row.get("if_prompt_matches"), fix=row.get("fix"), options=dict(options),
                     _check_fn=check_fn, _fix_fn=fix_fn)


def parse_constitution(text: str, where: str = "the constitution", path: Path | None = None) -> Constitution:
    """A Constitution from TOML text; ConstitutionError naming `where` and the principle otherwise."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConstitutionError(f"{where}: not valid TOML: {e}") from None
    for key in data:
        if key not in _TOP_KEYS:
            raise ConstitutionError(f"{where}: unknown key {key!r}.{closest(key, _TOP_KEYS)} "
                                    "A constitution has name, description and [[principle]] tables")
    rows = data.get("principle")
    if not isinstance(rows, list) or not rows:
        raise ConstitutionError(f"{where}: no principles; add [[principle]] tables with name, critique and revision")
    base_dir = path.parent if path is not None else None
    principles = [_principle(row, i, where, base_dir) for i, row in enumerate(rows)]
    seen: set[str] = set()
    for p in principles:
        if p.name in seen:
            raise ConstitutionError(f"{where}: principle '{p.name}' is defined twice")
        seen.add(p.name)
    name = data.get("name") or (path.stem if path is not None else "constitution")
    if not isinstance(name, str):
        raise ConstitutionError(f"{where}: name must be a string")
    return Constitution(name=name, principles=tuple(principles), path=path,
                        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                        description=str(data.get("description", "")))


def load_constitution(path: str | Path | None = None) -> Constitution:
    """The constitution at `path` (None: the sample that ships with Muse, DEFAULT_CONSTITUTION)."""
    p = Path(path) if path is not None else DEFAULT_CONSTITUTION
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConstitutionError(f"constitution {p} does not exist; pass a TOML file of [[principle]] tables") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConstitutionError(f"cannot read constitution {p}: {e}") from None
    return parse_constitution(text, str(p), p)
