"""bench/kv_placement.py runs end to end, and its two recorded runs differ only in where blocks go."""

from __future__ import annotations

import argparse

import pytest

from bench_kit import load_bench

pytestmark = pytest.mark.usefixtures("one_thread")


def _bench():
    return load_bench("kv_placement")


def test_placement_reads_more_adjacent_blocks_than_lru():
    bench = _bench()
    args = argparse.Namespace(seed=0, requests=24, vocab_size=512, concurrency=8)
    lru, placed = bench.record(args, placement=False), bench.record(args, placement=True)
    assert len(lru["steps"]) == len(placed["steps"])  # the same schedule, other block ids
    assert [len(s.requests) for s in lru["steps"]] == [len(s.requests) for s in placed["steps"]]
    assert placed["adjacent"] > lru["adjacent"]


def test_kv_placement_report(capsys):
    assert _bench().main(["--concurrency", "4", "--requests", "6", "--depth", "1", "--d-model", "64",
                          "--vocab-size", "512", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| placement |" in out and "forward speed-up of placement over LRU" in out
