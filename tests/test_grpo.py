"""GRPO on tiny models: the loss against hand-computed numbers, rewards, a toy task learned, exact resume, bad input."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import muse.tasks as tasks_lib
from muse.common.errors import UsageError
from muse.posttrain.grpo import group_advantages, load_grpo_config, policy_loss, token_logprobs
from muse.posttrain.rewards import Rollout, TaskReward, WeightedSum, build_reward, parse_spec
from muse.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the king queen lord lady love night day sword crown heart fair speak hear come go".split()


# --- the math ---------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    # rewards (1, 0, 0, 1): mean 0.5, std (Bessel) sqrt(4 * 0.25 / 3) = 0.57735
    got = group_advantages([[1, 0, 0, 1], [2, 2, 2, 2]])
    s = math.sqrt(1 / 3) + 1e-4
    assert got[0] == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], abs=1e-12)
    assert got[1] == [0.0] * 4  # all equal: no advantage
    assert group_advantages([[3, 1]], scale=False) == [[1.0, -1.0]]  # Dr. GRPO: not divided by the std


def _toy_group():
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -9.0]], dtype=torch.float64)
    old = torch.tensor([[-1.5, -0.5, -1.9], [0.4, -1.5, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the last token of sample 2 is padding
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    return logp, old, mask, adv


def test_policy_loss_equals_a_hand_computed_reference():
    logp, old, mask, adv = _toy_group()
    # log ratios: sample 1 (A = 2): 0.5, 0, -0.1; sample 2 (A = -1): -0.7, 0.3 (its 3rd token is masked)
    # eps 0.2: -min(rA, clip(r)A) per token:
    #   e^0.5 = 1.65 > 1.2 -> clipped: -2.4 | r = 1: -2 | e^-0.1 = 0.905 inside: -2 e^-0.1
    #   e^-0.7 = 0.50 < 0.8 with A < 0 -> clipped: +0.8 | e^0.3 = 1.35 with A < 0 -> unclipped: +e^0.3
    want = -2.4 - 2 - 2 * math.exp(-0.1) + 0.8 + math.exp(0.3)
    got, kl = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert float(got) == pytest.approx(want, abs=1e-6) and float(kl) == 0.0
    # without clipping (eps so large that nothing is clipped): the plain ratio-weighted advantages
    unclipped = -2 * math.exp(0.5) - 2 - 2 * math.exp(-0.1) + math.exp(-0.7) + math.exp(0.3)
    assert float(policy_loss(logp, old, adv, mask, clip_eps=100.0)[0]) == pytest.approx(unclipped, abs=1e-6)
    # with the KL (k3: e^d - d - 1, d = ref - logp) to a reference, weighted 0.1
    ref = torch.tensor([[-1.0, -1.5, -1.0], [-0.8, -1.2, 0.0]], dtype=torch.float64)
    ds = [0.0, -1.0, 1.0, -0.5, 0.0]  # the five unmasked tokens
    k3 = sum(math.exp(d) - d - 1 for d in ds)
    got, kl = policy_loss(logp, old, adv, mask, clip_eps=0.2, ref_logp=ref, kl_coef=0.1)
    assert float(got) == pytest.approx(want + 0.1 * k3, abs=1e-6)
    assert float(kl) == pytest.approx(k3, abs=1e-6)


def _tiny_model(vocab: int = 64):
    from muse.model import ModelConfig, build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=vocab, n_layer=1, d_model=32, n_head=2, n_kv_head=1, max_seq_len=32))


def _grads(model, adv):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (4, 10), generator=g)
    y = torch.randint(0, 64, (4, 10), generator=g)
    y[:, :4] = -1  # the prompt: no target
    model.zero_grad()
    logp, _ = token_logprobs(model, x, y)
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor(adv), y != -1, clip_eps=0.2)
    loss.backward()
    return logp, [p.grad.clone() for p in model.parameters()]


def test_equal_rewards_give_no_gradient_and_one_update_is_reinforce():
    model = _tiny_model()
    adv = [a for group in group_advantages([[1.0, 1.0], [0.0, 0.0]]) for a in group]
    _, grads = _grads(model, adv)
    assert all(float(g.abs().max()) == 0.0 for g in grads)  # all-equal groups: zero advantage, zero gradient
    # one update per batch: rho = 1 exactly, and the gradient is REINFORCE's, -sum A grad log p
    adv = [a for group in group_advantages([[1.0, 0.0], [0.0, 3.0]]) for a in group]
    logp, grads = _grads(model, adv)
    assert any(float(g.abs().max()) > 0 for g in grads)
    model.zero_grad()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 64, (4, 10), generator=g), torch.randint(0, 64, (4, 10), generator=g)
    y[:, :4] = -1
    lp, _ = token_logprobs(model, x, y)
    (-(torch.tensor(adv)[:, None] * lp * (y != -1)).sum()).backward()
    for a, b in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --- rewards ------------------------------------------------------------------------------------------


def _rollout(task, sample, text):
    return Rollout(tuple(tasks_lib.build_messages(task, sample)), text, sample, task.name)


def test_task_reward_grades_right_and_wrong_answers():
    task = tasks_lib.get("arithmetic_1digit")
    s = task.samples("train")[0]
    right, wrong = s.answer[0], str(int(s.answer[0]) + 1)
    got = TaskReward({task.name: task}).score([_rollout(task, s, f"The answer is {right}."),
                                               _rollout(task, s, f"The answer is {wrong}.")])
    assert [r.score for r in got] == [1.0, 0.0] and right in got[0].reason and wrong in got[1].reason


def test_a_verifier_that_raises_scores_zero_and_is_counted(tmp_path):
    (tmp_path / "boomgrader.py").write_text(
        "def grade(output, sample):\n    if 'boom' in output:\n        raise ValueError('exploded')\n    return 1.0\n")
    samples = [tasks_lib.Sample(id=str(i), prompt="go", answer=("x",)) for i in range(3)]
    task = tasks_lib.Task(name="boom", kind="generate", base_dir=tmp_path, splits=("train",),
                          grader=tasks_lib.GraderSpec("python", {"function": "boomgrader:grade"}),
                          loader=lambda split: samples)
    reward = TaskReward({"boom": task})
    got = reward.score([_rollout(task, samples[0], "fine"), _rollout(task, samples[1], "boom"),
                        _rollout(task, samples[2], "ok")])
    assert [r.score for r in got] == [1.0, 0.0, 1.0] and "exploded" in got[1].reason
    assert reward.errors == 1


def test_weighted_sum_and_python_rewards(tmp_path, monkeypatch):
    (tmp_path / "rewmod.py").write_text(
        "def length(rollouts):\n"
        "    out = []\n"
        "    for r in rollouts:\n"
        "        if r.completion == 'crash':\n"
        "            raise RuntimeError('no')\n"
        "        out.append((len(r.completion) / 10, 'chars'))\n"
        "    return out\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = tasks_lib.get("arithmetic_1digit")
    s = task.samples("train")[0]
    reward = build_reward(["task", "rewmod:length*0.5"], {task.name: task})
    assert isinstance(reward, WeightedSum) and reward.name == "task + rewmod:length*0.5"
    text = f"{s.answer[0]}"
    got = reward.score([_rollout(task, s, text), _rollout(task, s, "crash")])
    assert got[0].score == pytest.approx(1.0 + 0.5 * len(text) / 10) and "task=1" in got[0].reason
    assert got[1].score == 0.0 and "RuntimeError" in got[1].reason  # the raising item alone scores 0
    assert reward.errors == 1
    assert parse_spec("task*0.25") == ("task", "", 0.25)
    assert parse_spec("rm:runs/x/rm*2") == ("rm", "runs/x/rm", 2.0)
    assert parse_spec("constitution") == ("constitution", "", 1.0)


@pytest.mark.parametrize("spec, needle", [
    ("tsak", "unknown reward 'tsak'. Did you mean: task? Rewards: task, module:function, rm:PATH"),
    ("task*lots", "the weight after '*' must be a number"),
    ("nosuchmod_xyz:fn", "no module 'nosuchmod_xyz'"),
    ("rm:", "give the reward model's checkpoint"),
    ("rm:some/path", "the rm:PATH reward is unavailable"),
    ("constitution", "the constitution reward is unavailable"),
])
def test_bad_reward_specs_are_one_line_errors(spec, needle, monkeypatch):
    monkeypatch.setitem(sys.modules, "muse.posttrain.rm", None)  # as if not written yet: the import fails
    monkeypatch.setitem(sys.modules, "muse.posttrain.constitution", None)
    with pytest.raises(UsageError) as e:
        build_reward([spec], {})
    assert needle in str(e.value) and "\n" not in str(e.value)


# --- end to end on a toy task -------------------------------------------------------------------------

SOME = ["fair", "go", "hear", "speak", "lady", "queen"]
TOY = """name = "toy"
kind = "generate"
[splits]
train = "train.jsonl"
validation = "val.jsonl"
test = "val.jsonl"
[grader]
type = "regex"
pattern = '{pattern}'
[generation]
max_tokens = {max_tokens}
"""


@pytest.fixture
def toy(save_tiny_checkpoint, tmp_path):
    """(run dir, task file maker): a tiny base model (vocab 300) and a toy task whose grader gives 1 when
    the reply's first word (the first capture of `pattern`) is one of the `answers`."""
    run = tmp_path / "run"
    shutil.copytree(save_tiny_checkpoint("tiny"), run)

    def task(answers: list[str], max_tokens: int, pattern: str = r"^\s*(\S+)", n_train: int = 64,
             words: int = 3) -> Path:
        for name, n, seed in (("train", n_train, 1), ("val", 8, 2)):
            rng = random.Random(seed)
            with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for _ in range(n):
                    f.write(json.dumps({"prompt": " ".join(rng.choices(WORDS, k=words)), "answer": answers}) + "\n")
        path = tmp_path / "toy.toml"
        path.write_text(TOY.replace("{max_tokens}", str(max_tokens)).replace("{pattern}", pattern), encoding="utf-8")
        return path
    return run, task


