"""The paired comparison of two models in `muse eval` (muse.eval.report.paired_comparison): the bootstrap
against a slow reference, the verdicts, bits per byte, what cannot be paired, and the report's table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from muse.eval.report import paired_comparison, paired_difference, paired_table, render_markdown


def slow_paired_difference(a, b, wa, wb, n_boot, seed, confidence):
    """The same statistic item by item in plain Python (the same resampled indices)."""
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    deltas = []
    for row in idx:
        sa = sum(a[i] for i in row) / sum(wa[i] for i in row)
        sb = sum(b[i] for i in row) / sum(wb[i] for i in row)
        deltas.append(sb - sa)
    deltas.sort()
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(deltas, [tail, 100 - tail])
    return sum(b) / sum(wb) - sum(a) / sum(wa), lo, hi


@pytest.mark.parametrize("weighted", [False, True])
def test_paired_difference_equals_a_slow_reference(weighted):
    rng = np.random.default_rng(3)
    a = rng.random(37).tolist()
    b = (np.asarray(a) + rng.normal(0.05, 0.1, 37)).tolist()
    wa = wb = rng.integers(50, 200, 37).tolist() if weighted else [1.0] * 37
    got = paired_difference(a, b, wa if weighted else None, wb if weighted else None, n_boot=200, seed=5)
    want = slow_paired_difference(a, b, wa, wb, 200, 5, 0.95)
    assert got == pytest.approx(want, abs=1e-12)


def test_pairing_sees_a_small_consistent_drop_that_separate_errors_hide():
    """200 items, 10 of them flipped from right to wrong: a 5-point drop, less than 2 separate standard
    errors (~3.5 points each), but every changed item moved the same way, so the paired interval excludes 0."""
    a = [1.0] * 120 + [0.0] * 80
    b = list(a)
    for i in range(10):
        b[i] = 0.0
    delta, lo, hi = paired_difference(a, b)
    separate = math.sqrt(0.6 * 0.4 / 200)
    assert delta == pytest.approx(-0.05) and abs(delta) < 2 * separate
    assert hi < 0 and lo < delta < hi
    assert paired_difference(a, a) == (0.0, 0.0, 0.0)


def test_paired_difference_refuses_what_cannot_be_paired():
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([1.0, 0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1.0], [0.0])


def _data(models, tasks):
    return {"models": {m: {} for m in models},
            "tasks": {t: {"kind": k, "primary": p, "higher_is_better": p != "bpb"} for t, (k, p) in tasks.items()}}


def _score_recs(values):
    return [{"id": f"s{i}", "failed": False, "scores": {"score": float(v)}} for i, v in enumerate(values)]


def test_paired_comparison_verdicts_bpb_and_skips():
    tasks = {"up": ("generate", "score"), "down": ("generate", "score"), "same": ("generate", "score"),
             "bpb": ("bpb", "bpb"), "other_tok": ("bpb", "bpb"), "missing": ("generate", "score")}
    data = _data(["sft", "dpo"], tasks)
    base = [1, 0] * 50
    bpb_base = [{"id": f"w{i}", "failed": False, "nll": 100.0 + i % 7, "bytes": 120} for i in range(40)]
    records = {
        ("sft", "up"): _score_recs(base), ("dpo", "up"): _score_recs([1] * 100),
        ("sft", "down"): _score_recs(base), ("dpo", "down"): _score_recs([0] * 100),
        ("sft", "same"): _score_recs(base), ("dpo", "same"): _score_recs(base[1:] + base[:1]),
        ("sft", "bpb"): bpb_base,
        # dpo: every window 2 nats worse, and one failed window that must be left out of both sides
        ("dpo", "bpb"): [{**r, "nll": r["nll"] + 2.0, "failed": i == 3} for i, r in enumerate(bpb_base)],
        ("sft", "other_tok"): bpb_base, ("dpo", "other_tok"): [{**r, "bytes": 130} for r in bpb_base],
        ("sft", "missing"): _score_recs(base),
    }
    paired = paired_comparison(data, records, n_boot=300)
    t = paired["tasks"]
    assert paired["baseline"] == "sft" and paired["confidence"] == 0.95
    assert t["up"]["dpo"]["verdict"] == "better" and t["up"]["dpo"]["delta"] == pytest.approx(0.5)
    assert t["down"]["dpo"]["verdict"] == "worse" and t["down"]["dpo"]["value"] == 0.0
    assert t["same"]["dpo"]["verdict"] == "no significant difference"  # same mean, every item changed
    b = t["bpb"]["dpo"]
    assert b["n"] == 39 and b["verdict"] == "worse"  # higher bits per byte is worse
    assert b["delta"] == pytest.approx(2.0 / math.log(2) / 120)
    assert b["baseline"] == pytest.approx(sum(r["nll"] for i, r in enumerate(bpb_base) if i != 3)
                                          / (math.log(2) * 120 * 39))
    assert "another tokenizer" in paired["skipped"]["other_tok"]["dpo"]
    assert paired["skipped"]["missing"]["dpo"] == "not scored by both"
    table = paired_table(paired)
    assert "| up | score | dpo | 0.5000 | 1.0000 | +0.5000 [" in table and "not compared" in table
    assert paired_comparison(_data(["only"], tasks), records) is None


def test_failed_samples_pair_as_zero_and_the_report_shows_the_table():
    data = {**_data(["a", "b"], {"gen": ("generate", "score")}),
            "settings": {"split": "test", "limit": None, "bootstrap": 1000}, "muse_version": "0", "created_at": "now",
            "results": {"gen": {"a": {"status": "ok", "n": 4, "n_failed": 0, "metrics": {}},
                                "b": {"status": "ok", "n": 4, "n_failed": 1, "metrics": {}}}}}
    data["models"] = {m: {"kind": "muse", "checkpoint": m, "style": "chat"} for m in ("a", "b")}
    data["tasks"]["gen"].update(metrics=["score"], chance=None)
    recs = {("a", "gen"): _score_recs([1, 1, 0, 1]),
            ("b", "gen"): _score_recs([1, 1, 0, 0])[:3] + [{"id": "s3", "failed": True, "scores": {"score": 0.0}}]}
    paired = paired_comparison(data, recs, n_boot=100)
    assert paired["tasks"]["gen"]["b"]["value"] == 0.5 and paired["tasks"]["gen"]["b"]["n"] == 4
    for r in data["results"]["gen"].values():
        r.update(tokens={"prompt": 0, "completion": 0}, requests={"sent": 0, "cached": 0}, time_s=0.0)
    md = render_markdown({**data, "paired": paired}, recs, [])
    assert "## Paired comparison with a" in md and "| gen | score | b |" in md


@pytest.mark.usefixtures("one_thread")
def test_cli_compares_two_models_in_pairs(tiny_checkpoint, tmp_path, capsys):
    """`muse eval` with two --models prints the paired table and writes it to results.json and report.md;
    a model compared with itself differs by exactly 0 everywhere."""
    from muse.cli.main import main
    from test_eval import write_tasks

    paths = write_tasks(tmp_path / "tasks")
    out = tmp_path / "out"
    code = main(["eval", "--model", f"A={tiny_checkpoint}", "--model", f"B={tiny_checkpoint}", "--tasks",
                 ",".join(str(p) for p in paths.values()), "--out", str(out), "--no-cache", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0 and "paired with A" in printed and "| mc | acc | B |" in printed
    paired = json.loads((out / "results.json").read_text())["paired"]
    assert set(paired["tasks"]) == {"mc", "gen", "texts"}
    for per_model in paired["tasks"].values():
        assert per_model["B"]["delta"] == 0 and per_model["B"]["verdict"] == "no significant difference"
    assert "## Paired comparison with A" in (out / "report.md").read_text()
