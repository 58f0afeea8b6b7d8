"""Reward models: the policy's trunk with a scalar head, trained on preference pairs (Bradley-Terry).

    cfg = load_rm_config(None, {"data": ("prefs.jsonl",), "max_steps": 200})
    result = rm_loop(cfg, "runs/x").train()                  # runs/x/rm/step_*, from runs/x's sft (else base)
    rm = RewardModelReward("runs/x/rm")                      # a muse.posttrain.rewards.RewardFunction
    rm.score([Rollout(({"role": "user", "content": "hi"},), "hello")])   # [Reward(score=..., reason="")]

The model. `RewardModel` is the decoder (muse.model.Transformer) whose output head maps the final hidden
state to one number instead of vocab logits: the same blocks, names and parallelism, so the trunk loads
from any language-model checkpoint and the head (`output`, (1, d_model), no bias: a bias cancels in every
comparison) starts at zero, so that every pair starts at loss log 2. A reply's reward is the score at its
last token, the <|end|> that closes the assistant turn (the rows are rendered by muse.posttrain.preference
through the chat renderer, so a rollout scores on exactly the ids a training pair had).

The loss, per pair: -log sigmoid(r_chosen - r_rejected - margin), margin from the data (default 0).

Checkpoints go to RUN/rm/ (a registered, non-generative stage: serving and eval never pick it by
default). Their config.json holds the trunk's ModelConfig as "model" and {"kind": "reward", ...} as
"head", written because the objective's model config is a `RewardModelConfig` (muse.checkpoint); the
generic loader refuses them, `load_reward_model` reads them.

What it does not know: resume, checkpoints, parallelism, optimizers (the loop's); the data format
(preference.py); who calls the reward function (GRPO, eval: muse.posttrain.rewards).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from muse.checkpoint import load_model_state, read_config, read_head, resolve_checkpoint
from muse.common.errors import CheckpointError
from muse.common.logging import get_logger
from muse.model import ModelConfig, flops_per_token
from muse.model.transformer import Transformer
from muse.posttrain.preference import (
    PairConfig,
    PairObjective,
    PairRow,
    check_pair_config,
    render_reply,
    score_batch,
)
from muse.posttrain.rewards import Reward, Rollout
from muse.tokenizer import END_ID, EOT_ID, PAD_ID, ROLE_IDS, Tokenizer
from muse.train.config import layer_overrides
from muse.train.loop import TrainLoop
from muse.train.objective import LoopContext, MicroBatch
from muse.train.optim import OptimConfig

log = get_logger("muse.posttrain")

REWARD_HEAD = {"kind": "reward", "pool": "last_token"}  # config.json "head" of every RM checkpoint


@dataclass(kw_only=True)
class RewardModelConfig(ModelConfig):
    """A trunk's ModelConfig plus the head muse.checkpoint writes to config.json (not one of the model's fields:
    `to_dict` stays the trunk's, so the trunk reads back as a plain ModelConfig)."""

    head: dict = field(default_factory=lambda: dict(REWARD_HEAD))


class RewardModel(Transformer):
    """The decoder with a scalar head: forward(idx) -> (B, T) float32 scores, one per position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.output = nn.Linear(cfg.d_model, 1, bias=False)  # replaces the (tied or untied) LM head

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        super().init_weights(generator)
        nn.init.zeros_(self.output.weight)  # every reward 0 at first: the loss starts at log 2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(idx)[..., 0]  # (B, T)

    def rewards(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(B,) the score at each row's last token `last` (B,) of padded rows x (B, T)."""
        return self(x).gather(1, last[:, None])[:, 0]


