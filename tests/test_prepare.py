"""The prepare pipeline: stream layout vs a whole-document reference, determinism, reruns, --force, shards."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from muse.cli.main import main
from muse.common.errors import DataError, OutputExistsError
from muse.data.prepare import PrepareConfig, chunk_text, prepare, split_documents, tokenize_documents
from muse.data.shards import ShardWriter, open_shards, shard_infos, verify_shards
from muse.data.sources import Document, load_paths
from muse.tokenizer import Tokenizer, train_bpe

WORDS = "thou art the king of all that is and shall be my lord good night sweet prince 'tis 42 1999".split()


def made_up_text(rng: random.Random, n_lines: int) -> str:
    """Lines of random words with the whitespace shapes a tokenizer can trip on (blank runs, indents, trailing spaces)."""
    lines = []
    for _ in range(n_lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 9)))
        lines.append(rng.choice(["", "  ", "\t", "ÉLAN ", "\n", "\n\n", " \n"]) + words + rng.choice(["", ".", ",", " ", "  ", "!?"]))
    return "\n".join(lines) + rng.choice(["\n", "\n\n", ""])


@pytest.fixture
def corpus_dir(tmp_path):
    rng = random.Random(0)
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(8):
        (d / f"doc{i}.txt").write_text(made_up_text(rng, 60))
    return d


def cfg_for(corpus_dir, out, **kw):
    return PrepareConfig(out=str(out), paths=(str(corpus_dir),), vocab_size=320, **kw)


def files_of(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_stream_is_eot_then_each_document_encoded_whole(corpus_dir, tmp_path):
    meta = prepare(cfg_for(corpus_dir, tmp_path / "run"))
    data = tmp_path / "run" / "data"
    tok = Tokenizer.from_file(data / "tokenizer.json")
    train, val = split_documents(load_paths([corpus_dir]).documents, 0.05, 0)
    for split, docs in (("train", train), ("val", val)):
        want = np.concatenate([np.array([tok.eot_id] + tok.encode(d.text)) for d in docs])  # the slow reference
        got = np.concatenate(open_shards(data, split))
        np.testing.assert_array_equal(got, want)
        s = meta["splits"][split]
        assert s["documents"] == len(docs) == int((got == tok.eot_id).sum())
        assert s["tokens"] == len(got)
        assert s["bytes"] == sum(len(d.text.encode()) for d in docs)
        assert s["bytes_per_token"] == pytest.approx(s["bytes"] / s["tokens"], abs=1e-4)
    assert meta["splits"]["val"]["documents"] == 1  # 5% of 8 rounds to 0; at least one
    assert meta["vocab_size"] == tok.vocab_size and meta["dtype"] == "uint16" and meta["eot_id"] == 0


def test_chunked_encoding_equals_whole_encoding(corpus_dir):
    text = "".join(p.read_text() for p in sorted(corpus_dir.iterdir()))
    tok = train_bpe([text], 400)
    chunks = chunk_text(text, chunk_chars=50)
    assert len(chunks) > 20 and "".join(chunks) == text
    assert all(c.endswith("\n") for c in chunks[:-1])
    docs = [Document("a", text), Document("b", text[:777])]
    fast = np.concatenate(list(tokenize_documents(tok, docs, chunk_chars=50)))
    ref = [tok.eot_id] + tok.encode(text) + [tok.eot_id] + tok.encode(text[:777])
    np.testing.assert_array_equal(fast, ref)


def test_chunk_text_cuts_only_before_letters():
    text = "".join(f"a\n\n\n {i}\n \n\t\n" for i in range(30)) + "word\n" * 5
    pieces = chunk_text(text, 8)
    assert len(pieces) > 10 and "".join(pieces) == text
    for piece in pieces[1:]:
        assert piece[0].isalpha()
    assert chunk_text("no newline at all " * 10, 8) == ["no newline at all " * 10]


def test_split_is_deterministic_stable_and_never_empty():
    docs = [Document(f"doc{i}", f"text {i}") for i in range(40)]
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == 4 and len(train) == 36
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    assert split_documents(docs, 0.1, seed=1)[1] != val
    # a document's side is decided by its own name (hash), not by which other documents there are
    kept = val + train[:2]
    assert split_documents(kept, 4 / 6, seed=0)[1] == val
    assert len(split_documents(docs[:2], 0.01, 0)[1]) == 1  # >= 2 documents: at least one in val
    assert len(split_documents(docs[:3], 0.99, 0)[0]) == 1  # ... and at least one in train


def test_single_document_is_cut_at_a_line_start():
    text = "".join(f"line {i}\n" for i in range(100))
    (train,), (val,) = split_documents([Document("one.txt", text)], 0.1, 0)
    assert train.text + val.text == text
    assert val.text.startswith("line ") and train.text.endswith("\n")
    assert 0.05 < len(val.text) / len(text) < 0.15


def test_prepare_twice_is_byte_identical(corpus_dir, tmp_path):
    prepare(cfg_for(corpus_dir, tmp_path / "a"))
    prepare(cfg_for(corpus_dir, tmp_path / "b"))
    a, b = files_of(tmp_path / "a" / "data"), files_of(tmp_path / "b" / "data")
    assert set(a) == {"meta.json", "tokenizer.json", "train_000.bin", "train_000.json", "val_000.bin", "val_000.json"}
    assert a == b


def test_rerun_is_up_to_date_and_touches_nothing(corpus_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["prepare", str(corpus_dir), "--out", str(out), "--vocab-size", "320"]
    assert main(args) == 0
    assert "prepared" in capsys.readouterr().out
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == before


def test_other_inputs_need_force(corpus_dir, tmp_path, capsys):
    out = tmp_path / "run"
    first = prepare(cfg_for(corpus_dir, out))
    before = files_of(out / "data")
    for change in ({"seed": 1}, {"val_fraction": 0.3}):
        with pytest.raises(OutputExistsError, match="--force"):
            prepare(cfg_for(corpus_dir, out, **change))
    (corpus_dir / "doc0.txt").write_text("changed text\n" * 30)
    code = main(["prepare", str(corpus_dir), "--out", str(out), "--vocab-size", "320"])
    err = capsys.readouterr().err
    assert code == 2 and "--force" in err and "Traceback" not in err
    assert files_of(out / "data") == before  # untouched
    second = prepare(cfg_for(corpus_dir, out, force=True))
    assert second["fingerprint"] != first["fingerprint"] and not second["up_to_date"]
    assert json.loads((out / "data" / "meta.json").read_text())["fingerprint"] == second["fingerprint"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_damaged_data_is_detected(corpus_dir, tmp_path):
    out = tmp_path / "run"
    prepare(cfg_for(corpus_dir, out))
    (out / "data" / "val_000.bin").write_bytes(b"\x00\x00")
    with pytest.raises(OutputExistsError, match="damaged"):
        prepare(cfg_for(corpus_dir, out))
    assert not prepare(cfg_for(corpus_dir, out, force=True))["up_to_date"]
    verify_shards(out / "data", "val")


def test_reusing_a_tokenizer(corpus_dir, tmp_path, capsys):
    prepare(cfg_for(corpus_dir, tmp_path / "a"))
    tok_file = tmp_path / "a" / "data" / "tokenizer.json"
    other = tmp_path / "other.txt"
    other.write_text(made_up_text(random.Random(5), 80))
    code = main(["prepare", str(other), "--out", str(tmp_path / "b"), "--tokenizer", str(tok_file), "--json"])
    meta = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (tmp_path / "b" / "data" / "tokenizer.json").read_bytes() == tok_file.read_bytes()
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 1
    code = main(["prepare", str(other), "--out", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "none.json")])
    err = capsys.readouterr().err
    assert code == 2 and "no tokenizer file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_unwritable_output(corpus_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(["prepare", str(corpus_dir), "--out", str(blocker / "run"), "--vocab-size", "320"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write" in err and "Traceback" not in err


def test_shard_writer_splits_and_reads_back(tmp_path):
    tokens = np.arange(1000) % 500
    with ShardWriter(tmp_path, "train", vocab_size=500, max_tokens=300) as w:
        w.write(tokens[:10])
        w.write(tokens[10:])
    infos = shard_infos(tmp_path, "train")
    assert [i.count for i in infos] == [300, 300, 300, 100]
    arrays = open_shards(tmp_path, "train")
    assert all(a.dtype == np.uint16 for a in arrays)
    np.testing.assert_array_equal(np.concatenate(arrays), tokens)
    with ShardWriter(tmp_path, "big", vocab_size=70_000) as w:
        w.write([69_999, 0])
    assert open_shards(tmp_path, "big")[0].dtype == np.uint32
    with ShardWriter(tmp_path, "empty", vocab_size=500):
        pass
    assert len(open_shards(tmp_path, "empty")[0]) == 0
    with pytest.raises(ValueError, match="out of range"):
        ShardWriter(tmp_path, "bad", vocab_size=10).write([10])
    (tmp_path / "train_001.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="damaged"):
        open_shards(tmp_path, "train")
    with pytest.raises(DataError, match="muse prepare"):
        open_shards(tmp_path, "nosuchsplit")


@pytest.mark.slow
def test_shakespeare_end_to_end(tmp_path):
    meta = prepare(PrepareConfig(out=str(tmp_path / "demo")))
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["documents"] + val["documents"] == 38 and val["documents"] == 2
    assert meta["source"] == "shakespeare" and meta["dtype"] == "uint16"
    assert 3000 < meta["vocab_size"] <= 4096
    assert 3.0 < train["bytes_per_token"] < 4.0 and 3.0 < val["bytes_per_token"] < 4.0
    verify_shards(tmp_path / "demo" / "data", "train")
