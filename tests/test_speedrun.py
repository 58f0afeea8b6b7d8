"""`muse speedrun` end to end on the real embedded corpus, shrunk to a few steps."""

import argparse
import json
import shutil

import pytest

from muse.cli.main import main

TINY = ["--depth", "1", "--max-steps", "4", "--device", "cpu", "--set", "seq_len=32", "--set", "batch_size=2",
        "--set", "eval_batches=1", "--set", "model.d_model=64", "--set", "model.n_head=2", "--max-tokens", "8",
        "--sft-steps", "0", "--eval-limit", "2"]


def run_with_sft(save_tiny_checkpoint, tmp_path):
    """A tiny run whose SFT stage is a copy of its base (for the stages that start from SFT)."""
    run = tmp_path / "run"
    shutil.copytree(save_tiny_checkpoint("tiny"), run, symlinks=True)
    shutil.copytree(run / "base", run / "sft", symlinks=True)
    return run


@pytest.mark.slow
def test_speedrun_writes_a_report_and_skips_finished_stages(tmp_path, capsys):
    out = tmp_path / "sr"
    assert main(["speedrun", "--out", str(out), *TINY, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    report = (out / "report.md").read_text()
    assert "unigram baseline" in report and "![loss curve](base/loss.png)" in report
    assert (out / "base" / "loss.png").exists()
    assert first["steps"] == 4 and first["unigram_bpb"] > 2 and first["val_bpb"] > 0
    assert first["dtype"].startswith(("bfloat16 autocast (auto: CPU with", "float32 (auto: CPU without"))
    assert f"| compute dtype | {first['dtype']} |" in report  # which dtype `auto` chose, and why
    assert report.count("```") == 8  # three samples and how to serve it
    assert "## Evaluation" in report and "| which_play | acc |" in report  # muse eval of the final model
    assert "| quote_completion | 1000 |" in report  # its contamination check
    assert json.loads((out / "eval" / "results.json").read_text())["settings"]["limit"] == 2
    curl = first["serve"][-1]
    assert curl.startswith("curl ") and "Authorization: Bearer $KEY" in curl and curl in report
    assert json.loads(curl.split(" -d '")[1].rstrip("'"))["model"] == "sr"   # the name `muse serve` gives it
    mtime = (out / "base" / "latest").resolve().stat().st_mtime
    assert main(["speedrun", "--out", str(out), *TINY, "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (out / "base" / "latest").resolve().stat().st_mtime == mtime  # not retrained
    assert second["val_bpb"] == first["val_bpb"]


def test_speedrun_grpo_stage_scores_and_reports_and_is_kept_on_rerun(save_tiny_checkpoint, tmp_path, monkeypatch):
    """The GRPO stage on a tiny run (its SFT stage a copy of the base): trains, scores, caches, reports."""
    from muse.cli import speedrun

    small = {"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 8, "eval_prompts": 4, "eval_samples": 2}
    monkeypatch.setattr(speedrun, "GRPO_PRESET", {**speedrun.GRPO_PRESET, **small})
    run = run_with_sft(save_tiny_checkpoint, tmp_path)
    args = argparse.Namespace(grpo_steps=2, score_limit=3, device="cpu", force=False)
    rl = speedrun.grpo_stage(run, args)
    score, se, n = rl["scores"]["arithmetic_1digit"]
    assert n == 3 and 0 <= score <= 1 and se >= 0
    assert (run / "grpo" / "reward.png").exists() and (run / "grpo" / "step_000002").is_dir()
    mtime = (run / "grpo" / "latest").resolve().stat().st_mtime
    assert speedrun.grpo_stage(run, args) == rl  # finished and scored: kept, from the cache
    assert (run / "grpo" / "latest").resolve().stat().st_mtime == mtime
    facts: dict = {}
    lines = speedrun.grpo_section(run, facts, {"sft": {"scores": {"arithmetic_1digit": [0.25, 0.1, 3]}}}, rl)
    text = "\n".join(lines)
    assert "## Post-training: GRPO" in text and "2 steps of 4 prompts x 2 samples" in text
    assert "| arithmetic_1digit | 25.0% +- 10.0% |" in text and "![GRPO reward](grpo/reward.png)" in text
    assert facts["grpo_steps"] == 2 and facts["grpo_scores"]["arithmetic_1digit"]["sft"] == 0.25


def test_speedrun_rlaif_stage_trains_dpo_scores_compliance_and_is_kept_on_rerun(save_tiny_checkpoint, tmp_path,
                                                                               monkeypatch):
    """The optional RLAIF stage on a tiny run (its SFT stage a copy of the base): pairs by the checks, DPO on
    them from SFT, compliance scored and cached, a report section; a rerun keeps everything."""
    from muse.cli import speedrun

    monkeypatch.setattr(speedrun, "RLAIF_PRESET", {**speedrun.RLAIF_PRESET, "prompts": 6, "samples": 2})
    run = run_with_sft(save_tiny_checkpoint, tmp_path)
    args = argparse.Namespace(rlaif_steps=2, score_limit=3, device="cpu", force=False)
    pref = speedrun.rlaif_stage(run, args)
    score, se, n = pref["scores"]["compliance"]
    assert n == 3 and 0 <= score <= 1 and se >= 0
    assert pref["rlaif"]["prompts"] == 6 and pref["rlaif"]["pairs"]["total"] > 0
    assert (run / "rlaif" / "pairs.jsonl").is_file() and (run / "dpo" / "step_000002").is_dir()
    meta = json.loads((run / "dpo" / "step_000002" / "meta.json").read_text())
    assert meta["init_from"].startswith("sft/")  # DPO starts from SFT (and GRPO too: a side branch)
    mtime = (run / "dpo" / "latest").resolve().stat().st_mtime
    assert speedrun.rlaif_stage(run, args) == pref  # finished and scored: kept, from the journal and the cache
    assert (run / "dpo" / "latest").resolve().stat().st_mtime == mtime
    forced = speedrun.rlaif_stage(run, argparse.Namespace(**{**vars(args), "force": True}))  # starts over
    assert (run / "dpo" / "latest").resolve().stat().st_mtime != mtime
    assert forced["rlaif"]["prompts"] == 6 and forced["scores"]["compliance"][2] == 3
    facts: dict = {}
    lines = speedrun.rlaif_section(run, facts, {"sft": {"scores": {"compliance": [0.25, 0.1, 3]}}}, pref)
    text = "\n".join(lines)
    assert "## Post-training: RLAIF + DPO" in text and "6 prompts (the compliance task's train questions, one in five an identity question) x 2" in text
    assert "SFT 25.0% +- 10.0% -> " in text and facts["dpo_steps"] == 2 and facts["compliance"]["sft"] == 0.25


def test_speedrun_rlaif_stage_without_pairs_is_one_clear_error(save_tiny_checkpoint, tmp_path, monkeypatch):
    """Every reply met the same principles: no pairs to train on, so the stage stops and says how to skip it."""
    from muse.cli import speedrun
    from muse.common.errors import DataError
    from muse.posttrain import rlaif

    monkeypatch.setattr(rlaif, "run_rlaif", lambda cfg, out: {"pairs": {"total": 0}})
    run = run_with_sft(save_tiny_checkpoint, tmp_path)
    args = argparse.Namespace(rlaif_steps=2, score_limit=3, device="cpu", force=False)
    with pytest.raises(DataError, match=r"made no preference pairs .* pass --rlaif-steps 0 to skip the stage"):
        speedrun.rlaif_stage(run, args)
    assert not (run / "dpo").exists()


@pytest.mark.parametrize("fp32", [False, True])
def test_pretraining_preset_drops_to_fp32_steps_where_training_computes_in_fp32(fp32, monkeypatch):
    from muse.cli import speedrun

    monkeypatch.setattr(speedrun, "fp32_compute", lambda cfg: fp32)
    p = argparse.ArgumentParser()
    speedrun.add_arguments(p)
    cfg = speedrun.pretrain_config(p.parse_args([]))
    want = speedrun.FP32_PRESET if fp32 else speedrun.PRESET
    assert (cfg.max_steps, cfg.eval_every, cfg.save_every) == (want["max_steps"], want["eval_every"],
                                                               want["save_every"])
    assert cfg.schedule.decay_frac == want.get("schedule.decay_frac", speedrun.PRESET["schedule.decay_frac"])
    assert cfg.optim.matrix_lr == want.get("optim.matrix_lr", 0.02)
    assert cfg.optim.head_lr == want.get("optim.head_lr", 0.004)  # base rates; for_width scales them in the loop
    sft = speedrun.FP32_SFT_STEPS if fp32 else speedrun.SFT_PRESET["max_steps"]
    assert speedrun.sft_steps(p.parse_args([]), cfg) == sft
    assert speedrun.sft_steps(p.parse_args(["--sft-steps", "0"]), cfg) == 0
    # the user's steps and settings win over either preset
    assert speedrun.pretrain_config(p.parse_args(["--max-steps", "7"])).max_steps == 7
    cfg = speedrun.pretrain_config(p.parse_args(["--set", "max_steps=9", "--set", "eval_every=3"]))
    assert (cfg.max_steps, cfg.eval_every) == (9, 3)
    assert speedrun.pretrain_config(p.parse_args(["--set", "optim.matrix_lr=0.01"])).optim.matrix_lr == 0.01