def _rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "grpo" / "metrics.jsonl") if "reward_mean" in r]


def test_a_toy_task_is_learned_from_zero_to_one(toy):
    """Reward 1 when the reply's one token is 'fair' (2 of the 300 tokens spell it): ~0 at first, ~1 after."""
    from muse.posttrain.grpo import grpo_loop

    run, task = toy
    cfg = load_grpo_config(None, {"tasks": (str(task(["fair"], 1)),), "max_steps": 20, "group_size": 8,
                                  "prompts_per_step": 8, "device": "cpu", "eval_every": 20, "save_every": 20,
                                  "eval_prompts": 8, "log_every": 1, "tensorboard": False, "plot": True},
                           ["optim.name=adamw", "optim.lr=0.03"])
    result = grpo_loop(cfg, run).train()
    assert (run / "grpo" / "reward.png").stat().st_size > 0 and not (run / "grpo" / "loss.png").exists()
    rewards = [r["reward_mean"] for r in _rows(run)]
    assert len(rewards) == 20
    assert sum(rewards[:2]) / 2 < 0.1, rewards
    assert sum(rewards[-5:]) / 5 > 0.9, rewards
    assert result.evals["pass@1"] > 0.9 and result.evals["pass@4"] == 1.0, result.evals
    row = _rows(run)[-1]
    for key in ("reward_std", "pass_rate", "response_len", "entropy", "rollout_s", "update_s", "reward_errors",
                "completion_tokens_per_s"):
        assert key in row, key
    assert row["response_len"] == 1.0 and row["entropy"] < _rows(run)[0]["entropy"]


