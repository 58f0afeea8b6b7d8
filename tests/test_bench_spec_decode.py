"""bench/spec_decode.py runs end to end: prompts from a prepared run's validation split, a target and a
draft checkpoint, and every speculative row's greedy output equal to plain decoding's (no timing asserts)."""

from __future__ import annotations

import json

import pytest
import torch

from bench_kit import load_bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spec_decode_report(tiny_run, tmp_path):
    from muse.checkpoint import save_checkpoint
    from muse.model import ModelConfig, build_model
    from muse.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tiny_run / "data" / "tokenizer.json")
    for run, depth, seed in ((tiny_run, 2, 0), (tmp_path / "draft", 1, 1)):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(vocab_size=tok.vocab_size, n_layer=depth, d_model=64, n_head=2, n_kv_head=1,
                                        max_seq_len=96, init_std=0.2))
        save_checkpoint(run / "base", 1, model=model, tokenizer=tok)
    bench = load_bench("spec_decode")
    out = tmp_path / "sd.json"
    assert bench.main(["--target", str(tiny_run), "--draft", str(tmp_path / "draft"), "--device", "cpu",
                       "--prompts", "3", "--prompt-len", "16", "--max-tokens", "12", "--k", "2", "3",
                       "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"plain", "draft k=2", "ngram k=2", "draft k=3", "ngram k=3"}
    for label, r in rows.items():
        assert r["same_as_plain"] and r["tokens"] == 3 * 11, label  # 12 each, the first with the prefill
    assert rows["plain"]["acceptance"] is None                          # nothing was proposed
    assert all(0 <= rows[f"draft k={k}"]["acceptance"] <= 1 for k in (2, 3))  # a draft proposes every step
