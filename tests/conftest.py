"""Shared fixtures: tiny made-up corpora and prepared run directories (no downloads, no real corpus)."""

from __future__ import annotations

import os
import random
import shutil

import pytest

os.environ.setdefault("MUSE_NO_PROGRESS", "1")

WORDS = ("the king queen lord lady love death night day sword crown heart blood fair foul sweet "
         "speak hear come go stay thou thee thy my your our noble gentle good ill grace honour").split()


def make_corpus(dirpath, n_docs: int = 12, words_per_doc: int = 400, seed: int = 0):
    """Write n_docs .txt files of pseudo-English into dirpath; deterministic for a seed."""
    rng = random.Random(seed)
    dirpath.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        lines = []
        for _ in range(words_per_doc // 8):
            speaker = rng.choice(["KING", "QUEEN", "LORD", "LADY"])
            lines.append(f"{speaker}: " + " ".join(rng.choice(WORDS) for _ in range(8)) + rng.choice([".", "!", "?", ","]))
        (dirpath / f"doc_{d:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dirpath


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and lose a lot on a loaded machine. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; the thread count is restored after the module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_run_template(tmp_path_factory):
    """A run directory with data/ prepared from a tiny corpus (vocab 320). Copy it; don't write into it."""
    from muse.cli.main import main

    root = tmp_path_factory.mktemp("tiny")
    corpus = make_corpus(root / "corpus")
    run = root / "run"
    assert main(["prepare", str(corpus), "--out", str(run), "--vocab-size", "320", "--val-fraction", "0.2"]) == 0
    return run


@pytest.fixture(scope="session")
def tiny_run_with_model(tiny_run_template, tmp_path_factory):
    """`make(name, stage, step)` -> (a copy of tiny_run_template, the checkpoint saved in it): a seeded tiny
    llama (2 layers, width 64, context 256) with the run's own tokenizer, as `stage`'s step `step`."""
    def make(name: str, stage: str, step: int):
        import torch

        from muse.checkpoint import save_checkpoint
        from muse.model import ModelConfig, build_model
        from muse.tokenizer import Tokenizer

        run = tmp_path_factory.mktemp(name) / "run"
        shutil.copytree(tiny_run_template, run)
        tok = Tokenizer.from_file(run / "data" / "tokenizer.json")
        torch.manual_seed(0)
        model = build_model(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=2, n_kv_head=1,
                                        max_seq_len=256, init_std=0.1))
        return run, save_checkpoint(run / stage, step, model=model, tokenizer=tok)
    return make


@pytest.fixture
def tiny_run(tiny_run_template, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_template, run)
    return run


@pytest.fixture(scope="session")
def tiny_tok():
    """A BPE tokenizer of 300 tokens trained on made-up verse (the server, engine and eval tests' own)."""
    from muse.tokenizer import train_bpe

    rng = random.Random(0)
    words = "the king queen lord lady love night day sword crown heart fair speak hear come go".split()
    return train_bpe([" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)], vocab_size=300)


@pytest.fixture(scope="session")
def save_tiny_checkpoint(tmp_path_factory, tiny_tok):
    """`save(name, **model_config)` -> a run directory `name` whose base stage holds a seeded tiny llama
    (2 layers, width 64, GQA, max_seq_len 128 unless overridden) with `tiny_tok`. Don't write into it."""
    def save(name: str, **overrides):
        import torch

        from muse.checkpoint import save_checkpoint
        from muse.model import ModelConfig, build_model

        torch.manual_seed(0)
        cfg = {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "max_seq_len": 128, "init_std": 0.1,
               **overrides}
        model = build_model(ModelConfig(vocab_size=tiny_tok.vocab_size, **cfg))
        root = tmp_path_factory.mktemp(name)
        save_checkpoint(root / name / "base", 1, model=model, tokenizer=tiny_tok)
        return root / name
    return save


@pytest.fixture(scope="session")
def tiny_checkpoint(save_tiny_checkpoint):
    """A saved tiny llama (2 layers, width 64, GQA, max_seq_len 128) with a BPE tokenizer of 300 tokens:
    the run directory `tiny` whose base stage holds it, for tests that load checkpoints by path (servers,
    engine processes). Don't write into it."""
    return save_tiny_checkpoint("tiny")


@pytest.fixture
def muse(capsys, tmp_path, monkeypatch):
    """Run `muse ...` in-process against a fresh serving database: returns (exit code, stdout, stderr)."""
    from muse.cli import main as cli_main

    monkeypatch.setenv("MUSE_SERVE_DB", str(tmp_path / "serve.sqlite3"))

    def run(*argv: str):
        capsys.readouterr()
        code = cli_main.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    run.db = tmp_path / "serve.sqlite3"
    return run
