"""Tasks a user writes by hand: a TOML file of settings naming JSONL sample files, or one JSONL file whose
first line is a `{"task": {...}}` header. docs/eval.md has the spec and a worked example
(tests/assets/tasks/ holds it, and the tests load it).

    capitals.toml                               capitals.jsonl
        name = "capitals"                           {"task": {"kind": "generate", "grader": "exact"}}
        kind = "generate"                           {"prompt": "Capital of France?", "answer": "Paris"}
        [splits]                                    {"prompt": "Capital of Peru?", "answer": "Lima"}
        test = "capitals_test.jsonl"
        train = "capitals_train.jsonl"
        [grader]
        type = "exact"

Paths inside a task file are relative to that file. Every sample file is read and checked when the task is
loaded, so a malformed row fails before any model runs; errors name the file and the line
(`capitals.jsonl:7: no 'answer' field. Did you mean: anwser?`). A python grader is imported at load time
too (it may live next to the task file). This module knows the file formats; the shapes and their checks
are spec.py's, the graders' options graders.py's.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

from muse.common.errors import closest
from muse.tasks.graders import check_grader
from muse.tasks.spec import (
    GRADERS,
    KINDS,
    SPLITS,
    FewShot,
    Generation,
    GraderSpec,
    Sample,
    Task,
    TaskError,
    TaskFileError,
    sample_from_dict,
)

TASK_SUFFIXES = (".toml", ".jsonl")
_TOP_KEYS = ("name", "kind", "description", "metrics", "system", "target_delimiter", "data", "chance",
             "grader", "generation", "fewshot", "splits", "overlap_expected", "overlap_whole_item")
_GENERATION_KEYS = ("max_tokens", "stop", "chat_stop", "temperature")
_FEWSHOT_KEYS = ("k", "seed", "split", "separator")
_RUN_SPLITS = ("train", "val")  # what `data` of a bpb task may name instead of a file


def _fail(where: str, msg: str) -> TaskFileError:
    return TaskFileError(f"{where}: {msg}")


def _check_keys(where: str, table: Mapping, allowed: tuple[str, ...], what: str) -> None:
    for key in table:
        if key not in allowed:
            raise _fail(where, f"unknown {what} {key!r}.{closest(key, allowed)} Allowed: {', '.join(allowed)}")


def _strings(where: str, value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, f"{what} must be a string or a list of strings, got {value!r}")
    return tuple(value)


def _int(where: str, value, what: str, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise _fail(where, f"{what} must be an integer >= {low}, got {value!r}")
    return value


def _str(where: str, value, what: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"{what} must be a string, got {value!r}")
    return value


def _grader(where: str, value) -> GraderSpec | None:
    """`grader = "exact"`, `grader = "mymodule:grade"` or a table with `type` and options."""
    if value is None:
        return None
    if isinstance(value, str):
        if ":" in value:
            return GraderSpec("python", {"function": value})
        return GraderSpec(value)
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise _fail(where, f"grader must be a name ({', '.join(GRADERS)}), 'module:function', or a table with "
                           f"type = '...' and its options; got {value!r}")
    opts = {k: v for k, v in value.items() if k != "type"}
    return GraderSpec(value["type"], opts)


def task_from_settings(settings: Mapping, where: str, base_dir: Path, default_name: str,
                       split_files: Mapping[str, Path], header: Path | None = None) -> Task:
    """A Task from a settings table (TOML top level or a JSONL header); `where` prefixes errors.

    `header` is the file whose first line holds these settings (a standalone .jsonl task); its samples
    start on the next line.
    """
    _check_keys(where, settings, _TOP_KEYS, "task setting")
    kind = settings.get("kind")
    if kind is None:
        raise _fail(where, f"no 'kind'; set kind to one of {', '.join(KINDS)}")
    if kind not in KINDS:
        hint = closest(kind, KINDS) if isinstance(kind, str) else ""
        raise _fail(where, f"unknown kind {kind!r}.{hint} Kinds: {', '.join(KINDS)}")
    name = settings.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise _fail(where, f"name must be a non-empty string, got {name!r}")

    gen = settings.get("generation", {})
    if not isinstance(gen, Mapping):
        raise _fail(where, "[generation] must be a table")
    _check_keys(where, gen, _GENERATION_KEYS, "[generation] key")
    generation = Generation(
        max_tokens=_int(where, gen.get("max_tokens", 256), "[generation] max_tokens", 1),
        stop=_strings(where, gen.get("stop", []), "[generation] stop"),
        chat_stop=_strings(where, gen.get("chat_stop", []), "[generation] chat_stop"),
        temperature=gen.get("temperature", 0.0),
    )
    if not isinstance(generation.temperature, (int, float)) or isinstance(generation.temperature, bool) \
            or generation.temperature < 0:
        raise _fail(where, f"[generation] temperature must be a number >= 0, got {generation.temperature!r}")
    shots = settings.get("fewshot", {})
    if not isinstance(shots, Mapping):
        raise _fail(where, "[fewshot] must be a table")
    _check_keys(where, shots, _FEWSHOT_KEYS, "[fewshot] key")
    fewshot = FewShot(
        k=_int(where, shots.get("k", 0), "[fewshot] k", 0),
        seed=_int(where, shots.get("seed", 1234), "[fewshot] seed", 0),
        split=_str(where, shots.get("split", "train"), "[fewshot] split"),
        separator=_str(where, shots.get("separator", "\n\n"), "[fewshot] separator"),
    )
    if fewshot.k and fewshot.split not in split_files:
        raise _fail(where, f"[fewshot] k = {fewshot.k} takes examples from the '{fewshot.split}' split, which this "
                           f"task does not have; add it under [splits] or set k = 0")

    grader = _grader(where, settings.get("grader"))
    if kind in ("generate", "chat") and grader is None:
        grader = GraderSpec("exact")
    if kind in ("bpb", "multiple_choice") and grader is not None:
        raise _fail(where, f"a {kind} task is scored by log-likelihood; remove its grader")
    if grader is not None:
        try:
            check_grader(grader, base_dir)
        except TaskError as e:
            raise _fail(where, str(e)) from None

    data = settings.get("data")
    if kind == "bpb":
        data = _str(where, data or "val", "data")
        if data not in _RUN_SPLITS:
            path = base_dir / data
            if not path.is_file():
                raise _fail(where, f"data = {data!r}: no such file ({path}); name a text file or 'train'/'val'")
            data = str(path)
    elif data is not None:
        raise _fail(where, f"'data' is for bpb tasks; a {kind} task reads its samples from [splits]")
    if kind != "bpb" and "test" not in split_files:
        raise _fail(where, "no test split; name its JSONL file under [splits] test = '...'")
    chance = settings.get("chance")
    if chance is not None and (not isinstance(chance, (int, float)) or isinstance(chance, bool) or not 0 <= chance <= 1):
        raise _fail(where, f"chance must be a number in [0, 1], got {chance!r}")

    for key in ("description", "system", "target_delimiter", "overlap_expected"):
        if key in settings:
            _str(where, settings[key], key)
    metrics = settings.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise _fail(where, f"metrics must be a list of names, got {metrics!r}")
    needs_answer = grader is None or grader.type not in ("judge", "python")
    loaded = {split: read_samples(path, kind, needs_answer, skip_header=path == header)
              for split, path in split_files.items()}
    return Task(
        name=name.strip(), kind=kind, description=str(settings.get("description", "")), grader=grader,
        generation=generation, fewshot=fewshot, metrics=tuple(metrics),
        target_delimiter=settings.get("target_delimiter", " "), system=settings.get("system"), data=data,
        chance=chance, overlap_expected=str(settings.get("overlap_expected", "")),
        overlap_whole_item=bool(settings.get("overlap_whole_item", False)), source=where,
        base_dir=base_dir, splits=tuple(loaded), loader=loaded.__getitem__ if loaded else None,
    )


def _split_files(where: str, table, base_dir: Path) -> dict[str, Path]:
    if not isinstance(table, Mapping):
        raise _fail(where, "[splits] must be a table of split = 'file.jsonl'")
    files = {}
    for split, rel in table.items():
        if split not in SPLITS:
            raise _fail(where, f"unknown split {split!r}.{closest(split, SPLITS)} Splits: {', '.join(SPLITS)}")
        if not isinstance(rel, str):
            raise _fail(where, f"[splits] {split} must be a file name, got {rel!r}")
        path = base_dir / rel
        if not path.is_file():
            raise _fail(where, f"[splits] {split} = {rel!r}: no such file ({path})")
        files[split] = path
    return files


def _json_lines(path: Path):
    """(lineno, object) for each non-blank line; TaskFileError naming the line otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskFileError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except OSError as e:
        raise TaskFileError(f"cannot read {path}: {e.strerror or e}") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object") from None


