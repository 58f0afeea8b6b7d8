"""bench/grpo.py: the time-fitted schedule, every arm end to end on a tiny run, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench_kit import load_bench
from muse.train.schedule import ScheduleConfig, lr_multiplier

pytestmark = pytest.mark.usefixtures("one_thread")


def _bench():
    return load_bench("grpo")


class _FakeLoop:
    """What train_sized touches of a TrainLoop: objective.next_batch, schedule, optimizer.set_lr_multiplier,
    train(). Each step sets the lr from its step-sized schedule and then takes its batch, as the loop does,
    and lasts `cost(s)` seconds of a fake clock; `lrs` are the multipliers the steps trained with."""

    def __init__(self, clock: list[float], steps: int, cost):
        self.objective = SimpleNamespace(next_batch=lambda: None)
        self.schedule = ScheduleConfig(kind="wsd", decay_frac=0.5, total_steps=100_000)
        self.optimizer = SimpleNamespace(set_lr_multiplier=lambda m: setattr(self, "m", m))
        self.clock, self.steps, self.cost, self.lrs = clock, steps, cost, []

    def train(self):
        for s in range(self.steps):
            self.optimizer.set_lr_multiplier(lr_multiplier(s, self.schedule))
            self.objective.next_batch()
            self.lrs.append(self.m)
            self.clock[0] += self.cost(s)
        return "done"


def test_the_schedule_is_laid_over_the_time_budget(monkeypatch):
    bench = _bench()
    clock = [100.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    # 1 s a step, a 10 s budget: wsd's decay is the last 5 s, linear to 0 at 10 s
    loop = _FakeLoop(clock, 10, lambda s: 1.0)
    assert bench.train_sized(loop, 10.0, 0) == "done"
    assert loop.lrs == pytest.approx([1, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2])
    # steps that slow down (4 x 1 s, then 2 s each): the lr follows the clock, not the step count
    clock[0] = 0.0
    loop = _FakeLoop(clock, 12, lambda s: 1.0 if s < 4 else 2.0)  # starts at 0, 1, 2, 3, 4, 6, ..., 18 s of 20
    bench.train_sized(loop, 20.0, 0)
    want = [1.0 if t <= 10 else (20 - t) / 10 for t in (0, 1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18)]
    assert loop.lrs == pytest.approx(want)
    # past the budget (the loop stops after the step that ran out): the decay's end, 0
    clock[0] = 0.0
    loop = _FakeLoop(clock, 3, lambda s: 5.0)
    bench.train_sized(loop, 5.0, 0)
    assert loop.lrs == pytest.approx([1.0, 0.0, 0.0], abs=1e-5)
    # a step count given: the loop's own schedule, untouched
    loop = _FakeLoop(clock, 3, lambda s: 1.0)
    bench.train_sized(loop, 1.0, 3)
    assert loop.lrs == [1.0, 1.0, 1.0]


@pytest.fixture(scope="module")
def sft_ckpt(tiny_run_with_model):
    """(a tiny 'SFT' checkpoint, its run's data/): 2 layers, width 64, context 256, the run's tokenizer."""
    run, ckpt = tiny_run_with_model("bench_grpo", "sft", 5)
    return ckpt, run / "data"


def _argv(sft_ckpt, out: Path, *extra: str) -> list[str]:
    ckpt, data = sft_ckpt
    return ["--sft", str(ckpt), "--data", str(data), "--out", str(out), "--task", "arithmetic_1digit",
            "--threads", "1", "--limit", "3", "--group-size", "2", "--prompts-per-step", "2", *extra]


def test_the_arms_end_to_end_on_a_tiny_run(sft_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MUSE_NO_PROGRESS", "1")
    out = tmp_path / "out"
    code = _bench().main(_argv(sft_ckpt, out, "--arms", "baseline,grpo,sft,headroom,eval", "--grpo-steps", "2",
                               "--sft-steps", "2", "--minutes", "5", "--headroom-limit", "2", "--headroom-k", "3",
                               "--grpo-set", "max_new_tokens=8", "--grpo-set", "drop_equal_groups=true",
                               "--batch-tokens", "1024", "--score-samples", "3"))
    stdout, err = capsys.readouterr()
    assert code == 0, err
    h = json.loads((out / "headroom.json").read_text())
    assert h["n"] == 2 and h["k"] == 3 and 0 <= h["sampled_pass1"] <= h["pass@3"] <= 1
    base = json.loads((out / "baseline.json").read_text())
    assert h["greedy_pass1"] == pytest.approx(sum(base["items"][:2]) / 2)  # the same scorer on the first 2 items
    # every checkpoint's sampled score: k replies an item, item i seeded seed + i whatever the batch, so the
    # headroom arm's first 2 items are the baseline's
    sb = base["sampled"]
    assert sb["k"] == 3 and sb["n"] == 3 and len(sb["items"]) == 3 and all(r in (0, 1 / 3, 2 / 3, 1) for r in sb["items"])
    assert sb["pass1"] == pytest.approx(sum(sb["items"]) / 3) and sb["pass1"] <= sb["pass@3"]
    assert h["sampled_pass1"] == pytest.approx(sum(sb["items"][:2]) / 2)
    summary = json.loads(stdout[:stdout.index("\n| arm |")])
    grpo, sft = summary["arms"]["grpo"], summary["arms"]["sft"]
    assert grpo["steps"] == 2 and sft["steps"] == 2
    assert grpo["settings"]["schedule"] == "wsd (decay 0.5) over 2 steps" and grpo["settings"]["drop_equal_groups"]
    assert sft["settings"]["schedule"] == "wsd (decay 0.5) over 2 steps"
    assert grpo["n"] == sft["n"] == 3 and "rs" not in summary["arms"]
    assert "| GRPO |" in stdout and "| A: SFT continued |" in stdout
    assert grpo["sampled"]["k"] == 3 and "gain_pts" in grpo["sampled"] and "sampled pass@1 (k=3, T=1.0)" in stdout
    assert sft["final_val"]["step"] == 2 and "val_loss" in sft["final_val"]  # control A's last validation losses
    ev = summary["muse_eval"]  # the same checkpoints through `muse eval`, greedy and --samples 3
    assert set(ev) == {"baseline", "grpo", "sft"} and ev["grpo"]["n"] == 3
    assert ev["baseline"]["value"] == pytest.approx(base["pass1"])  # greedy: the same replies as taskscore's
    smp = ev["grpo"]["sampled"]
    metric = ev["grpo"]["metric"]
    assert smp["k"] == 3 and 0 <= smp[metric]["value"] <= smp["pass@3"]["value"] <= 1


def test_rejection_sampling_with_no_right_reply_is_a_one_line_error(sft_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MUSE_NO_PROGRESS", "1")
    # an untrained model answers no arithmetic question right: nothing to fine-tune on
    code = _bench().main(_argv(sft_ckpt, tmp_path / "out", "--arms", "rs", "--minutes", "0.02", "--rs-group", "2"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: rejection sampling: none of the") and "--rs-group" in err


@pytest.mark.parametrize("argv, needle", [
    (["--arms", "grpo,magic"], "--arms: unknown arm 'magic'"),
    (["--arms", "grpo", "--grpo-set", "group_size=1"], "group_size must be at least 2"),
    (["--arms", "grpo", "--train-skip", "5000"], "train_skip 5000 leaves no train prompt of arithmetic_1digit"),
    (["--arms", "rs", "--train-skip", "5000"], "--train-skip 5000 leaves no train prompt of arithmetic_1digit"),
])
def test_bad_options_are_one_line_errors(sft_ckpt, tmp_path, capsys, argv, needle):
    code = _bench().main(_argv(sft_ckpt, tmp_path / "out", *argv))
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and "\n" not in err and err.startswith("error: ")


def test_an_arm_fitted_to_its_minutes_decays_its_lr_on_the_real_loop(sft_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MUSE_NO_PROGRESS", "1")
    out = tmp_path / "out"
    code = _bench().main(_argv(sft_ckpt, out, "--arms", "sft", "--minutes", "0.05", "--batch-tokens", "512"))
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "sft.json").read_text())
    assert r["settings"]["schedule"] == "wsd (decay 0.5) fitted to the time" and r["steps"] >= 3
    from muse.train.metrics import read_metrics

    lrs = [row["lr"] for row in read_metrics(out / "sft_run" / "sft" / "metrics.jsonl") if "lr" in row]
    assert lrs[0] == pytest.approx(0.002) and lrs[-1] < 0.75 * lrs[0]  # decayed within the 3 s budget
    assert all(a >= b - 1e-12 for a, b in zip(lrs, lrs[1:]))


def test_control_a_continues_on_the_sft_mixture_when_given(sft_ckpt, tmp_path, capsys, monkeypatch):
    """--sft-mixture: control A trains on that mixture (the SFT checkpoint's own data), not the task's split."""
    monkeypatch.setenv("MUSE_NO_PROGRESS", "1")
    chats = tmp_path / "own.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                                                      {"role": "assistant", "content": f"{i + 1}"}]}) + "\n"
                             for i in range(30)))
    mixture = tmp_path / "own.toml"
    mixture.write_text(f'[[source]]\nfile = "{chats}"\nname = "own"\n')
    out = tmp_path / "out"
    code = _bench().main(_argv(sft_ckpt, out, "--arms", "sft", "--sft-steps", "2", "--batch-tokens", "512",
                               "--sft-mixture", str(mixture), "--sft-set", "eval_every=2"))
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "sft.json").read_text())
    assert r["steps"] == 2 and r["settings"]["mixture"] == str(mixture.resolve())
    from muse.train.metrics import read_metrics

    rows = read_metrics(out / "sft_run" / "sft" / "metrics.jsonl")
    assert any("val_loss_own" in row for row in rows) and not any("val_loss_arithmetic_1digit" in row for row in rows)
