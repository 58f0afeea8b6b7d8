"""bench/engine_vs_transformers.py runs end to end at a tiny size, and its identical-output check fails
when transformers runs other weights."""

from __future__ import annotations

import json

import pytest

from bench_kit import load_bench

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--depth", "1", "--vocab-size", "512", "--max-seq-len", "64", "--prompts", "3", "--prompt-len", "4", "8",
        "--uniform-len", "6", "--longtail-short", "1", "3", "--longtail-every", "2", "--batch1-prompts", "2",
        "--batch1-repeats", "1", "--json"]


def _bench():
    return load_bench("engine_vs_transformers")


def test_same_weights_give_identical_outputs(capsys):
    assert _bench().main(TINY) == 0
    (r,) = json.loads(capsys.readouterr().out)["results"]
    uniform, longtail = r["lengths"]
    assert uniform["output_tokens"] == 3 * 6 and uniform["identical"] and not uniform["first_mismatch"]
    assert longtail["longest"] == 6 and longtail["output_tokens"] < 3 * 6  # one long, two short
    for row in (uniform, longtail):
        assert row["engine_tok_s"] > 0 and row["engine_vs_hf_static"] > 0 and row["engine_vs_hf_one"] > 0
    assert r["batch1"]["identical"] and r["batch1"]["output_tokens"] == 2 * 6


def test_other_weights_fail_the_check(tmp_path, capsys):
    """transformers on a model of the same shape but another seed: every method but the engine differs."""
    from muse.checkpoint.hf_export import export_hf

    bench = _bench()
    other = bench.random_checkpoint(tmp_path / "other", 1, 512, 64, seed=1)
    export_hf(other, tmp_path / "hf", dtype="float32")
    assert bench.main(TINY + ["--hf-model", str(tmp_path / "hf"), "--batch1-prompts", "0"]) == 1
    out = capsys.readouterr()
    (r,) = json.loads(out.out)["results"]
    for row in r["lengths"]:
        assert not row["identical"] and set(row["first_mismatch"]) == {"hf_static", "hf_one"}
    assert "outputs differ" in out.err


def test_prompts_longer_than_the_model_are_refused(capsys):
    assert _bench().main(TINY + ["--uniform-len", "60"]) == 2
    assert "max_seq_len" in capsys.readouterr().err


def test_paired_replay_times_both_backends(capsys):
    """--paired-replay: every paged-decode step also through the reference; equal logits, a row per bucket."""
    argv = TINY[:-1] + ["--prompts", "4", "--attention-backend", "paged-decode", "--paired-replay"]
    assert _bench().main(argv) == 0
    out = capsys.readouterr().out
    assert "| uniform | all |" in out and "max abs logit difference" in out