def build_reward_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> RewardModel:
    """Built like muse.model.build_model: on the meta device, then empty storage on `device`, then init."""
    with torch.device("meta"):
        model = RewardModel(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model


def trunk_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(weights to load into a RewardModel, whether they include its head) from an LM or an RM checkpoint."""
    state = load_model_state(ckpt, verify=False)
    head = read_head(ckpt)
    if head is not None and head.get("kind") != "reward":
        raise CheckpointError(f"{ckpt} holds a {head.get('kind')!r} model, neither a language model nor a reward model")
    if head is None:
        state.pop("output.weight", None)  # the LM head: the RM's own head starts at zero
    return state, head is not None


def load_reward_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[RewardModel, Tokenizer, Path]:
    """(model in eval mode, tokenizer, checkpoint dir) of a run's rm stage, or an rm stage/checkpoint directory."""
    ckpt = resolve_checkpoint(path, stages=("rm",))
    if read_head(ckpt) is None:
        raise CheckpointError(f"{ckpt} is a language model, not a reward model; train one with `muse rm`")
    model = build_reward_model(ModelConfig.from_dict(read_config(ckpt)), device=device)
    state, _ = trunk_state(ckpt)
    model.load_state_dict(state, strict=True)
    return model.eval(), Tokenizer.from_file(ckpt / "tokenizer.json"), ckpt


# --- the objective -----------------------------------------------------------------------------------


def _rm_optim() -> OptimConfig:
    # SFT's rates (muse.posttrain.sft) with a faster head: the head starts at zero and is the one new matrix.
    return OptimConfig(matrix_lr=0.01, embedding_lr=0.1, head_lr=0.01, scalar_lr=0.02)


@dataclass
class RMConfig(PairConfig):
    """The reward model's settings: the loop's, the pair objectives' (PairConfig) and these."""

    optim: Any = field(default_factory=_rm_optim)


def load_rm_config(config_file: str | Path | None = None, flags: dict | None = None,
                   sets: list[str] | None = None) -> RMConfig:
    """defaults <- TOML file <- flags (None = not given) <- `--set key=value`, as every stage resolves."""
    return check_pair_config(layer_overrides(RMConfig(), config_file, flags, sets))


class RewardModelObjective(PairObjective):
    stage = "rm"

    def __init__(self, cfg: RMConfig, run_dir: str | Path):
        super().__init__(cfg, run_dir)
        self._rm_cfg = RewardModelConfig(**self._model_cfg.to_dict())

    def model_config(self) -> ModelConfig:
        return self._rm_cfg

    def setup(self, ctx: LoopContext, *, resuming: bool) -> nn.Module:
        model = build_reward_model(self._model_cfg, device=ctx.device)
        if not resuming:
            state, with_head = trunk_state(self.init_from)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or missing != ([] if with_head else ["output.weight"]):
                raise CheckpointError(f"{self.init_from} does not fit a reward model of its own config "
                                      f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            log.info("initialised the trunk%s from %s", " and head" if with_head else "", self.init_from)
        self.ctx = ctx
        return model

    def next_batch(self) -> MicroBatch:
        x, last, margin, n, tokens = score_batch(self._rows(), self.ctx.device)
        return MicroBatch(inputs=(x, last, margin), loss_units=n, tokens=tokens)

    @staticmethod
    def _pair_losses(model: nn.Module, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss per pair, chosen rewards, rejected rewards); rows i and n + i are pair i."""
        x, last, margin = inputs
        r = model(x).float().gather(1, last[:, None])[:, 0]
        n = len(margin)
        chosen, rejected = r[:n], r[n:]
        return -F.logsigmoid(chosen - rejected - margin), chosen, rejected

    def loss(self, model: nn.Module, batch: MicroBatch) -> torch.Tensor:
        losses, chosen, rejected = self._pair_losses(model, batch.inputs)
        self._record(chosen, rejected)
        return losses.sum()

    def _eval_batch(self, model: nn.Module, rows: list[PairRow]):
        x, last, margin, _, _ = score_batch(rows, self.ctx.device)
        losses, chosen, rejected = self._pair_losses(model, (x, last, margin))
        return losses.sum(), chosen, rejected

    def flops_per_token(self) -> float:
        # The trunk's training FLOPs without the vocab head's (6 x V x C per token), plus the scalar head's.
        cfg = self._model_cfg
        return flops_per_token(cfg, self.seq_len) - 6.0 * (cfg.vocab_size - 1) * cfg.d_model


def rm_loop(cfg: RMConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False) -> TrainLoop:
    """The loop `muse rm` runs: a reward model from `cfg.init_from` (or RUN/sft, else RUN/base) into RUN/rm/."""
    return TrainLoop(RewardModelObjective(cfg, run_dir), cfg, run_dir, resume=resume, force=force)


# --- as a reward function ------------------------------------------------------------------------------


class RewardModelReward:
    """A trained reward model as a muse.posttrain.rewards.RewardFunction: each rollout's conversation plus its
    completion, rendered as a training pair's reply is, scored at the reply's last token."""

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", batch_tokens: int = 8192):
        self.model, self.tokenizer, self.checkpoint = load_reward_model(path, device=device)
        self.device = torch.device(device)
        self.batch_tokens = batch_tokens
        self.max_len = self.model.config.max_seq_len
        self.name = f"rm:{self.checkpoint}"

    def _ids(self, r: Rollout) -> list[int]:
        got = render_reply(self.tokenizer, list(r.messages), r.completion, self.max_len)
        if got is None:  # the reply alone outgrows the context (training refuses such pairs): its last tokens
            body = self.tokenizer.encode(r.completion)[-(self.max_len - 3):]
            return [EOT_ID, ROLE_IDS["assistant"], *body, END_ID]
        return got[0].tolist()

    @torch.no_grad()
    def score(self, batch: Sequence[Rollout]) -> list[Reward]:
        rows = [self._ids(r) for r in batch]
        scores = [0.0] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        i = 0
        while i < len(order):  # batches of at most batch_tokens padded tokens, shortest rows together
            j = i + 1
            while j < len(order) and (j - i + 1) * len(rows[order[j]]) <= self.batch_tokens:
                j += 1
            chunk = [rows[k] for k in order[i:j]]
            width = max(len(r) for r in chunk)
            x = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
            for k, ids in enumerate(chunk):
                x[k, :len(ids)] = torch.tensor(ids)
            last = torch.tensor([len(ids) - 1 for ids in chunk])
            got = self.model.rewards(x.to(self.device), last.to(self.device)).float().cpu().tolist()
            for k, s in zip(order[i:j], got):
                scores[k] = s
            i = j
        return [Reward(s) for s in scores]
