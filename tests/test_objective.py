"""The objective protocol is enough for a stage: tiny test-only objectives driven by the real TrainLoop.

`MaskedLM` is next-token prediction with a random loss mask whose density varies from micro-batch to
micro-batch (and from rank to rank), the shape of SFT. Through it: the loop's gradient equals the
full-batch gradient of the mean over every loss token computed in one pass (and not the mean of
per-micro-batch means); 2 data-parallel ranks equal 1 process reading the same global batch; the
objective's own state resumes bit for bit; meta.json records where the weights started. `Preference` is
the shape of DPO: pairs as loss units and a frozen reference model that stays out of the optimizer and
out of the checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from muse.checkpoint import latest_stage, load_model_state
from muse.common.device import dtype_policy
from muse.distributed.parallelize import ParallelConfig
from muse.model import ModelConfig, build_model
from muse.tokenizer import train_bpe
from muse.train.loop import LoopConfig, TrainLoop
from muse.train.metrics import read_metrics
from muse.train.objective import LoopContext, MicroBatch, Objective, Plan

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, BATCH, SEQ = 288, 2, 16  # the model's vocabulary: at least the smallest tokenizer's 272 ids


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["the king and the queen speak"] * 4, vocab_size=272)


def _config(**kw) -> LoopConfig:
    # fp32: the references below are fp32 forwards (`auto` is bf16 on CPUs with native bf16 matmul)
    base = dict(device="cpu", seed=0, log_every=1, eval_every=0, save_every=0, tensorboard=False, plot=False,
                dtype="float32")
    return LoopConfig(**{**base, **kw})


def micro_batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global micro-batch `index`: random tokens, and targets masked (-1) with a density that swings
    between 5% and 95% kept, so loss-token counts differ a lot between micro-batches."""
    g = torch.Generator().manual_seed(1000 + index)
    w = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    keep = 0.95 if index % 2 == 0 else 0.05
    y = w[:, 1:].clone()
    y[torch.rand(y.shape, generator=g) > keep] = -1
    y[0, 0] = w[0, 1]  # at least one loss token each
    return w[:, :-1].contiguous(), y


class MaskedLM(Objective):
    """Micro-batch j of rank r is global micro-batch j * dp_size + r; the position is its state."""

    seq_len = SEQ

    def __init__(self, tokenizer, *, accum: int, steps: int, stage: str = "base", init_from: Path | None = None):
        self.tokenizer, self.accum, self.steps, self.stage, self.init_from = tokenizer, accum, steps, stage, init_from
        self.grads: dict[str, torch.Tensor] = {}

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=VOCAB, n_layer=1, d_model=32, n_head=2, n_kv_head=1, max_seq_len=SEQ)

    def plan(self, dp_size: int) -> Plan:
        return Plan(grad_accum=self.accum, total_steps=self.steps)

    def setup(self, ctx: LoopContext, *, resuming: bool) -> nn.Module:
        self.ctx, self.position = ctx, 0
        model = build_model(self.model_config(), device=ctx.device)
        if self.init_from is not None and not resuming:
            model.load_state_dict(load_model_state(self.init_from))
        self.initial = copy.deepcopy(model.state_dict())
        for name, p in model.named_parameters():  # the accumulated gradient, before clipping
            p.register_post_accumulate_grad_hook(lambda p, name=name: self.grads.__setitem__(name, p.grad.clone()))
        return model

    def next_batch(self) -> MicroBatch:
        x, y = micro_batch(self.position * self.ctx.dp_size + self.ctx.dp_rank)
        self.position += 1
        return MicroBatch((x, y), loss_units=int((y != -1).sum()), tokens=x.numel())

    def loss(self, model, batch):
        x, y = batch.inputs
        return model(x, y, reduction="sum")

    def evaluate(self, model):
        x, y = micro_batch(-1)
        both = self.ctx.all_reduce_sum(torch.stack([model(x, y, reduction="sum"), (y != -1).sum().float()]))
        return {"val_loss": float(both[0] / both[1])}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def _losses(stage_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(stage_dir / "metrics.jsonl") if "loss" in r}


