"""bench/decode_bandwidth.py runs end to end on a tiny model and reports sane numbers (no timing asserts)."""

from __future__ import annotations

import json
import math

import pytest

from bench_kit import load_bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_decode_bandwidth_report(tmp_path):
    bench = load_bench("decode_bandwidth")
    out = tmp_path / "bw.json"
    assert bench.main(["--device", "cpu", "--depth", "2", "--d-model", "64", "--vocab-size", "512", "--prompt-len", "8",
                       "--max-tokens", "12", "--repeats", "1", "--copy-mib", "8", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    # every weight but the embedding matrix (the untied head included), one embedding row, and K/V of one
    # k/v head of 64 dims in 2 layers at the average context 8 + 12 / 2, all fp32
    from muse.model import ModelConfig, build_model

    model = build_model(ModelConfig(vocab_size=512, n_layer=2, d_model=64, n_head=1, n_kv_head=1, max_seq_len=36))
    weights = sum(p.numel() for n, p in model.named_parameters() if n != "tok_embeddings.weight") + 64
    assert report["bytes_per_token"] == 4 * (weights + 2 * 2 * 64 * 14)
    for name in ("engine", "generate"):
        row = report["rows"][name]
        assert row["tokens"] == 11  # 12 generated, the first comes with the prefill
        assert math.isfinite(row["fraction"]) and row["fraction"] > 0 and row["tok_s"] > 0
    assert report["copy_rate_gb_s"] > 0
