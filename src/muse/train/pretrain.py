"""Pretraining as an objective: next-token prediction on the token shards `muse prepare` wrote.

`Pretraining(cfg, run_dir)` is what `muse train` hands the training loop (muse.train.loop): a decoder
shaped by `--depth` (or by `--init-from`'s checkpoint, whose weights it starts from), random windows of
RUN/data/train_*.bin in micro-batches of `batch_size` x `seq_len` per data-parallel rank, the summed
cross-entropy of every target, and the validation loss in nats per token and bits per byte. Its one
piece of resumable state is the train loader's position. `pretraining_loop` builds the pair.

What it does not know: the loop's business (devices, parallelism, optimizer, checkpoints, cadence),
where the shards came from (muse.data) or how the model is built (muse.model).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from muse.checkpoint import load_model_state, resolve_checkpoint
from muse.common.errors import ConfigError, DataError
from muse.common.logging import get_logger
from muse.data import TokenLoader, bytes_per_token
from muse.model import ModelConfig, build_model
from muse.tokenizer import Tokenizer
from muse.train.config import TrainConfig, model_config
from muse.train.loop import TrainLoop
from muse.train.objective import LoopContext, MicroBatch, Objective, Plan

log = get_logger("muse.train")


class Pretraining(Objective):
    stage = "base"

    def __init__(self, cfg: TrainConfig, run_dir: str | Path):
        self.cfg = cfg
        self.data_dir = Path(run_dir) / "data"
        if not (self.data_dir / "meta.json").exists():
            raise DataError(f"no prepared data in {self.data_dir}; run `muse prepare --out {run_dir}` first")
        self.seq_len = cfg.seq_len
        self.tokenizer = Tokenizer.from_file(self.data_dir / "tokenizer.json")
        # Resolved (every file hashed against its manifest) once, here; the shape and weights come from it.
        self.init_from = resolve_checkpoint(cfg.init_from, stages=("base",)) if cfg.init_from else None
        self._model_cfg = model_config(cfg, self.tokenizer.vocab_size, self.init_from)
        if cfg.seq_len > self._model_cfg.max_seq_len:
            raise ConfigError(
                f"seq_len {cfg.seq_len} is beyond what the model supports (max_seq_len {self._model_cfg.max_seq_len}); "
                f"lower --seq-len or --set model.max_seq_len={cfg.seq_len}"
            )

    def model_config(self) -> ModelConfig:
        return self._model_cfg

    def plan(self, dp_size: int) -> Plan:
        cfg = self.cfg
        micro_tokens = cfg.batch_size * cfg.seq_len * dp_size
        total = cfg.total_batch_tokens or micro_tokens
        if total % micro_tokens:
            raise ConfigError(
                f"total_batch_tokens {total} is not a multiple of batch_size*seq_len*data-parallel processes = "
                f"{micro_tokens}; choose a multiple (e.g. {max(1, round(total / micro_tokens)) * micro_tokens})"
            )
        if cfg.max_steps:
            steps = cfg.max_steps
        elif cfg.train_tokens:
            steps = max(1, cfg.train_tokens // total)
        else:
            raise ConfigError("set a horizon: --max-steps N or --train-tokens N")
        return Plan(grad_accum=total // micro_tokens, total_steps=steps, tokens_per_step=total)

    def setup(self, ctx: LoopContext, *, resuming: bool) -> nn.Module:
        cfg = self.cfg
        model = build_model(self._model_cfg, device=ctx.device)
        if self.init_from is not None and not resuming:  # continued pretraining: weights, a fresh optimizer
            model.load_state_dict(load_model_state(self.init_from, verify=False))  # verified in __init__
            log.info("initialised the weights from %s", self.init_from)
        self.train_loader = TokenLoader(self.data_dir, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                                        rank=ctx.dp_rank, world_size=ctx.dp_size, device=ctx.device)
        self.val_loader = TokenLoader(self.data_dir, "val", cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                                      rank=ctx.dp_rank, world_size=ctx.dp_size, device=ctx.device)
        self.val_bytes_per_token = bytes_per_token(self.data_dir, "val")
        self.ctx = ctx
        return model

    def next_batch(self) -> MicroBatch:
        x, y = self.train_loader.next_batch()
        # Training windows are whole: every target is a token, none is masked.
        return MicroBatch(inputs=(x, y), loss_units=y.numel(), tokens=x.numel())

    def loss(self, model: nn.Module, batch: MicroBatch) -> torch.Tensor:
        x, y = batch.inputs
        return model(x, y, reduction="sum")

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """val_loss (mean nats/token) and val_bpb (bits per byte) over the first `eval_batches` val batches."""
        total, n = 0.0, 0
        for x, y in self.val_loader.eval_batches(self.cfg.eval_batches):
            total += float(model(x, y, reduction="sum"))
            n += int((y != -1).sum())  # the last batch may be smaller: weight by tokens
        if self.ctx.mesh is not None:  # sum over the data-parallel ranks (tp ranks saw the same windows)
            both = self.ctx.all_reduce_sum(torch.tensor([total, float(n)], dtype=torch.float64, device=self.ctx.device))
            total, n = float(both[0]), int(both[1])
        if n == 0:
            raise DataError("the val split is too small for one batch; lower --seq-len/--batch-size or raise --val-fraction")
        val = total / n
        return {"val_loss": val, "val_bpb": val / math.log(2) / self.val_bytes_per_token}

    def state_dict(self) -> dict:
        return {"loader": self.train_loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.train_loader.load_state_dict(state["loader"])

    def memory_hint(self) -> str:
        return (f"lower --batch-size (now {self.cfg.batch_size}; keep --total-batch-tokens to keep the global "
                f"batch through gradient accumulation) or --seq-len (now {self.cfg.seq_len})")


def pretraining_loop(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False) -> TrainLoop:
    """The loop `muse train` runs: Pretraining on `run_dir`/data into `run_dir`/base/."""
    return TrainLoop(Pretraining(cfg, run_dir), cfg, run_dir, resume=resume, force=force)