def test_gradient_is_the_full_batch_mean_over_global_loss_tokens(tmp_path, tok):
    accum = 4
    objective = MaskedLM(tok, accum=accum, steps=1)
    TrainLoop(objective, _config(), tmp_path).train()

    batches = [micro_batch(i) for i in range(accum)]
    counts = [int((y != -1).sum()) for _, y in batches]
    assert max(counts) > 5 * min(counts)  # the masks make the micro-batches very unequal
    model = build_model(objective.model_config())
    model.load_state_dict(objective.initial)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    full = model(x, y, reduction="sum") / (y != -1).sum()  # one pass over the whole batch
    full.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(objective.grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert _losses(tmp_path / "base")[1] == pytest.approx(float(full.detach()), rel=1e-6)

    # The test has teeth: averaging per-micro-batch means gives a visibly different gradient.
    model.zero_grad()
    sum(model(bx, by) for bx, by in batches).div(accum).backward()
    naive = torch.cat([p.grad.flatten() for _, p in model.named_parameters()])
    loop = torch.cat([objective.grads[n].flatten() for n, _ in model.named_parameters()])
    assert (naive - loop).norm() > 0.1 * loop.norm()


def test_objective_state_resumes_bit_for_bit(tmp_path, tok):
    run = tmp_path / "run"
    TrainLoop(MaskedLM(tok, accum=2, steps=4), _config(save_every=2), run).train()
    want = _losses(run / "base")
    final = load_model_state(run / "base" / "step_000004")
    shutil.rmtree(run / "base" / "step_000004")
    (run / "base" / "latest").unlink()
    resumed = MaskedLM(tok, accum=2, steps=4)
    result = TrainLoop(resumed, _config(save_every=2), run, resume=True).train()
    assert resumed.position == 8 and result.steps == 4  # it read on from where step 2 left off
    assert _losses(run / "base") == want
    for name, t in load_model_state(run / "base" / "step_000004").items():
        assert torch.equal(t, final[name]), name


def test_meta_records_where_the_weights_started(tmp_path, tok):
    TrainLoop(MaskedLM(tok, accum=1, steps=1), _config(), tmp_path).train()
    base = tmp_path / "base" / "step_000001"
    sft = MaskedLM(tok, accum=1, steps=1, stage="sft", init_from=base)
    result = TrainLoop(sft, _config(), tmp_path).train()
    assert json.loads((result.checkpoint / "meta.json").read_text())["init_from"] == "base/step_000001"
    assert torch.equal(sft.initial["output.weight"], load_model_state(base)["output.weight"])
    assert latest_stage(tmp_path) == "sft"


@pytest.mark.timeout(240)
def test_two_ranks_normalise_over_both_ranks_loss_tokens(tmp_path, tok):
    """2 DDP ranks x 2 micro-batches (rank 0 reads the dense ones, rank 1 the sparse ones) take the same
    step as 1 process reading all 4: each token weighs 1 / (global count), not 1 / (its rank's)."""
    one = tmp_path / "one"
    TrainLoop(MaskedLM(tok, accum=4, steps=2), _config(save_every=2), one).train()

    two = tmp_path / "two"
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_objective import MaskedLM, _config
        from muse.distributed.parallelize import ParallelConfig
        from muse.tokenizer import train_bpe
        from muse.train.loop import TrainLoop

        tok = train_bpe(["the king and the queen speak"] * 4, vocab_size=272)
        cfg = _config(save_every=2, parallel=ParallelConfig(mode="ddp"))
        TrainLoop(MaskedLM(tok, accum=2, steps=2), cfg, {str(two)!r}).train()
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MUSE_NO_PROGRESS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], env=env, capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stderr[-4000:]
    want, got = _losses(one / "base"), _losses(two / "base")
    assert got.keys() == want.keys() == {1, 2}
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    ref = load_model_state(one / "base" / "step_000002")
    for name, t in load_model_state(two / "base" / "step_000002").items():
        torch.testing.assert_close(t, ref[name], rtol=1e-4, atol=1e-5, msg=name)


