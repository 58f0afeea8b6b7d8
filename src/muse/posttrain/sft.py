"""Supervised fine-tuning: the SFT objective on the one training loop (muse.train.loop).

    cfg = load_sft_config(None, {"max_steps": 200}, ["optim.matrix_lr=0.01"])
    result = sft_loop(cfg, "runs/x").train()          # runs/x/sft/step_*, from runs/x's base checkpoint

The model and tokenizer come from `init_from` (default: the run's base checkpoint; any checkpoint,
`muse import`ed ones included). The data is a mixture (muse.posttrain.mixture) of chat files, task
train splits, identity conversations and a share of pretraining text, rendered by the chat renderer
with its loss mask and batched by muse.data.chat: one conversation per row, padded to the longest row
of its micro-batch, micro-batches of at most `batch_tokens` padded tokens, `micro_batches` of them per
optimizer step over all ranks. `loss` is the summed cross-entropy over assistant tokens (and text
tokens); the loop divides by the step's global count, so every trained token weighs the same.

`evaluate` reports val_loss (over every source's validation rows, token-weighted), val_loss_<source>
per source, and val_bpb on the run's val shards when the mixture has a text share (comparable with
pretraining's val_bpb: same windows, same seq_len when eval_seq_len matches). Its state is the mixture
stream's position and a count of trained vs read tokens (for loss tokens/s).

What it does not know: resume, checkpoints, parallelism, optimizers (the loop's), how rows are drawn
(muse.data.chat), what the sources are (muse.posttrain.mixture).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from muse.checkpoint import load_model_state
from muse.common.errors import ConfigError
from muse.common.logging import get_logger
from muse.data import bytes_per_token
from muse.data.chat import MixtureStream, collate
from muse.distributed.parallelize import ParallelConfig
from muse.model import ModelConfig, build_model
from muse.posttrain.mixture import build_mixture, matching_data_dir, mixture_specs, text_val_loss
from muse.posttrain.start import open_start, train_seq_len
from muse.train.config import layer_overrides
from muse.train.loop import LoopConfig, TrainLoop
from muse.train.objective import LoopContext, MicroBatch, Objective, Plan
from muse.train.optim import OptimConfig

log = get_logger("muse.posttrain")


def _sft_optim() -> OptimConfig:
    # Half of pretraining's learning rates: the weights are already good, and fine-tuning at a fraction of
    # the base rates is the usual recipe (nanochat's SFT). On the speedrun model a further cut (matrix 0.006,
    # embeddings 0.05) gave the same chat val loss and val bpb (BENCHMARKS.md, post-training).
    return OptimConfig(matrix_lr=0.01, embedding_lr=0.1, head_lr=0.002, scalar_lr=0.02)


@dataclass
class SFTConfig(LoopConfig):
    """SFT's settings: the loop's (LoopConfig) and these. TOML keys, flags and --set spell them the same."""

    optim: Any = field(default_factory=_sft_optim)
    init_from: str = ""  # checkpoint to start from; "" = RUN/base's newest
    data: tuple[str, ...] = ()  # chat JSONL files, weighted by their number of conversations
    mixture: str = ""  # a mixture TOML (docs/posttrain.md); with neither, the default mixture
    # Share of training tokens that are plain pretraining text (when RUN/data matches). Measured on the speedrun
    # model, 150 steps: 0.1 raised val bpb on the plays by 6.6%, 0.25 by 3.1% (chat val loss 0.73 -> 0.81).
    text_share: float = 0.25
    seq_len: int = 0  # longest row in tokens; 0 = the model's max_seq_len
    batch_tokens: int = 4096  # padded tokens per micro-batch (rows are bucketed by length)
    micro_batches: int = 1  # micro-batches per optimizer step, over all data-parallel ranks
    max_steps: int = 300
    eval_rows: int = 64  # validation conversations per source
    eval_batches: int = 8  # val shard batches of batch_tokens for val_bpb (text share)
    val_fraction: float = 0.05  # of each --data file held out for val_loss_<file>


def load_sft_config(config_file: str | Path | None = None, flags: dict | None = None,
                    sets: list[str] | None = None) -> SFTConfig:
    """defaults <- TOML file <- flags (None = not given) <- `--set key=value`, as `muse train` resolves."""
    cfg = layer_overrides(SFTConfig(), config_file, flags, sets)
    for name in ("batch_tokens", "micro_batches", "max_steps", "eval_rows", "log_every", "keep_last"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.seq_len < 0 or not 0 <= cfg.text_share < 1 or not 0 <= cfg.val_fraction < 1:
        raise ConfigError("seq_len must be >= 0, text_share and val_fraction in [0, 1)")
    cfg.parallel = ParallelConfig(**dataclasses.asdict(cfg.parallel))
    return cfg


class SFT(Objective):
    stage = "sft"

    def __init__(self, cfg: SFTConfig, run_dir: str | Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        # The base of the run unless told otherwise; verified (hashed) once, here.
        self.init_from, self.tokenizer, self._model_cfg = open_start(cfg.init_from or self.run_dir, ("base",))
        self.seq_len = train_seq_len(cfg.seq_len, self._model_cfg)
        self.data_dir = matching_data_dir(self.run_dir, self.tokenizer)
        # Rendering everything here, before any process starts, makes a bad file fail fast (and once).
        self.mixture = build_mixture(
            mixture_specs(cfg.mixture or None, list(cfg.data)), self.tokenizer, max_len=self.seq_len + 1,
            data_dir=self.data_dir, text_share=cfg.text_share, eval_rows=cfg.eval_rows, val_fraction=cfg.val_fraction)
        self.stream = MixtureStream(self.mixture.train, self.mixture.weights, batch_tokens=cfg.batch_tokens,
                                    seed=cfg.seed)
        self.read_tokens = self.loss_tokens = 0
        log.info("sft mixture: %s", self.mixture.describe())

    def model_config(self) -> ModelConfig:
        return self._model_cfg

    def plan(self, dp_size: int) -> Plan:
        return Plan.of_micro_batches(self.cfg.micro_batches, dp_size, self.cfg.max_steps)

    def setup(self, ctx: LoopContext, *, resuming: bool) -> nn.Module:
        model = build_model(self._model_cfg, device=ctx.device)
        if not resuming:
            model.load_state_dict(load_model_state(self.init_from, verify=False))  # verified in __init__
            log.info("initialised the weights from %s", self.init_from)
        self.ctx = ctx
        return model

    def next_batch(self) -> MicroBatch:
        mb = self.stream.take(self.ctx.dp_rank, self.ctx.dp_size)
        x, y, units, tokens = collate(mb.rows, self.ctx.device)
        self.read_tokens += tokens
        self.loss_tokens += units
        # tokens: what the forward pass reads that is not padding (throughput counts real tokens only)
        return MicroBatch(inputs=(x, y), loss_units=units, tokens=tokens)

    def loss(self, model: nn.Module, batch: MicroBatch) -> torch.Tensor:
        x, y = batch.inputs
        return model(x, y, reduction="sum")

    # ----- evaluation
    def _rows_loss(self, model: nn.Module, rows: list) -> tuple[float, int]:
        """Summed loss and targets over this rank's share of `rows`, in batches of at most batch_tokens."""
        rows = sorted(rows, key=len)[self.ctx.dp_rank::self.ctx.dp_size]
        total, n, i = 0.0, 0, 0
        while i < len(rows):
            width = len(rows[i][0])
            j = i + 1
            while j < len(rows) and (j - i + 1) * max(width, len(rows[j][0])) <= self.cfg.batch_tokens:
                width = max(width, len(rows[j][0]))
                j += 1
            x, y, units, _ = collate(rows[i:j], self.ctx.device)
            total += float(model(x, y, reduction="sum"))
            n += units
            i = j
        return total, n

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        names, sums = [], []
        for name, val in self.mixture.val.items():
            if name == self.mixture.text_val:
                total, n = text_val_loss(model, self.data_dir, self.seq_len, self.cfg.batch_tokens,
                                         self.cfg.eval_batches, self.ctx)
            elif val is not None:
                total, n = self._rows_loss(model, val.rows)
            else:
                continue
            names.append(name)
            sums += [total, float(n)]
        if not names:
            return {}
        both = torch.tensor(sums, dtype=torch.float64, device=self.ctx.device)
        if self.ctx.mesh is not None:
            both = self.ctx.all_reduce_sum(both)
        vals = both.view(-1, 2).tolist()
        out: dict[str, float] = {}
        chat = [(t, n) for name, (t, n) in zip(names, vals) if name != self.mixture.text_val]
        if chat:  # val_loss: the conversations' (assistant tokens); the text has its own numbers below
            out["val_loss"] = sum(t for t, _ in chat) / max(1.0, sum(n for _, n in chat))
        for name, (t, n) in zip(names, vals):
            out[f"val_loss_{name}"] = t / max(n, 1.0)
            if name == self.mixture.text_val:
                out["val_bpb"] = t / max(n, 1.0) / math.log(2) / bytes_per_token(self.data_dir, "val")
        return out

    # ----- state
    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "read_tokens": self.read_tokens, "loss_tokens": self.loss_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.read_tokens, self.loss_tokens = int(state["read_tokens"]), int(state["loss_tokens"])

    def memory_hint(self) -> str:
        return (f"lower --batch-tokens (now {self.cfg.batch_tokens}; raise --micro-batches to keep the step) "
                f"or --seq-len (now {self.seq_len})")


def sft_loop(cfg: SFTConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False) -> TrainLoop:
    """The loop `muse sft` runs: SFT from `cfg.init_from` (or RUN/base) into `run_dir`/sft/."""
    return TrainLoop(SFT(cfg, run_dir), cfg, run_dir, resume=resume, force=force)
