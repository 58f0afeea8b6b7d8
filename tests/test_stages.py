"""The stage registry and the "latest stage" rule (muse.checkpoint.stages), and the commands that use it.

Checkpoints here are written by save_checkpoint with the `init_from` and `saved_at` the training loop
records, so each case is a run directory as training would leave it, made in milliseconds.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from muse.checkpoint import (
    STAGES,
    generative_stages,
    get_stage,
    latest_stage,
    load,
    resolve_stage,
    save_checkpoint,
    trained_stages,
)
from muse.checkpoint.manifest import build_manifest
from muse.cli.main import main
from muse.common.errors import CheckpointError, UsageError
from muse.model import ModelConfig, build_model
from muse.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["the king and the queen speak of love and night"] * 8, vocab_size=280)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=288, n_layer=1, d_model=32, n_head=2, max_seq_len=32))


@pytest.fixture
def make(tmp_path, tok, model):
    """make(stage, step, init_from=None, at=seconds): a checkpoint in tmp_path/run as the loop saves it."""

    def make(stage, step, init_from=None, at=None):
        meta = {"init_from": init_from, **({"saved_at": at} if at is not None else {})}
        return save_checkpoint(tmp_path / "run" / stage, step, model=model, tokenizer=tok, meta=meta)

    return make


def test_one_registry_with_commands_and_generative_flags():
    assert list(STAGES)[:2] == ["base", "sft"] and {"rm", "dpo", "grpo"} <= set(STAGES)
    assert get_stage("base").command == "train"
    assert "rm" not in generative_stages() and "dpo" in generative_stages()
    with pytest.raises(UsageError, match="unknown stage 'spft'. Did you mean: sft"):
        get_stage("spft")


def test_a_run_with_base_only_is_base(make, tmp_path):
    make("base", 10, at=100.0)
    assert latest_stage(tmp_path / "run") == "base"
    assert resolve_stage(tmp_path / "run") == tmp_path / "run" / "base" / "step_000010"


def test_dpo_after_grpo_is_latest_whatever_the_clocks_say(make, tmp_path):
    make("base", 10, at=100.0)
    make("sft", 5, init_from="base/step_000010", at=200.0)
    make("grpo", 3, init_from="sft/step_000005", at=300.0)
    make("dpo", 2, init_from="grpo/step_000003", at=250.0)  # a clock set back: lineage still decides
    run = tmp_path / "run"
    assert latest_stage(run) == "dpo"
    assert resolve_stage(run) == run / "dpo" / "step_000002"
    _, _, meta = load(run)
    assert meta["stage"] == "dpo"
    assert load(run, stages=("base",))[2]["stage"] == "base"
    assert resolve_stage(run, "grpo") == run / "grpo" / "step_000003"


def test_a_stage_retrained_after_its_child_is_latest(make, tmp_path):
    make("base", 10, at=100.0)
    make("sft", 5, init_from="base/step_000010", at=200.0)
    make("dpo", 2, init_from="sft/step_000005", at=300.0)
    assert latest_stage(tmp_path / "run") == "dpo"
    make("sft", 9, init_from="base/step_000010", at=400.0)  # sft trained on: dpo was made from an older sft
    assert latest_stage(tmp_path / "run") == "sft"


def test_branches_go_to_the_last_save_and_a_return_trip_to_the_newest_child(make, tmp_path):
    run = tmp_path / "run"
    make("base", 10, at=100.0)
    make("sft", 5, init_from="base/step_000010", at=200.0)
    make("dpo", 2, init_from="sft/step_000005", at=400.0)
    make("grpo", 3, init_from="sft/step_000005", at=300.0)  # two children of one sft: the newer save wins
    assert latest_stage(run) == "dpo"
    make("dpo", 6, init_from="grpo/step_000003", at=500.0)  # dpo again, from grpo ...
    make("grpo", 4, init_from="dpo/step_000006", at=450.0)  # ... and grpo from that dpo (clock behind)
    assert latest_stage(run) == "grpo"


def test_the_reward_model_is_never_the_default(make, tmp_path):
    make("base", 10, at=100.0)
    make("rm", 4, init_from="base/step_000010", at=500.0)
    run = tmp_path / "run"
    assert latest_stage(run) == "base"
    assert latest_stage(run, generative_only=False) == "rm"
    assert [t.name for t in trained_stages(run, generative_only=False)] == ["base", "rm"]
    assert resolve_stage(run, "rm") == run / "rm" / "step_000004"


def test_checkpoints_without_saved_at_use_the_manifest_time(make, tmp_path):
    run = tmp_path / "run"
    for stage, step, when in (("base", 10, 2_000), ("sft", 5, 1_000)):  # from an older muse, no lineage
        ckpt = make(stage, step)
        meta = json.loads((ckpt / "meta.json").read_text())
        del meta["saved_at"]
        (ckpt / "meta.json").write_text(json.dumps(meta))
        (ckpt / "manifest.json").write_text(json.dumps(build_manifest(ckpt, step)))
        os.utime(ckpt / "manifest.json", (when, when))
    assert latest_stage(run) == "base"
    resolve_stage(run)  # still verifies


def test_init_from_outside_the_run_orders_nothing(make, tmp_path):
    make("base", 10, init_from="/elsewhere/base/step_000001", at=300.0)
    make("sft", 5, init_from="base/step_000010", at=200.0)
    assert latest_stage(tmp_path / "run") == "sft"


def test_nothing_trained_names_muse_train(tmp_path):
    (tmp_path / "run" / "data").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"looked in grpo/, dpo/, sft/, base/\); run `muse train"):
        resolve_stage(tmp_path / "run")
    with pytest.raises(UsageError, match="unknown stage"):
        resolve_stage(tmp_path / "run", "ppo")


def test_a_corrupt_latest_stage_is_reported_not_skipped(make, tmp_path):
    make("base", 10, at=100.0)
    ckpt = make("sft", 5, init_from="base/step_000010", at=200.0)
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(CheckpointError, match="sft/step_000005 is corrupt"):
        resolve_stage(tmp_path / "run")


def test_commands_take_stage(make, tmp_path, capsys):
    make("base", 10, at=100.0)
    make("sft", 5, init_from="base/step_000010", at=200.0)
    run = str(tmp_path / "run")
    assert main(["sample", run, "--max-tokens", "2", "--seed", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("sft/step_000005")
    assert main(["sample", run, "--stage", "base", "--max-tokens", "2", "--seed", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("base/step_000010")
    assert main(["sample", run, "--stage", "sfft", "--max-tokens", "2"]) == 2
    assert "Did you mean: sft" in capsys.readouterr().err
    assert main(["export", run, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"].endswith("sft/step_000005") and out["out"].endswith("export/hf-sft")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the king"}\n')
    assert main(["generate", run, "--stage", "base", "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                 "--max-tokens", "2", "--temperature", "0"]) == 0
    assert json.loads((tmp_path / "o.jsonl").read_text())["tokens"] <= 2