def _is_header(obj) -> bool:
    return isinstance(obj, Mapping) and set(obj) == {"task"}


def read_samples(path: Path, kind: str, needs_answer: bool = True, skip_header: bool = False) -> list[Sample]:
    """Every sample of one JSONL file, checked; errors name the file and line."""
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for lineno, row in _json_lines(path):
        if _is_header(row):
            if skip_header and not samples and not seen:
                continue
            raise TaskFileError(f"{path}:{lineno}: a task header here; only the first line of a standalone "
                                ".jsonl task may be one, and a file named under [splits] holds samples only")
        try:
            sample = sample_from_dict(row, kind, f"{path.stem}:{lineno}", needs_answer)
        except ValueError as e:
            raise TaskFileError(f"{path}:{lineno}: {e}") from None
        if sample.id in seen:
            raise TaskFileError(f"{path}:{lineno}: id {sample.id!r} already used on line {seen[sample.id]}; ids must be unique")
        seen[sample.id] = lineno
        samples.append(sample)
    if not samples and kind != "bpb":
        raise TaskFileError(f"{path}: no samples; write one JSON object per line")
    return samples


def load_task_file(path: str | os.PathLike) -> Task:
    """A Task from `NAME.toml` or a `NAME.jsonl` with a header line; TaskFileError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such task file")
    base_dir = path.resolve().parent
    if path.suffix == ".toml":
        try:
            settings = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise TaskFileError(f"{path}: not valid TOML: {e}") from None
        files = _split_files(str(path), settings.get("splits", {}), base_dir)
        return task_from_settings(settings, str(path), base_dir, path.stem, files)
    if path.suffix == ".jsonl":
        first = next(_json_lines(path), None)
        if first is None or not _is_header(first[1]):
            line = first[0] if first else 1
            raise TaskFileError(f"{path}:{line}: a .jsonl task starts with a header line "
                                '{"task": {"kind": ..., ...}}; or write a .toml that names this file under [splits]')
        settings = first[1]["task"]
        if not isinstance(settings, Mapping):
            raise TaskFileError(f"{path}:{first[0]}: \"task\" must be an object of settings")
        where = f"{path}:{first[0]}"
        extra = _split_files(where, settings.get("splits", {}), base_dir)
        if "test" in extra:
            raise _fail(where, "the samples of this file are the test split; name only other splits in 'splits'")
        return task_from_settings(settings, where, base_dir, path.stem, {**extra, "test": path}, header=path)
    raise TaskFileError(f"{path}: a task file is {' or '.join(TASK_SUFFIXES)}, got {path.suffix or 'no suffix'!r}")
