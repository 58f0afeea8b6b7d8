"""The objective protocol: what a training stage hands the one training loop (muse.train.loop).

The loop owns what every stage does the same way: devices and the process mesh, parallelizing the
model, the optimizer and its schedule, gradient accumulation, clipping, NaN and out-of-memory handling,
the cadence of logs, evaluations and saves, checkpoints and exact resume, metrics and the time limit.
An `Objective` owns what makes a stage that stage: the model's shape and first weights, the data, the
loss, the evaluation, and whatever state of its own a resume must restore. Pretraining
(muse.train.pretrain) is one objective; SFT, reward models, DPO and GRPO (muse.posttrain) are others.
docs/posttrain.md shows how each fits.

Why `loss` returns a sum. One optimizer step, as the loop drives it on each data-parallel rank:

    batches = [objective.next_batch() for _ in range(plan.grad_accum)]
    units = sum(b.loss_units for b in batches), summed over the data-parallel ranks   # one all-reduce
    for b in batches:
        (objective.loss(model, b) * dp_size / units).backward()   # DDP/FSDP average over dp_size

Every loss term so weighs 1/units, whichever micro-batch and rank it landed in: the gradient is that of
the mean over the whole global batch, as if it were computed in one pass. Averaging per micro-batch
instead would give a token in a micro-batch of 10 loss tokens ten times the weight of one in a batch of
100 - routine once a loss mask (SFT: assistant tokens only) makes counts vary. The counts are known
before any forward pass because each `MicroBatch` states its own; count them where the batch is built
(on the CPU), so that counting never waits for the device.

What it does not know: how the loop parallelizes, checkpoints, schedules or logs, nor any one stage.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from muse.common.device import DtypePolicy
from muse.common.errors import ConfigError
from muse.distributed import mesh as dmesh
from muse.distributed.parallelize import ParallelConfig, parallelize
from muse.model import ModelConfig, flops_per_token
from muse.train.metrics import LOSS_CURVE, Curve


@dataclass
class MicroBatch:
    """One micro-batch of one rank, in whatever form the objective's `loss` reads it."""

    inputs: Any  # tensors on the device, a tuple or a dict: only the objective looks inside
    loss_units: int  # the terms `loss` sums: tokens with a target (LM, SFT), pairs (RM, DPO)
    tokens: int  # tokens the forward pass reads (throughput; `tokens` in metrics.jsonl)


@dataclass(frozen=True)
class Plan:
    """How an objective's batches make steps, once the number of data-parallel ranks is known."""

    grad_accum: int  # micro-batches per optimizer step on each data-parallel rank
    total_steps: int  # the horizon
    tokens_per_step: int | None = None  # when every step reads the same number (train_config.json)

    @classmethod
    def of_micro_batches(cls, micro_batches: int, dp_size: int, total_steps: int) -> Plan:
        """`micro_batches` per step over all data-parallel ranks, an equal share each (SFT, DPO, the RM);
        ConfigError when they do not divide evenly."""
        if micro_batches % dp_size:
            raise ConfigError(f"micro_batches {micro_batches} is not a multiple of the {dp_size} data-parallel "
                              f"processes; set --micro-batches to a multiple of {dp_size}")
        return cls(grad_accum=micro_batches // dp_size, total_steps=total_steps)


@dataclass
class LoopContext:
    """What the loop has set up and an objective may use: the device, the mesh, collectives over ranks."""

    device: torch.device
    mesh: Any  # the (dp, tp) DeviceMesh; None with one process
    dp_rank: int
    dp_size: int
    policy: DtypePolicy
    parallel: ParallelConfig
    run_dir: Path

    def autocast(self):
        """The compute-dtype context the loop runs `loss` and `evaluate` in (for extra forward passes)."""
        if self.policy.compute == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed in place over the data-parallel ranks (tensor-parallel ranks share their data)."""
        return dmesh.all_reduce_sum(t, self.mesh, "dp") if self.mesh is not None else t

    def parallelize(self, module: nn.Module) -> nn.Module:
        """`module` laid out like the trained model (a frozen reference model for DPO, say)."""
        return parallelize(module, self.mesh, self.parallel, policy=self.policy, device=self.device)


class Objective(abc.ABC):
    """A stage's model, data, loss, evaluation and state, for `TrainLoop` to drive.

    The loop calls, in order: `model_config()` and `plan(dp_size)` (cheap; also before starting
    processes, to fail fast), `setup(ctx, resuming=...)` once, then `load_state_dict` when resuming,
    then per step `next_batch()` x grad_accum and `loss(model, batch)` for each, `evaluate(model)` at
    its cadence, `step_metrics()` at every log step and `state_dict()` at every save. `loss` runs under the compute autocast; `evaluate`
    under it too, in eval mode, without gradients.
    """

    stage: str  # the stage directory it writes: a name registered in muse.checkpoint.stages
    seq_len: int  # the longest sequence a micro-batch holds (parallelism checks, FLOP count)
    tokenizer: Any  # the muse.tokenizer.Tokenizer saved with every checkpoint
    init_from: Path | None = None  # the checkpoint the first weights come from (meta.json records it)
    unit_name: str = "loss_tokens"  # what a loss unit is: metrics.jsonl logs <unit_name>_per_s (DPO: "pairs")
    curve: Curve = LOSS_CURVE  # the PNG the loop draws at each evaluation (GRPO: reward and pass@1, not loss)

    @abc.abstractmethod
    def model_config(self) -> ModelConfig:
        """The shape of the model (config.json), without building it."""

    @abc.abstractmethod
    def plan(self, dp_size: int) -> Plan:
        """Gradient accumulation and horizon for `dp_size` data-parallel ranks; ConfigError if impossible."""

    @abc.abstractmethod
    def setup(self, ctx: LoopContext, *, resuming: bool) -> nn.Module:
        """Build this rank's data and the plain model on `ctx.device`, and return the model.

        The loop has seeded torch's RNG, so initialisation is the same on every rank. Load `init_from`'s
        weights unless `resuming` (the loop then loads the checkpoint's). The returned module is what
        checkpoints hold; frozen extras (a reference model) stay on the objective, out of the optimizer.
        """

    @abc.abstractmethod
    def next_batch(self) -> MicroBatch:
        """This rank's next micro-batch of training data."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: MicroBatch) -> torch.Tensor:
        """The SUM of the batch's `loss_units` loss terms, a 0-d tensor; the loop normalises it."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Named validation numbers (e.g. val_loss), the same on every rank (sum over ranks first)."""

    def step_metrics(self) -> dict[str, float]:
        """Numbers of the steps since the last call, logged with the train row at every log step (e.g.
        GRPO's reward mean and rollout time). Called on every rank, so it may reduce over ranks; only
        rank 0's numbers are written."""
        return {}

    def state_dict(self) -> dict:
        """What exact resume needs beyond weights, optimizer, step and global RNGs (e.g. a data position).
        Plain dicts, lists, numbers and tensors: checkpoints are read with weights_only=True."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - optional: no state, nothing to restore
        """Continue from what `state_dict` returned."""

    def flops_per_token(self) -> float:
        """Training FLOPs per token, for MFU; a stage with extra forward passes (DPO's reference) adds them."""
        return flops_per_token(self.model_config(), self.seq_len)

    def memory_hint(self) -> str:
        """What to lower when a step runs out of memory."""
        return "lower the micro-batch size or the sequence length"
