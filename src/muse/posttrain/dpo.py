"""Direct preference optimisation, and two variants, on the one training loop (muse.train.loop).

    cfg = load_dpo_config(None, {"data": ("prefs.jsonl",), "max_steps": 200})
    result = dpo_loop(cfg, "runs/x").train()     # runs/x/dpo/step_*, from runs/x's sft (else base)

The policy starts from `init_from` (RUN's sft checkpoint, else its base); the frozen reference is `ref`
(default: the same checkpoint). For a pair (x, y_c, y_r), with log-probabilities summed over each reply's
tokens and its <|end|> (the preference rows' loss mask, muse.posttrain.preference):

    dpo    (Rafailov et al. 2023)  r = beta * (log pi(y|x) - log ref(y|x));  loss = -log sigmoid(r_c - r_r)
    ipo    (Azar et al. 2023)      h = r_c/beta - r_r/beta;                   loss = (h - 1 / (2 beta))^2
    simpo  (Meng et al. 2024)      r = beta * log pi(y|x) / |y|, no reference; loss = -log sigmoid(r_c - r_r - gamma)

Any of the three can add RPO's term (Pang et al. 2024, "Iterative Reasoning Preference Optimization"):
`nll_weight` x the chosen reply's negative log-likelihood per token, -log pi(y_c|x) / |y_c|. DPO's loss
alone can rise by pushing both replies down, and the chosen reply's probability falls with the rejected
one's; the NLL term holds the chosen replies up, which keeps the policy near its SFT start on the
text it is good at (measured in BENCHMARKS.md section 11: other tasks and the plays' bpb drift less).

An anchor (InstructGPT's "PPO-ptx", Ouyang et al. 2022, here on a preference loss): with `ptx_weight` > 0
every micro-batch also reads up to `ptx_tokens` tokens of anchor data, and the loss gains, per pair,
ptx_weight x that data's mean NLL per target token. The anchor data is the run's pretraining text (RUN/data's
train split) by default, or `ptx_mixture`: a mixture file read exactly as `muse sft` reads it (its tasks,
files and identity, plus the plays' text share when it lists no text source; "default" = muse sft's default
mixture), so the SFT data itself can hold every skill SFT taught while the preferences move one. The NLL
term above holds up the chosen replies; this holds up everything else the model could say. Drawn by the
mixture stream, resumed exactly.
Logged as ptx_loss with every train row, and val_bpb on the plays' val split at each evaluation when the
anchor reads them (measured on RLAIF's pairs in BENCHMARKS.md section 11).

`r` is each loss's implicit reward, logged as chosen_reward / rejected_reward / margin / accuracy (the
share of pairs with r_c > r_r) with every train row (step_metrics) and as val_* on the held-out pairs.
beta 0 means the loss's usual value: 0.1 for dpo and ipo, 2.0 for simpo (whose gamma defaults to 1.0,
the paper's gamma / beta = 0.5). With the policy equal to the reference, dpo's loss is log 2.

Why SimPO as the variant: it needs no reference model, so a step runs one forward fewer and holds one
model fewer (pairs/s and memory in docs/posttrain.md), and it normalises by length, so a reward cannot
grow just because a reply is long; measured on a toy preference set in docs/posttrain.md. IPO is kept
for its bounded loss (it does not push margins to infinity on separable data).

Reference log-probabilities are computed on the fly, under no_grad, in the same micro-batch as the policy's
(one more forward of the same padded rows): nothing to precompute or store, exact resume for free, and a
`--ref` of another shape costs nothing extra to support. flops_per_token counts that forward (1/3 of a
training step's FLOPs per token for a reference of the policy's shape).

What it does not know: resume, checkpoints, parallelism, optimizers (the loop's); the data (preference.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from muse.checkpoint import load_model_state, read_config, resolve_checkpoint
from muse.common.errors import ConfigError
from muse.common.logging import get_logger
from muse.data import bytes_per_token
from muse.data.chat import MixtureStream, collate
from muse.model import ModelConfig, build_model, flops_per_token
from muse.posttrain.mixture import SourceSpec, build_mixture, matching_data_dir, mixture_specs, text_val_loss
from muse.posttrain.preference import PairConfig, PairObjective, PairRow, check_pair_config, lm_batch
from muse.tokenizer import Tokenizer
from muse.train.config import layer_overrides
from muse.train.loop import TrainLoop
from muse.train.objective import LoopContext, MicroBatch
from muse.train.optim import OptimConfig

log = get_logger("muse.posttrain")

LOSSES = ("dpo", "ipo", "simpo")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0}


def preference_loss(kind: str, beta: float, policy_c: torch.Tensor, policy_r: torch.Tensor,
                    ref_c: torch.Tensor | None = None, ref_r: torch.Tensor | None = None,
                    len_c: torch.Tensor | None = None, len_r: torch.Tensor | None = None,
                    gamma: float = 1.0, nll_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) from summed reply log-probs (n,) each (module
    docstring). ref_* for dpo and ipo; len_* (reply tokens, <|end|> included) for simpo and for
    nll_weight > 0 (RPO's term, added to each pair's loss: nll_weight * -policy_c / len_c)."""
    if kind == "simpo":
        chosen, rejected = beta * policy_c / len_c, beta * policy_r / len_r
        loss = -F.logsigmoid(chosen - rejected - gamma)
    elif kind in ("dpo", "ipo"):
        chosen, rejected = beta * (policy_c - ref_c), beta * (policy_r - ref_r)
        if kind == "dpo":
            loss = -F.logsigmoid(chosen - rejected)
        else:
            h = (chosen - rejected) / beta
            loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"unknown preference loss {kind!r}; use one of {', '.join(LOSSES)}")
    if nll_weight:
        loss = loss + nll_weight * (-policy_c / len_c)
    return loss, chosen, rejected


