"""Corpus sources: each file type, the Shakespeare cleaning, and every bad input as a one-line CLI error."""

from __future__ import annotations

import json
import sys

import pytest

from muse.cli.main import main
from muse.common.errors import DataError, UsageError
from muse.data.sources import clean_play_markdown, load_corpus, load_paths, shakespeare_documents

TEXT_A = "The quick brown fox.\nJumps over the lazy dog.\n"
TEXT_B = "Second file, with some more words in it.\n"


def run_cli(capsys, *argv):
    code = main(["prepare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("muse prepare: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- file types -------------------------------------------------------------------------------------


def test_txt_and_md_files_are_one_document_each(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT_A)
    (tmp_path / "b.md").write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")  # BOM + CRLF
    corpus = load_paths([tmp_path / "a.txt", tmp_path / "b.md"])
    assert [d.text for d in corpus.documents] == [TEXT_A, "line one\nline two\n"]
    assert corpus.documents[0].name.endswith("a.txt")
    assert corpus.skipped == []


def test_jsonl_one_document_per_line_and_text_field(tmp_path):
    rows = [{"text": "first doc", "id": 1}, {"text": "second doc"}, {"body": "x", "text": "third"}]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # blank lines are fine
    docs = load_paths([p]).documents
    assert [d.text for d in docs] == ["first doc", "second doc", "third"]
    assert [d.name for d in docs] == [f"{p.name}:{i}" for i in (1, 2, 3)]
    q = tmp_path / "e.jsonl"
    q.write_text(json.dumps({"content": "hello"}) + "\n")
    assert [d.text for d in load_paths([q], text_field="content").documents] == ["hello"]


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["alpha beta", "gamma"], "n": [1, 2]}), p)
    docs = load_paths([p]).documents
    assert [d.text for d in docs] == ["alpha beta", "gamma"]
    assert docs[1].name == f"{p.name}:2"


def test_directory_is_walked_recursively_in_sorted_order(tmp_path):
    for rel, text in {"b/z.txt": "z", "b/a.md": "a", "a.txt": "top", "c/d/e.txt": "deep"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / "notes.csv").write_text("a,b")
    corpus = load_paths([tmp_path])
    assert [d.text for d in corpus.documents] == ["top", "a", "z", "deep"]
    assert corpus.ignored_files == 1  # notes.csv; the hidden directory is not entered at all


def test_same_file_twice_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT_A)
    assert len(load_paths([tmp_path / "a.txt", tmp_path]).documents) == 1


def test_binary_and_non_utf8_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text(TEXT_A)
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "ctrl.txt").write_bytes(bytes(range(1, 9)) * 10 + b"text")
    (tmp_path / "empty.txt").write_text("  \n")
    corpus = load_paths([tmp_path])
    assert [d.text for d in corpus.documents] == [TEXT_A]
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in corpus.skipped}
    assert reasons["nul.txt"].startswith("binary")
    assert reasons["ctrl.txt"].startswith("binary")
    assert reasons["latin1.txt"].startswith("not UTF-8")
    assert reasons["1 document"] == "empty"


def test_skipped_files_are_reported_by_the_cli(tmp_path, capsys):
    (tmp_path / "good.txt").write_text(TEXT_A * 20)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00\x01" * 10)
    code, out, err = run_cli(capsys, tmp_path, "--out", tmp_path / "run", "--vocab-size", 300, "--json")
    assert code == 0, err
    meta = json.loads(out)
    assert [s["path"] for s in meta["skipped"]] == [(tmp_path / "bad.txt").as_posix()]
    assert "skipped" in err and "bad.txt" in err


# --- the embedded corpus ----------------------------------------------------------------------------


def test_clean_play_markdown_rules():
    md = (
        "# Macbeth\n\n## ACT I\n\n### SCENE II. A camp near Forres.\n\n"
        "_Alarum within. Enter DUNCAN,\nmeeting a bleeding Sergeant_\n\n\n\n"
        "**DUNCAN**  \nWhat bloody man is that?  \nHe can report.\n\n"
        "**PAGE**  \n__\\[Aside]_  \nSo '\\--this, 1\\. and *Exit.*\n"
    )
    assert clean_play_markdown(md) == (
        "Macbeth\n\nACT I\n\nSCENE II. A camp near Forres.\n\n"
        "Alarum within. Enter DUNCAN,\nmeeting a bleeding Sergeant\n\n"
        "DUNCAN:\nWhat bloody man is that?\nHe can report.\n\n"
        "PAGE:\n[Aside]\nSo '--this, 1. and Exit.\n"
    )