def test_after_updates_the_engine_samples_from_the_trained_weights(toy):
    """The engine's logprobs of a rollout made after optimizer steps equal the training forward's (1e-4):
    no stale weights, and no stale prefix cache, although every step asks the same 8 prompts again (of 2-3
    KV blocks each: the engine caches whole blocks of 16 tokens)."""
    from muse.posttrain.grpo import grpo_loop

    run, task = toy
    path = task(SOME, 3, "(" + "|".join(SOME) + ")", n_train=8, words=12)
    cfg = load_grpo_config(None, {"tasks": (str(path),), "max_steps": 3, "group_size": 4, "prompts_per_step": 8,
                                  "device": "cpu", "eval_every": 0, "save_every": 0, "eval_prompts": 0,
                                  "log_every": 1, "tensorboard": False, "plot": False,
                                  "dtype": "float32"},  # the fp32 forward below is the reference
                           ["optim.name=adamw", "optim.lr=0.03"])
    loop = grpo_loop(cfg, run)
    loop.train()
    obj = loop.objective
    batch = obj.next_batch()  # step 4's rollout, on the weights of 3 updates
    x, y, old, _ = batch.inputs
    with torch.no_grad():
        logp, _ = token_logprobs(obj.model, x, y)
    mask = y != -1
    assert int(mask.sum()) == batch.loss_units > 0
    assert float((logp - old)[mask].abs().max()) < 1e-4