# --- DPO's shape: pairs, and a frozen reference model -----------------------------------------------


class Preference(Objective):
    """Prefer `chosen` (token 1 repeated) over `rejected` (token 2) relative to a frozen copy of the
    starting model: -log sigmoid(beta * (policy margin - reference margin)), one loss unit per pair."""

    seq_len = SEQ

    def __init__(self, tokenizer, steps: int):
        self.tokenizer, self.steps, self.stage = tokenizer, steps, "dpo"

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=VOCAB, n_layer=1, d_model=32, n_head=2, n_kv_head=1, max_seq_len=SEQ)

    def plan(self, dp_size: int) -> Plan:
        return Plan(grad_accum=2, total_steps=self.steps)

    def setup(self, ctx: LoopContext, *, resuming: bool) -> nn.Module:
        policy = build_model(self.model_config(), device=ctx.device)
        self.reference = ctx.parallelize(copy.deepcopy(policy).requires_grad_(False).eval())
        return policy

    def next_batch(self) -> MicroBatch:
        prompt = torch.randint(3, VOCAB, (3, SEQ // 2))
        chosen = torch.cat([prompt, torch.ones(3, SEQ // 2, dtype=torch.long)], 1)
        rejected = torch.cat([prompt, torch.full((3, SEQ // 2), 2)], 1)
        return MicroBatch((chosen, rejected), loss_units=3, tokens=2 * chosen.numel())

    @staticmethod
    def _logp(model, seq):  # summed log-probability of the completion half
        logits = model(seq[:, :-1])
        lp = torch.log_softmax(logits, -1).gather(-1, seq[:, 1:, None])[..., 0]
        return lp[:, SEQ // 2 - 1:].sum(-1)

    def loss(self, model, batch):
        chosen, rejected = batch.inputs
        with torch.no_grad():
            ref = self._logp(self.reference, chosen) - self._logp(self.reference, rejected)
        margin = self._logp(model, chosen) - self._logp(model, rejected) - ref
        return -F.logsigmoid(0.5 * margin).sum()

    def evaluate(self, model):
        return {}


def test_pairs_and_a_frozen_reference_fit_the_protocol(tmp_path, tok):
    objective = Preference(tok, steps=8)
    result = TrainLoop(objective, _config(optim=_adamw()), tmp_path).train()
    losses = _losses(tmp_path / "dpo")
    assert losses[1] == pytest.approx(-F.logsigmoid(torch.tensor(0.0)).item(), rel=1e-5)  # policy == reference
    assert losses[8] < losses[1] - 0.1  # it learns to prefer the chosen completions
    saved = load_model_state(result.checkpoint)
    assert not any(n.startswith("reference") for n in saved)  # the checkpoint holds the policy only
    ref = dict(objective.reference.named_parameters())
    assert not torch.equal(saved["output.weight"], ref["output.weight"])  # the policy moved, the reference did not
    assert all(not p.requires_grad for p in ref.values())


def _adamw():
    from muse.train.optim import OptimConfig

    return OptimConfig(name="adamw", lr=3e-3, weight_decay=0.0)


def test_loop_context_without_a_mesh_is_a_no_op():
    """One process: parallelize is the identity and the sum over ranks is the value itself."""
    ctx = LoopContext(device=torch.device("cpu"), mesh=None, dp_rank=0, dp_size=1,
                      policy=dtype_policy(torch.device("cpu"), "auto"), parallel=ParallelConfig(), run_dir=Path("."))
    m = nn.Linear(2, 2)
    assert ctx.parallelize(m) is m
    assert ctx.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
