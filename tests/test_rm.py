"""Reward models on a tiny model: Bradley-Terry with margins, a feature it must learn, its checkpoint, its reward function."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from muse.checkpoint import latest_stage, load, load_model_state, read_head, resolve_stage
from muse.cli.main import main
from muse.common.errors import CheckpointError
from muse.posttrain.preference import PairSource, read_preference_jsonl, score_batch
from muse.posttrain.rewards import RewardFunction, Rollout
from muse.posttrain.rm import (
    RewardModelObjective,
    RewardModelReward,
    build_reward_model,
    load_reward_model,
    load_rm_config,
)
from muse.tokenizer import PAD_ID
from test_dpo import TINY, write_prefs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_rm(save_tiny_checkpoint, tmp_path_factory):
    """A run (base: a tiny llama) with a reward model trained on pairs whose chosen reply says 'crown'."""
    root = tmp_path_factory.mktemp("rm")
    run = root / "run"
    shutil.copytree(save_tiny_checkpoint("rmbase"), run)
    prefs = write_prefs(root / "prefs.jsonl", n=240)
    code = main(["rm", str(run), "--data", str(prefs), *TINY, "--max-steps", "15", "--eval-every", "15",
                 "--set", "val_fraction=0.2", "--json"])
    assert code == 0
    return run, prefs


def test_the_reward_model_learns_a_feature_that_separates_the_pairs(trained_rm, capsys):
    run, _ = trained_rm
    evals = [r for r in map(json.loads, (run / "rm" / "metrics.jsonl").read_text().splitlines()) if "val_accuracy" in r]
    last = evals[-1]
    assert last["val_accuracy"] > 0.95 and last["val_margin"] > 1.0 and last["val_loss"] < 0.2, last
    train = [r for r in map(json.loads, (run / "rm" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert train[0]["pairs_per_s"] > 0 and "accuracy" in train[-1]


def test_the_checkpoint_says_it_is_a_reward_model_and_is_never_served(trained_rm):
    run, _ = trained_rm
    ckpt = run / "rm" / "latest"
    assert read_head(ckpt) == {"kind": "reward", "pool": "last_token"}
    assert read_head(run / "base" / "step_000001") is None
    with pytest.raises(CheckpointError, match="holds a reward model .* not a language model"):
        load(run / "rm")
    assert latest_stage(run) == "base" and resolve_stage(run).parent.name == "base"  # serve/eval pick base
    model, _, path = load_reward_model(run)  # the run's rm stage
    assert path.parent.name == "rm" and model.output.weight.shape == (1, 64)
    with pytest.raises(CheckpointError, match="is a language model, not a reward model"):
        load_reward_model(run / "base")
    from muse.checkpoint.hf_export import export_hf

    with pytest.raises(CheckpointError, match="is a reward model .* not a language model"):
        export_hf(run / "rm" / "latest", run / "export")
    assert not (run / "export").exists()


def test_init_loads_the_trunk_and_starts_the_head_at_zero(save_tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(save_tiny_checkpoint("rmbase"), run)
    prefs = write_prefs(tmp_path / "p.jsonl", n=30)
    obj = RewardModelObjective(load_rm_config(None, {"data": (str(prefs),), "batch_tokens": 512}), run)
    from muse.common.device import dtype_policy
    from muse.distributed.parallelize import ParallelConfig
    from muse.train.objective import LoopContext

    ctx = LoopContext(device=torch.device("cpu"), mesh=None, dp_rank=0, dp_size=1,
                      policy=dtype_policy(torch.device("cpu"), "float32"), parallel=ParallelConfig(), run_dir=tmp_path)
    model = obj.setup(ctx, resuming=False)
    base = load_model_state(run / "base" / "step_000001")
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in base.items() if k != "output.weight")
    batch = obj.next_batch()
    with torch.no_grad():
        assert float(obj.loss(model, batch)) == pytest.approx(batch.loss_units * math.log(2), abs=1e-5)


def test_bradley_terry_loss_with_margins_equals_the_formula(tiny_tok, tmp_path):
    from muse.model import ModelConfig

    torch.manual_seed(1)
    model = build_reward_model(ModelConfig(vocab_size=tiny_tok.vocab_size, n_layer=2, d_model=64, n_head=4,
                                           max_seq_len=128))
    torch.nn.init.normal_(model.output.weight, std=0.5)
    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r, "margin": m}) + "\n"
                         for p, c, r, m in [("the king", "go", "come here", 0.5), ("fair", "the lady love", "day", 0),
                                            ("sword", "heart", "night speak", -1.25)]))
    rows = PairSource.build("m", tiny_tok, read_preference_jsonl(f), 129, str(f)).rows
    with torch.no_grad():
        losses, chosen, rejected = RewardModelObjective._pair_losses(model, score_batch(rows)[:3])
        for i, r in enumerate(rows):  # one reply at a time, unpadded, read at its last token
            rc = float(model(torch.tensor(r.chosen[0], dtype=torch.long)[None])[0, -1])
            rr = float(model(torch.tensor(r.rejected[0], dtype=torch.long)[None])[0, -1])
            assert float(chosen[i]) == pytest.approx(rc, abs=1e-5) and float(rejected[i]) == pytest.approx(rr, abs=1e-5)
            want = float(-F.logsigmoid(torch.tensor(rc - rr - r.margin, dtype=torch.float64)))
            assert float(losses[i]) == pytest.approx(want, abs=1e-5)


def test_the_reward_function_scores_rollouts_as_training_scores_pairs(trained_rm):
    run, prefs = trained_rm
    reward = RewardModelReward(run / "rm")
    assert isinstance(reward, RewardFunction) and reward.name.startswith("rm:")
    pairs = read_preference_jsonl(prefs)[:12]
    rollouts = [Rollout(p.messages, reply) for p in pairs for reply in (p.chosen, p.rejected)]
    scores = [r.score for r in reward.score(rollouts)]
    model, tok, _ = load_reward_model(run)
    rows = PairSource.build("p", tok, pairs, 129, str(prefs)).rows
    x, last, _, n, _ = score_batch(rows)
    assert (x[:, :1] != PAD_ID).all()
    with torch.no_grad():
        r = model.rewards(x, last)
    want = [v for i in range(n) for v in (float(r[i]), float(r[n + i]))]
    assert scores == pytest.approx(want, abs=1e-5)
    assert [s.score for s in reward.score(rollouts[:1])] == pytest.approx(scores[:1], abs=1e-5)  # batch-independent
    assert sum(scores[0::2]) > sum(scores[1::2])  # chosen replies (they say "crown") score higher