def test_token_logprobs_at_a_temperature_are_the_samplers():
    model = _tiny_model()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 64, (2, 6), generator=g), torch.randint(0, 64, (2, 6), generator=g)
    y[:, :2] = -1
    with torch.no_grad():
        want = torch.log_softmax(model(x) / 0.5, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -1)
        got, logits = token_logprobs(model, x, y, 0.5)
        raw, _ = token_logprobs(model, x, y)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, model(x) / 0.5)
    assert float((got - raw).abs().max()) > 1e-3  # the temperature is not ignored


def test_at_a_temperature_the_loss_uses_the_samplers_logprobs(toy):
    """T = 0.7 with a batch reused for two updates: pi_old is the tempered policy the rollout came from (the
    training forward on the rollout's weights), not the engine's raw T = 1 log-probabilities."""
    from muse.posttrain.grpo import grpo_loop

    run, task = toy
    path = task(SOME, 3, "(" + "|".join(SOME) + ")", n_train=8, words=12)
    cfg = load_grpo_config(None, {"tasks": (str(path),), "max_steps": 2, "group_size": 4, "prompts_per_step": 8,
                                  "device": "cpu", "eval_every": 0, "save_every": 0, "eval_prompts": 0,
                                  "log_every": 1, "tensorboard": False, "plot": False, "dtype": "float32",
                                  "temperature": 0.7, "updates_per_batch": 2},
                           ["optim.name=adamw", "optim.lr=0.03"])
    loop = grpo_loop(cfg, run)
    loop.train()
    obj = loop.objective
    batch = obj.next_batch()  # step 3: a new rollout batch, on the weights of 2 updates
    x, y, old, _ = batch.inputs
    mask = y != -1
    with torch.no_grad():
        tempered, _ = token_logprobs(obj.model, x, y, 0.7)
        raw, _ = token_logprobs(obj.model, x, y)
    assert float((tempered - old)[mask].abs().max()) < 1e-5
    assert float((raw - old)[mask].abs().max()) > 1e-2