def reply_logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's targets (B,), number of targets (B,)); y is -1 where nothing counts."""
    ce = model(x, y, reduction="none")  # (B, T), 0 where y == -1
    return -ce.sum(1), (y != -1).sum(1)


def _dpo_optim() -> OptimConfig:
    # A fifth of SFT's rates (muse.posttrain.sft): DPO moves a model that is already good, and its loss
    # rewards pushing rejected log-probs down without bound, which high rates do quickly.
    return OptimConfig(matrix_lr=0.002, embedding_lr=0.02, head_lr=0.0004, scalar_lr=0.004)


@dataclass
class DPOConfig(PairConfig):
    """DPO's settings: the loop's, the pair objectives' (PairConfig) and these."""

    optim: Any = field(default_factory=_dpo_optim)
    ref: str = ""  # the frozen reference checkpoint; "" = init_from (dpo, ipo; simpo has none)
    loss: str = "dpo"  # dpo | ipo | simpo
    beta: float = 0.0  # 0 = the loss's usual value (DEFAULT_BETA)
    gamma: float = 1.0  # simpo's target reward margin
    nll_weight: float = 0.0  # RPO: + nll_weight * the chosen reply's NLL per token (module docstring)
    ptx_weight: float = 0.0  # + ptx_weight * the anchor data's mean NLL per target token, per pair
    ptx_mixture: str = ""  # the anchor: "" = the run's pretraining text; a mixture TOML (muse sft's); "default"
    ptx_tokens: int = 2048  # padded anchor tokens per micro-batch (per process) when ptx_weight > 0
    ptx_text_share: float = 0.25  # the plays' share of a ptx_mixture that lists no text source (as muse sft)
    eval_batches: int = 8  # val shard batches of batch_tokens for val_bpb (when ptx_weight > 0)


def load_dpo_config(config_file: str | Path | None = None, flags: dict | None = None,
                    sets: list[str] | None = None) -> DPOConfig:
    """defaults <- TOML file <- flags (None = not given) <- `--set key=value`, as every stage resolves."""
    cfg = check_pair_config(layer_overrides(DPOConfig(), config_file, flags, sets))
    if cfg.loss not in LOSSES:
        raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.beta < 0:
        raise ConfigError(f"beta must be > 0 (or 0 for the loss's default), got {cfg.beta}")
    if not cfg.nll_weight >= 0:
        raise ConfigError(f"nll_weight must be >= 0 (0: no NLL term), got {cfg.nll_weight}")
    if not cfg.ptx_weight >= 0:
        raise ConfigError(f"ptx_weight must be >= 0 (0: no anchor), got {cfg.ptx_weight}")
    if cfg.ptx_tokens <= 0 or cfg.eval_batches <= 0:
        raise ConfigError(f"ptx_tokens and eval_batches must be positive, got {cfg.ptx_tokens}, {cfg.eval_batches}")
    if not 0 <= cfg.ptx_text_share < 1:
        raise ConfigError(f"ptx_text_share must be in [0, 1), got {cfg.ptx_text_share}")
    if cfg.ptx_mixture and not cfg.ptx_weight:
        raise ConfigError("ptx_mixture is the anchor's data, and ptx_weight is 0; give ptx_weight > 0 as well")
    cfg.beta = cfg.beta or DEFAULT_BETA[cfg.loss]
    return cfg