def test_shakespeare_corpus_is_38_clean_plays_in_sorted_order():
    docs = shakespeare_documents()
    names = [d.name for d in docs]
    assert len(docs) == 38 and names == sorted(names)
    assert "tragedies/macbeth.md" in names
    macbeth = dict(docs)["tragedies/macbeth.md"]
    assert macbeth.startswith("Macbeth\n\nACT I\n\nSCENE I. A desert place.\n")
    assert "\nFirst Witch:\nWhen shall we three meet again\n" in macbeth
    for d in docs:
        assert "**" not in d.text and "_" not in d.text and "\\" not in d.text
        assert "\n\n\n" not in d.text and " \n" not in d.text
        assert d.text.endswith("\n") and not d.text.endswith("\n\n")
        assert not any(line.startswith("#") for line in d.text.splitlines())
    assert 4_500_000 < sum(len(d.text.encode()) for d in docs) < 5_500_000


def test_corpus_and_paths_are_exclusive_and_names_are_checked(tmp_path):
    with pytest.raises(UsageError, match="not both"):
        load_corpus([tmp_path], corpus="shakespeare")
    with pytest.raises(UsageError, match="Did you mean: shakespeare"):
        load_corpus(corpus="shakespear")


# --- bad input through the CLI: exit 2, one line, nothing written -----------------------------------


def _bad(tmp_path, capsys, inputs, *needles, extra=()):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *inputs, "--out", out, "--vocab-size", 300, *extra)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_nonexistent_path(tmp_path, capsys):
    _bad(tmp_path, capsys, [tmp_path / "nope.txt"], "nope.txt", "no such file")


def test_unsupported_extension(tmp_path, capsys):
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    _bad(tmp_path, capsys, [tmp_path / "data.csv"], "data.csv", "unsupported", ".jsonl")


def test_empty_file_and_empty_directory(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    _bad(tmp_path, capsys, [tmp_path / "empty.txt"], "no usable text", "empty")
    (tmp_path / "d").mkdir()
    _bad(tmp_path, capsys, [tmp_path / "d"], "no usable text", "no .txt")


def test_binary_only(tmp_path, capsys):
    (tmp_path / "x.txt").write_bytes(bytes(range(256)) * 4)
    _bad(tmp_path, capsys, [tmp_path / "x.txt"], "no usable text", "x.txt", "binary")


def test_invalid_utf8_only(tmp_path, capsys):
    (tmp_path / "x.md").write_bytes("na\xefve text".encode("latin-1"))
    _bad(tmp_path, capsys, [tmp_path / "x.md"], "x.md", "not UTF-8", "offset 2")


def test_jsonl_line_that_is_not_json(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n')
    _bad(tmp_path, capsys, [p], "d.jsonl:2", "not valid JSON")


def test_jsonl_missing_and_non_string_field(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": "close"}\n')
    _bad(tmp_path, capsys, [p], "d.jsonl:2", "no 'text' field", "Did you mean: txt")
    p.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": 3}\n')
    _bad(tmp_path, capsys, [p], "d.jsonl:3", "'text' is int")
    p.write_text('["a list"]\n')
    _bad(tmp_path, capsys, [p], "d.jsonl:1", "JSON object")


def test_parquet_missing_column_and_missing_pyarrow(tmp_path, capsys, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x"]}), p)
    _bad(tmp_path, capsys, [p], "d.parquet", "no 'text' column", "--text-field")
    pq.write_table(pa.table({"text": [1, 2]}), p)
    _bad(tmp_path, capsys, [p], "d.parquet", "not string")
    # without pyarrow: a None entry in sys.modules makes `import pyarrow.parquet` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    _bad(tmp_path, capsys, [p], "needs pyarrow", "pip install")


def test_bad_flags(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT_A)
    _bad(tmp_path, capsys, [tmp_path / "a.txt", "--corpus", "shakespeare"], "not both")
    _bad(tmp_path, capsys, ["--corpus", "shakspeare"], "unknown corpus", "shakespeare")
    _bad(tmp_path, capsys, [tmp_path / "a.txt"], "--val-fraction", extra=["--val-fraction", "1.5"])
    code, _, err = run_cli(capsys, tmp_path / "a.txt", "--out", tmp_path / "run", "--vocab-size", 100)
    assert_one_line_error(code, err, "272")
    assert not (tmp_path / "run" / "data").exists()


def test_load_corpus_raises_data_error_for_library_callers(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_corpus([tmp_path / "missing"])


def test_split_does_not_depend_on_where_the_corpus_lies(tmp_path):
    """Document names (which the train/val split hashes) are relative to the path given."""
    from muse.data.prepare import split_documents

    for where in ("a", "b/c"):
        d = tmp_path / where / "corpus"
        d.mkdir(parents=True)
        for i in range(20):
            (d / f"doc{i}.txt").write_text(f"document number {i}\n")
    split_a = split_documents(load_paths([tmp_path / "a" / "corpus"]).documents, 0.3, 0)
    split_b = split_documents(load_paths([tmp_path / "b" / "c" / "corpus"]).documents, 0.3, 0)
    assert [[d.name for d in part] for part in split_a] == [[d.name for d in part] for part in split_b]
    assert split_a[1] and split_a[0][0].name.startswith("corpus/")