def test_grpo_starts_from_the_latest_stage_before_it(toy):
    """base only -> base; base -> sft -> sft; base -> sft -> grpo (a --force restart) -> sft again."""
    from muse.checkpoint import load, save_checkpoint
    from muse.posttrain.grpo import GRPO, grpo_loop

    run, task = toy
    cfg = lambda: load_grpo_config(None, {"tasks": (str(task(["fair"], 1)),), "max_steps": 1, "group_size": 2,  # noqa: E731
                                          "prompts_per_step": 2, "device": "cpu", "eval_prompts": 0,
                                          "tensorboard": False, "plot": False})
    assert GRPO(cfg(), run).init_from.parent.name == "base"
    model, tok, _ = load(run / "base")
    save_checkpoint(run / "sft", 7, model=model, tokenizer=tok, meta={"stage": "sft", "init_from": "base/step_000001"})
    assert GRPO(cfg(), run).init_from == run / "sft" / "step_000007"
    grpo_loop(cfg(), run).train()
    assert GRPO(cfg(), run).init_from == run / "sft" / "step_000007"
    meta = json.loads((run / "grpo" / "step_000001" / "meta.json").read_text())
    assert meta["init_from"] == "sft/step_000007"


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(MUSE_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    return env


def _cmd(run: Path, task: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "muse", "grpo", str(run), "--task", str(task), "--device", "cpu",
            "--group-size", "4", "--prompts-per-step", "4", "--max-steps", "20", "--save-every", "4",
            "--eval-every", "10", "--eval-prompts", "4", "--set", "log_every=1", "--set", "optim.name=adamw",
            "--set", "optim.lr=0.003", "--set", "tensorboard=false", "--set", "plot=false",
            "--set", "dtype=float32", *extra]  # fp32 bounds; `auto` is bf16 on CPUs with native bf16 matmul


@pytest.mark.slow
@pytest.mark.timeout(480)  # subprocesses: minutes on a loaded 2-core machine
def test_grpo_resume_after_sigkill_is_bit_identical(toy, tmp_path):
    run, task = toy
    path = task(SOME, 3, "(" + "|".join(SOME) + ")")  # any of six words anywhere: rewards in between
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    subprocess.run(_cmd(ref, path), check=True, env=_env(), capture_output=True)
    expected = {r["step"]: r for r in _rows(ref)}
    assert sorted(expected) == list(range(1, 21))
    assert len({r["reward_mean"] for r in expected.values()}) > 3  # not a run where nothing happens
    proc = subprocess.Popen(_cmd(run, path), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if max((r["step"] for r in _rows(run)), default=0) >= 9:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "GRPO finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = max(r["step"] for r in _rows(run))
    assert 9 <= killed_at < 20
    res = subprocess.run(_cmd(run, path, "--resume"), env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = {r["step"]: r for r in _rows(run)}
    assert sorted(got) == list(range(1, 21))
    same = ("loss", "reward_mean", "reward_std", "pass_rate", "response_len", "entropy", "tokens")
    for step in range(killed_at // 4 * 4 + 1, 21):
        for key in same:
            assert got[step][key] == expected[step][key], f"step {step} {key}: {got[step][key]!r} != {expected[step][key]!r}"
    evals = lambda r: [m["pass@1"] for m in read_metrics(r / "grpo" / "metrics.jsonl") if "pass@1" in m]  # noqa: E731
    assert evals(run) == evals(ref)
    a, b = (p / "grpo" / "step_000020" / "model.safetensors" for p in (run, ref))
    assert a.read_bytes() == b.read_bytes()  # the same weights, bit for bit


def test_a_rollout_batch_reused_for_two_updates_resumes_exactly(toy, tmp_path):
    """updates_per_batch=2 saved between the two updates of a batch: the batch is in the checkpoint."""
    from muse.posttrain.grpo import grpo_loop

    run, task = toy
    path = task(SOME, 3, "(" + "|".join(SOME) + ")")
    cfg = lambda: load_grpo_config(None, {  # noqa: E731
        "tasks": (str(path),), "max_steps": 4, "group_size": 8, "prompts_per_step": 8, "device": "cpu",
        "eval_every": 0, "save_every": 1, "keep_last": 10, "eval_prompts": 0, "log_every": 1, "updates_per_batch": 2,
        "tensorboard": False, "plot": False}, ["optim.name=adamw", "optim.lr=0.01"])
    grpo_loop(cfg(), run).train()
    want = {r["step"]: r["loss"] for r in read_metrics(run / "grpo" / "metrics.jsonl") if "loss" in r}
    assert want[2] != 0.0  # the second update of a batch: the ratio is no longer 1
    for step in ("step_000004", "step_000003", "latest"):  # back to step 2... then 3: mid-batch
        p = run / "grpo" / step
        if not os.path.lexists(p):
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    state = torch.load(run / "grpo" / "step_000002" / "train_state.pt", weights_only=True)["objective"]
    assert "batches" not in state  # step 2 ends a batch: nothing to keep
    shutil.rmtree(run / "grpo" / "step_000002")
    state = torch.load(run / "grpo" / "step_000001" / "train_state.pt", weights_only=True)["objective"]
    assert len(state["batches"]) == 1 and len(state["batches"][0]) == 64  # one process: 8 prompts x 8 samples
    grpo_loop(cfg(), run, resume=True).train()
    got = {r["step"]: r["loss"] for r in read_metrics(run / "grpo" / "metrics.jsonl") if "loss" in r}
    assert [got[s] for s in (2, 3, 4)] == [want[s] for s in (2, 3, 4)]


@pytest.mark.slow
@pytest.mark.timeout(480)  # subprocesses: minutes on a loaded 2-core machine
def test_two_processes_roll_out_halves_and_match_one(toy, tmp_path):
    run, task = toy
    path = task(SOME, 3, "(" + "|".join(SOME) + ")")
    two = tmp_path / "two"
    shutil.copytree(run, two)
    steps = ["--max-steps", "3", "--save-every", "3", "--eval-every", "3", "--set", "optim.lr=0.03"]
    subprocess.run(_cmd(run, path, *steps), check=True, env=_env(), capture_output=True)
    res = subprocess.run(_cmd(two, path, *steps, "--nproc", "2", "--parallel", "ddp"), env=_env(),
                         capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = {r["step"]: r for r in _rows(run)}, {r["step"]: r for r in _rows(two)}
    assert want.keys() == got.keys() == {1, 2, 3}
    for step in want:  # the same prompts, seeds and samples, split over two ranks
        for key in ("reward_mean", "reward_std", "response_len", "tokens"):
            assert got[step][key] == want[step][key], (step, key)
        assert got[step]["entropy"] == pytest.approx(want[step]["entropy"], rel=1e-5)
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-4, abs=1e-6)
    evals = lambda r: [m["pass@1"] for m in read_metrics(r / "grpo" / "metrics.jsonl") if "pass@1" in m]  # noqa: E731
    assert evals(two) == evals(run)


# --- bad input at the command line ---------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["--task", "arithmetic_2digt"], "unknown task 'arithmetic_2digt'. Did you mean: arithmetic_2digit"),
    (["--task", "which_play"], "task 'which_play' is a multiple_choice task; GRPO needs"),
    (["--task", "arithmetic_1digit", "--reward", "tsak"], "unknown reward 'tsak'. Did you mean: task?"),
    (["--task", "arithmetic_1digit", "--group-size", "1"], "group_size must be at least 2, got 1: GRPO's advantage"),
    ([], "name the tasks to train on: --task NAME"),
    (["--task", "TOY", "--nproc", "2", "--prompts-per-step", "3"],
     "prompts_per_step 3 is not a multiple of the 2 data-parallel"),
])
def test_bad_input_is_one_line_and_exit_2(toy, muse, args, needle):
    run, task = toy
    args = [str(task(["fair"], 2)) if a == "TOY" else a for a in args]
    code, out, err = muse("grpo", str(run), "--device", "cpu", *args)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and needle in err, err


# --- groups without a reward spread ----------------------------------------------------------------


def test_keep_informative_drops_equal_groups_and_fills_up_to_the_micro_batches():
    from muse.posttrain.grpo import keep_informative

    seqs = [f"g{g}s{s}" for g in range(3) for s in range(2)]  # 3 groups of 2, in group order
    assert keep_informative(seqs, [False, True, False], 2, 1) == ["g1s0", "g1s1"]
    assert keep_informative(seqs, [True, True, True], 2, 1) == seqs
    # nothing informative: the first sequences fill the micro-batches (advantage 0: no gradient)
    assert keep_informative(seqs, [False, False, False], 2, 3) == ["g0s0", "g0s1", "g1s0"]
    assert keep_informative(seqs, [False, True, False], 2, 3) == ["g1s0", "g1s1", "g0s0"]


@pytest.mark.parametrize("answers", [["fair"], ["no-such-token-sequence-ever"]])
def test_drop_equal_groups_trains_on_informative_groups_only(toy, answers):
    """With drop_equal_groups the update's batch holds only groups whose rewards differ (each of their
    samples has a non-zero advantage); when no group differs (a reward nothing can earn) one sequence is
    left, with advantage 0, and the run still steps."""
    from muse.posttrain.grpo import grpo_loop

    run, task = toy
    cfg = load_grpo_config(None, {"tasks": (str(task(answers, 1)),), "max_steps": 3, "group_size": 4,
                                  "prompts_per_step": 8, "device": "cpu", "eval_every": 0, "save_every": 0,
                                  "eval_prompts": 0, "log_every": 1, "tensorboard": False, "plot": False},
                           ["optim.name=adamw", "optim.lr=0.03", "drop_equal_groups=true"])
    loop = grpo_loop(cfg, run)
    assert loop.train().steps == 3
    rows = _rows(run)
    assert len(rows) == 3 and all(0.0 <= r["informative_groups"] <= 1.0 for r in rows)
    obj = loop.objective
    obj.next_batch()  # step 4's rollout
    advs = [s[3] for s in obj._batch]
    informative = round(obj.step_metrics()["informative_groups"] * 8)
    if informative:
        assert len(advs) == 4 * informative and all(a != 0 for a in advs)
    else:
        assert advs == [0.0]
    if answers != ["fair"]:
        assert all(r["informative_groups"] == 0.0 for r in rows) and not informative


# --- prompts SFT has not seen -----------------------------------------------------------------------


def test_train_skip_leaves_the_first_train_samples_out(toy):
    """train_skip=N: the prompts are the task's train samples from the N-th on (the validation prompts are
    unchanged); a skip that leaves nothing is one DataError that says to lower it."""
    from muse.common.errors import DataError
    from muse.posttrain.grpo import GRPO

    run, task = toy
    path = task(["fair"], 1, n_train=10)
    flags = {"tasks": (str(path),), "device": "cpu", "eval_prompts": 8}
    train = tasks_lib.get(str(path)).samples("train")
    whole = GRPO(load_grpo_config(None, flags), run)
    part = GRPO(load_grpo_config(None, flags, ["train_skip=7"]), run)
    assert [p.sample.prompt for p in whole.train_prompts] == [s.prompt for s in train]
    assert [p.sample.prompt for p in part.train_prompts] == [s.prompt for s in train[7:]]
    assert [p.sample.prompt for p in part.val_prompts] == [p.sample.prompt for p in whole.val_prompts]
    with pytest.raises(DataError, match="train_skip 10 leaves no train prompt of toy; lower it"):
        GRPO(load_grpo_config(None, flags, ["train_skip=10"]), run)