class DPO(PairObjective):
    stage = "dpo"

    def __init__(self, cfg: DPOConfig, run_dir: str | Path):
        super().__init__(cfg, run_dir)
        self.ref_from: Path | None = None
        if cfg.loss != "simpo":
            self.ref_from = resolve_checkpoint(cfg.ref, stages=("sft", "base")) if cfg.ref else self.init_from
            if Tokenizer.from_file(self.ref_from / "tokenizer.json").to_str() != self.tokenizer.to_str():
                raise ConfigError(f"the reference {self.ref_from} has another tokenizer than the policy "
                                  f"{self.init_from}; pick a reference of the same model family (--ref)")
            self._ref_cfg = ModelConfig.from_dict(read_config(self.ref_from))
            if self._ref_cfg.max_seq_len < self.seq_len:
                raise ConfigError(f"the reference's context ({self._ref_cfg.max_seq_len}) is shorter than seq_len "
                                  f"{self.seq_len}; lower --seq-len")
        elif cfg.ref:
            raise ConfigError("loss simpo has no reference model; drop --ref")
        self.ref: nn.Module | None = None
        self.anchor, self.data_dir = self._anchor(cfg) if cfg.ptx_weight > 0 else (None, None)
        self._ptx_acc: torch.Tensor | None = None  # [summed anchor NLL, target tokens] since the last log row

    def _anchor(self, cfg: DPOConfig) -> tuple[MixtureStream, Path | None]:
        """The ptx term's stream, and RUN/data when the anchor reads the plays (val_bpb)."""
        data_dir = matching_data_dir(self.run_dir, self.tokenizer)
        if cfg.ptx_mixture:  # a mixture file, or "default": what `muse sft` trains on when given none
            specs = mixture_specs(None if cfg.ptx_mixture == "default" else cfg.ptx_mixture, [])
        else:
            specs = [SourceSpec("text", "train", "text", 1.0)]
        if data_dir is None and not cfg.ptx_mixture:
            raise ConfigError(f"ptx_weight trains on the run's pretraining text, but {self.run_dir / 'data'} holds no "
                              "shards made with the policy's tokenizer; run on the directory `muse prepare` filled, "
                              "give --set ptx_mixture=FILE.toml, or drop ptx_weight")
        if cfg.ptx_tokens < self.seq_len:
            raise ConfigError(f"ptx_tokens {cfg.ptx_tokens} cannot hold one row of {self.seq_len} tokens; raise it")
        mixture = build_mixture(specs, self.tokenizer, max_len=self.seq_len + 1, data_dir=data_dir,
                                text_share=cfg.ptx_text_share if cfg.ptx_mixture else 0.0, eval_rows=0)
        log.info("ptx anchor: %s", mixture.describe())
        stream = MixtureStream(mixture.train, mixture.weights, batch_tokens=cfg.ptx_tokens, seed=cfg.seed)
        return stream, (data_dir if mixture.text_val is not None else None)

    def setup(self, ctx: LoopContext, *, resuming: bool) -> nn.Module:
        model = build_model(self._model_cfg, device=ctx.device)
        if not resuming:
            model.load_state_dict(load_model_state(self.init_from, verify=False))  # verified in __init__
            log.info("initialised the policy from %s", self.init_from)
        if self.ref_from is not None:
            ref = build_model(self._ref_cfg, device=ctx.device)
            ref.load_state_dict(load_model_state(self.ref_from, verify=False))
            ref.requires_grad_(False)
            # Sharded like the policy under FSDP (each rank holds a slice); otherwise a plain replica: DDP
            # refuses a module without trainable parameters, and it would only replicate it anyway.
            if ctx.mesh is not None and ctx.parallel.mode == "fsdp":
                ref = ctx.parallelize(ref)
            self.ref = ref.eval()
            log.info("reference: %s (frozen)", self.ref_from)
        self.ctx = ctx
        return model

    def next_batch(self) -> MicroBatch:
        x, y, n, tokens = lm_batch(self._rows(), self.ctx.device)
        if self.anchor is None:
            return MicroBatch(inputs=(x, y), loss_units=n, tokens=tokens)
        tx, ty, targets, text_tokens = collate(self.anchor.take(self.ctx.dp_rank, self.ctx.dp_size).rows, self.ctx.device)
        return MicroBatch(inputs=(x, y, tx, ty, targets), loss_units=n, tokens=tokens + text_tokens)

    def _pair_losses(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        logp, counts = reply_logps(model, x, y)
        n = len(logp) // 2
        ref_c = ref_r = None
        if self.ref is not None:
            with torch.no_grad():
                ref_logp, _ = reply_logps(self.ref, x, y)
            ref_c, ref_r = ref_logp[:n], ref_logp[n:]
        return preference_loss(self.cfg.loss, self.cfg.beta, logp[:n], logp[n:], ref_c, ref_r,
                               counts[:n], counts[n:], gamma=self.cfg.gamma, nll_weight=self.cfg.nll_weight)

    def loss(self, model: nn.Module, batch: MicroBatch) -> torch.Tensor:
        x, y, *text = batch.inputs
        losses, chosen, rejected = self._pair_losses(model, x, y)
        self._record(chosen, rejected)
        if not text:
            return losses.sum()
        tx, ty, targets = text
        nll = model(tx, ty, reduction="sum")  # over the anchor's target tokens (a chat row's replies only)
        row = torch.stack([nll.detach().float(), torch.tensor(float(targets), device=nll.device)])
        self._ptx_acc = row if self._ptx_acc is None else self._ptx_acc + row
        return losses.sum() + self.cfg.ptx_weight * len(losses) * nll / max(targets, 1)

    def step_metrics(self) -> dict[str, float]:
        out = super().step_metrics()
        if self._ptx_acc is not None:
            acc, self._ptx_acc = self.ctx.all_reduce_sum(self._ptx_acc).tolist(), None
            out["ptx_loss"] = round(acc[0] / max(acc[1], 1.0), 5)
        return out

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out = super().evaluate(model)
        if self.data_dir is not None:  # how far the policy drifted from the plain text it anchors on
            both = torch.tensor(text_val_loss(model, self.data_dir, self.seq_len, self.cfg.batch_tokens,
                                              self.cfg.eval_batches, self.ctx), dtype=torch.float64, device=self.ctx.device)
            total, n = self.ctx.all_reduce_sum(both).tolist()
            out["val_bpb"] = total / max(n, 1.0) / math.log(2) / bytes_per_token(self.data_dir, "val")
        return out

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.anchor is not None:
            state["ptx"] = self.anchor.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.anchor is not None:
            if "ptx" not in state:
                raise ConfigError("the checkpoint was trained without ptx_weight; resume with the same settings")
            self.anchor.load_state_dict(state["ptx"])

    def _eval_batch(self, model: nn.Module, rows: list[PairRow]):
        x, y, _, _ = lm_batch(rows, self.ctx.device)
        losses, chosen, rejected = self._pair_losses(model, x, y)
        return losses.sum(), chosen, rejected

    def flops_per_token(self) -> float:
        policy = flops_per_token(self._model_cfg, self.seq_len)
        # The reference's forward: a third of its training FLOPs (forward 1, backward 2), on the pairs' tokens only.
        ref = flops_per_token(self._ref_cfg, self.seq_len) / 3 if self.ref_from is not None else 0.0
        if self.anchor is None:
            return policy + ref
        # The reference reads the pairs' share of the tokens: batch_tokens of every batch_tokens + ptx_tokens (budgets).
        return policy + ref * self.cfg.batch_tokens / (self.cfg.batch_tokens + self.cfg.ptx_tokens)


def dpo_loop(cfg: DPOConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False) -> TrainLoop:
    """The loop `muse dpo` runs: DPO (or IPO, SimPO) from `cfg.init_from` (or RUN/sft, else RUN/base) into RUN/dpo/."""
    return TrainLoop(DPO(cfg, run_dir), cfg, run_dir, resume=resume, force=force)
