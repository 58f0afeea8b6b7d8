"""GRPO: group-relative policy optimisation with verifiable rewards, on the one training loop (muse.train.loop).

    cfg = load_grpo_config(None, {"tasks": ("arithmetic_2digit",), "max_steps": 100})
    result = grpo_loop(cfg, "runs/x").train()        # runs/x/grpo/step_*, from runs/x's latest stage (sft, ...)

A step, on each data-parallel rank (DeepSeekMath's GRPO, with the token-level loss of DAPO / Dr. GRPO):
1. Rollouts. `prompts_per_step` prompts are taken from the tasks' train splits (pooled, shuffled per epoch
   with `seed`; each task's first `train_skip` samples left out, for an SFT stage trained on those), asked
   zero-shot as chats exactly as muse.posttrain.taskscore and `muse eval` ask them
   (muse.tasks.build_messages, then render_prompt), and each gets a group of `group_size` samples from the
   paged engine running on the live policy weights (muse.posttrain.rollout), until <|end|> or
   `max_new_tokens`. Each rank rolls out its own contiguous share of the step's prompts. Group i of step s
   is seeded from (seed, s, i), so the same step makes the same samples on any number of processes and
   after any resume.
2. Rewards (muse.posttrain.rewards: the task verifier by default) on the reply texts, and the
   group-relative advantage of each sample: A = (r - mean(group)) / (std(group) + 1e-4) (std with Bessel's
   correction, as TRL), or r - mean(group) with scale_rewards=false (Dr. GRPO: dividing by the std
   up-weights groups that are nearly solved or nearly hopeless).
3. The loss, on completion tokens only (the prompt is given): per token t of sample i,
       -min(rho_t A_i, clip(rho_t, 1 - clip_eps, 1 + clip_eps) A_i) + kl_coef * KL_t,
   rho_t = pi(t) / pi_old(t). `loss` returns the sum and loss_units are the step's completion tokens, so the
   loop divides by their global count: every completion token weighs the same, long replies are not
   averaged down (token-level normalisation, DAPO).

On by default and why:
- One update per batch (`updates_per_batch` = 1): pi_old is the current policy (detached), rho = 1 exactly,
  and the clipped objective is plain REINFORCE with a group baseline; clipping does nothing. With
  `updates_per_batch` > 1 the same rollouts serve that many optimizer steps and pi_old is the engine's
  sampled log-probabilities (raw model, fp32); then clipping keeps the later steps near the sampler.
- The loss's log-probabilities are those of the distribution the rollouts were sampled from: the logits
  divided by `temperature` (as TRL and verl do); at T != 1 the raw model's would give another policy's
  gradient. With `updates_per_batch` > 1 and T != 1, pi_old comes from the training forward on the rollout's
  weights (the engine reports raw T = 1 log-probabilities); top_p's truncation is not modelled (TRL neither).
- No KL to a reference (`kl_coef` = 0): DAPO, Dr. GRPO and nanochat drop it. It costs a forward pass of
  a frozen reference per micro-batch, it holds the policy back from where the verifier pulls it, and at
  one update per batch nothing else needs a trust region. `kl_coef` > 0 adds the k3 estimator
  exp(ref - logp) - (ref - logp) - 1 against the `init_from` weights (Schulman's unbiased, positive KL).
- A group whose rewards are all equal (all right or all wrong) has zero advantage and so no gradient,
  but its tokens still count in loss_units: the step is the mean over everything sampled, so a step of
  mostly solved groups moves less, and the scale of a step does not jump with how many groups happened
  to be informative. `drop_equal_groups` (off by default) leaves such groups out of the update instead:
  no forward or backward on them (the update is most of a step's time), and the step's mean is over the
  informative groups' tokens only (DAPO's dynamic sampling re-rolls them to refill the batch; this only
  drops them). With kl_coef > 0 the dropped groups' KL term goes too. `informative_groups` in the
  metrics is the share of groups whose rewards differ, either way.
- Truncated replies ("length") are trained on like the others; they usually score 0.

Weights and the engine: rollouts.weights_changed() (prefix cache reset, and the weight copy under FSDP)
runs after every optimizer step, before the engine runs again; before a rollout that follows another
rollout on unchanged weights (an evaluation), the prefix cache alone is reset. Exact resume: the prompt position and the step are in `state_dict`, and
with `updates_per_batch` > 1 also the rollout batch still being reused, so a killed run resumes with
the same losses, bit for bit on CPU.

`evaluate` samples `eval_samples` (k) replies at the training temperature to the first `eval_prompts`
prompts of the tasks' validation splits (fixed seeds, so every evaluation asks the same): `pass@1` is the
mean over all k samples of the task grade being 1 (not greedy: `muse eval` gives greedy scores),
`pass@k` the share of prompts with at least one right sample, `val_reward` the mean reward. Per task too
when there are several. `step_metrics`: reward_mean, reward_std, pass_rate, response_len, entropy (of the
policy at the sampled positions, from the training forward), kl (with kl_coef > 0), rollout_s (the
engine and the rewards), update_s (the rest of the step), reward_errors, informative_groups.

What it does not know: resume, checkpoints, optimizers (the loop's), the engine (muse.posttrain.rollout),
how rewards score (muse.posttrain.rewards), tasks (muse.tasks).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import muse.tasks as tasks_lib
from muse.checkpoint import latest_stage, load_model_state
from muse.common.errors import ConfigError, DataError, UsageError
from muse.common.logging import get_logger
from muse.data.chat import collate
from muse.distributed import mesh as dmesh
from muse.distributed.parallelize import ParallelConfig
from muse.model import ModelConfig, build_model
from muse.posttrain.rewards import RewardFunction, Rollout, build_reward, reward_errors
from muse.posttrain.rollout import Completion, Rollouts
from muse.posttrain.start import open_start
from muse.tokenizer import END_ID, EOT_ID, render_prompt
from muse.tokenizer.text import TextStream
from muse.train.config import layer_overrides
from muse.train.loop import LoopConfig, TrainLoop
from muse.train.metrics import Curve
from muse.train.objective import LoopContext, MicroBatch, Objective, Plan
from muse.train.optim import OptimConfig

log = get_logger("muse.posttrain")

ADV_EPS = 1e-4  # TRL's: keeps a group with a tiny spread from blowing its advantages up


def _grpo_optim() -> OptimConfig:
    # A tenth of SFT's rates (a twentieth of pretraining's, nanochat's RL share of base): Muon's update has
    # a fixed size whatever the gradient's scale, and a policy gradient from a few groups is noisy. On the
    # speedrun model (BENCHMARKS.md 10) matrix 4e-3 collapsed the policy onto one reply and 2e-3 lost 6
    # points of arithmetic_1digit in 100 steps, 1e-3 was stable (letter_count +3, arithmetic_1digit -1).
    return OptimConfig(matrix_lr=0.001, embedding_lr=0.01, head_lr=0.0002, scalar_lr=0.002)


@dataclass
class GRPOConfig(LoopConfig):
    """GRPO's settings: the loop's (LoopConfig) and these. TOML keys, flags and --set spell them the same."""

    optim: Any = field(default_factory=_grpo_optim)
    init_from: str = ""  # checkpoint to start from; "" = RUN's latest generative stage (not grpo itself): sft, else base
    tasks: tuple[str, ...] = ()  # built-in generate/chat task names or task files: the prompts and the verifiers
    rewards: tuple[str, ...] = ()  # --reward specs (muse.posttrain.rewards); () = ("task",)
    group_size: int = 8  # samples per prompt (G)
    prompts_per_step: int = 16  # prompts per optimizer step, over all data-parallel ranks
    micro_batches: int = 0  # the step's sequences in this many micro-batches over all ranks; 0 = one per rank
    max_new_tokens: int = 0  # reply length cap; 0 = the tasks' generation max_tokens (the largest)
    temperature: float = 1.0  # sampling temperature of rollouts and of evaluation
    top_p: float = 1.0
    scale_rewards: bool = True  # divide advantages by the group's std (GRPO); false = Dr. GRPO
    clip_eps: float = 0.2  # PPO ratio clipping, active when updates_per_batch > 1
    updates_per_batch: int = 1  # optimizer steps per rollout batch
    kl_coef: float = 0.0  # weight of the k3 KL to the init_from reference (0: no reference at all)
    drop_equal_groups: bool = False  # leave groups whose rewards are all equal out of the update (below)
    train_skip: int = 0  # leave each task's first N train samples out of the prompts (the ones SFT learned from)
    max_steps: int = 100
    eval_every: int = 20
    eval_prompts: int = 64  # validation prompts per evaluation, over all tasks
    eval_samples: int = 4  # k of pass@k (samples per validation prompt)
    max_sequences: int = 0  # sequences the engine runs at once; 0 = a whole rollout batch of this rank


def load_grpo_config(config_file: str | Path | None = None, flags: dict | None = None,
                     sets: list[str] | None = None) -> GRPOConfig:
    """defaults <- TOML file <- flags (None = not given) <- `--set key=value`, as every stage resolves."""
    cfg = layer_overrides(GRPOConfig(), config_file, flags, sets)
    if cfg.group_size < 2:
        raise ConfigError(f"group_size must be at least 2, got {cfg.group_size}: GRPO's advantage compares each "
                          "sample with the others of its group (set --group-size 2 or more)")
    for name in ("prompts_per_step", "max_steps", "updates_per_batch", "eval_samples", "log_every", "keep_last"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("micro_batches", "max_new_tokens", "eval_prompts", "max_sequences", "kl_coef", "clip_eps",
                 "train_skip"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 < cfg.temperature <= 10 or not 0 < cfg.top_p <= 1:
        raise ConfigError(f"temperature must be in (0, 10] and top_p in (0, 1], got {cfg.temperature} and {cfg.top_p}")
    if cfg.micro_batches > cfg.prompts_per_step * cfg.group_size:
        raise ConfigError(f"micro_batches ({cfg.micro_batches}) is more than the step's {cfg.prompts_per_step} x "
                          f"{cfg.group_size} sequences; lower --set micro_batches")
    cfg.parallel = ParallelConfig(**dataclasses.asdict(cfg.parallel))
    return cfg


# ----------------------------------------------------------------------------------------------------
# The math, as plain functions (tests/test_grpo.py checks them against hand-computed numbers)


def group_advantages(rewards: list[list[float]], scale: bool = True, eps: float = ADV_EPS) -> list[list[float]]:
    """Per group: r - mean, divided by (std + eps) when `scale` (std with Bessel's correction)."""
    out = []
    for group in rewards:
        r = np.asarray(group, dtype=np.float64)
        a = r - r.mean()
        if scale:
            a = a / ((r.std(ddof=1) if len(r) > 1 else 0.0) + eps)
        out.append([float(v) for v in a])
    return out


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *,
                clip_eps: float, ref_logp: torch.Tensor | None = None,
                kl_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, summed KL) over the masked tokens; logp, old_logp, ref_logp, mask (B, T), adv (B,).

    Per token: -min(rho A, clip(rho, 1-eps, 1+eps) A) + kl_coef * (exp(ref - logp) - (ref - logp) - 1)."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)  # (B, T)
    a = adv.to(logp.dtype)[:, None]  # (B, 1)
    per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None:
        d = ref_logp - logp
        k3 = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * k3
        kl = (k3.detach() * mask).sum()
    return (per_token * mask).sum(), kl


def token_logprobs(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y_t | x_<=t) with 0 where y == -1, the fp32 logits); both (B, T[, V]). With a temperature T != 1
    the distribution is the sampler's, softmax(logits / T), and the logits returned are divided by T."""
    logits = model(x)  # (B, T, V), fp32
    if temperature != 1.0:
        logits = logits / temperature
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.view(B * T, V), y.view(B * T), ignore_index=-1, reduction="none")
    return -nll.view(B, T), logits


def keep_informative(seqs: list, informative: list[bool], group_size: int, least: int) -> list:
    """The sequences of the groups whose rewards differ (`seqs` in group order, `group_size` each); when that
    leaves fewer than `least` (the micro-batches to fill), the first left-out ones fill up: their advantages
    are 0, so they add tokens to the step's count and nothing to its gradient."""
    kept = [s for i, s in enumerate(seqs) if informative[i // group_size]]
    if len(kept) < least:
        kept += [s for i, s in enumerate(seqs) if not informative[i // group_size]][:least - len(kept)]
    return kept


def rollout_seed(seed: int, step: int, prompt: int) -> int:
    """The seed of the group of the step's `prompt`-th prompt (the engine hashes it again)."""
    return (seed * 1_000_003 + step) * 1_000_003 + prompt


def eval_seed(seed: int, prompt: int) -> int:
    return -(seed * 1_000_003 + prompt) - 1  # negative: never one of rollout_seed's


# ----------------------------------------------------------------------------------------------------


class Prompt(NamedTuple):
    task: str
    sample: tasks_lib.Sample
    messages: tuple[dict, ...]
    ids: list[int]


def load_tasks(specs) -> dict[str, tasks_lib.Task]:
    """{name: task} of the generate/chat tasks `specs` names; TaskError for an unknown or unusable one."""
    joined = ",".join(s for s in specs if s and s.strip())
    if not joined:
        gen = [n for n in tasks_lib.names() if tasks_lib.get(n).kind in ("generate", "chat")]
        raise ConfigError(f"name the tasks to train on: --task NAME[,NAME] (built-in generative tasks: {', '.join(gen)})")
    out = {}
    for task in tasks_lib.resolve(joined):
        if task.kind not in ("generate", "chat") or task.grader is None:
            raise UsageError(f"task '{task.name}' is a {task.kind} task; GRPO needs tasks whose replies are graded "
                             "(generate or chat)")
        if "train" not in task.splits:
            raise UsageError(f"task '{task.name}' has no train split (splits: {', '.join(task.splits)}); GRPO "
                             "samples its prompts from the train split")
        out[task.name] = task
    return out


class GRPO(Objective):
    stage = "grpo"
    unit_name = "completion_tokens"
    # The loss is ~0 by construction (advantages are centred per group): reward.png shows what moves.
    curve = Curve(train="reward_mean", val="pass@1", ylabel="reward (train) / pass@1 (val)", file="reward.png")

    def __init__(self, cfg: GRPOConfig, run_dir: str | Path, *, reward: RewardFunction | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.tasks = load_tasks(cfg.tasks)
        self.reward = reward if reward is not None else build_reward(list(cfg.rewards), self.tasks)
        self.init_from, self.tokenizer, self._model_cfg = open_start(cfg.init_from or self.run_dir,
                                                                     self._start_stages())
        context = self._model_cfg.max_seq_len
        self.max_new_tokens = cfg.max_new_tokens or max(t.generation.max_tokens for t in self.tasks.values())
        if self.max_new_tokens >= context:
            raise ConfigError(f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt in the model's "
                              f"context ({context}); lower --max-new-tokens")
        room = context - self.max_new_tokens
        self.train_prompts = self._prompts("train", room)
        if not self.train_prompts and cfg.train_skip:
            raise DataError(f"train_skip {cfg.train_skip} leaves no train prompt of {', '.join(self.tasks)}; lower it")
        if not self.train_prompts:
            raise DataError(f"every train prompt of {', '.join(self.tasks)} is longer than {room} tokens (the context "
                            f"{context} minus max_new_tokens {self.max_new_tokens}); lower --max-new-tokens")
        self.val_prompts = self._eval_prompt_list(room)
        self.max_prompt_tokens = max(len(p.ids) for p in self.train_prompts + self.val_prompts)
        self.seq_len = self.max_prompt_tokens + self.max_new_tokens
        # position and progress (state_dict), the batch being trained on, and step_metrics' accumulators
        self.pos = self.step = 0
        self._mb = 0
        self._batch: list | None = None
        self._chunks: list = []
        self._weights_dirty = False  # an optimizer step since the engine last saw the weights
        self._cache_dirty = False  # a rollout since the engine's prefix cache was last reset
        self._step_t0: float | None = None
        self._step_rollout_s = 0.0
        self._reset_acc()
        self.rollouts: Rollouts | None = None
        self.ref: nn.Module | None = None

    def _start_stages(self) -> tuple[str, ...]:
        """Where a run directory's GRPO starts: its latest generative stage (dpo after sft, say), unless that is
        grpo itself (a --force restart starts over from what came before it): then sft, else base."""
        latest = latest_stage(self.run_dir) if self.run_dir.is_dir() else None
        return (latest,) if latest not in (None, "grpo") else ("sft", "base")

    # ----- prompts
    def _prompt(self, task: tasks_lib.Task, sample: tasks_lib.Sample) -> Prompt:
        messages = tasks_lib.build_messages(task, sample)
        return Prompt(task.name, sample, tuple(messages), render_prompt(self.tokenizer, messages))

    def _prompts(self, split: str, room: int) -> list[Prompt]:
        out, dropped = [], 0
        for task in self.tasks.values():
            if split not in task.splits:
                continue
            samples = task.samples(split)
            for sample in samples[self.cfg.train_skip:] if split == "train" else samples:
                p = self._prompt(task, sample)
                if len(p.ids) > room:
                    dropped += 1
                    continue
                out.append(p)
        if dropped:
            log.warning("%d %s prompts are longer than %d tokens (context minus max_new_tokens); left out",
                        dropped, split, room)
        return out

    def _eval_prompt_list(self, room: int) -> list[Prompt]:
        with_val = [t for t in self.tasks.values() if "validation" in t.splits]
        if not with_val or not self.cfg.eval_prompts:
            return []
        out = []
        for i, task in enumerate(with_val):  # eval_prompts split evenly over the tasks, first ones first
            quota = self.cfg.eval_prompts // len(with_val) + (i < self.cfg.eval_prompts % len(with_val))
            out += [p for p in (self._prompt(task, s) for s in task.samples("validation")[:quota]) if len(p.ids) <= room]
        return out

    def _train_prompt(self, g: int) -> Prompt:
        """The g-th prompt of the endless stream: epoch g // n, shuffled with (seed, epoch)."""
        n = len(self.train_prompts)
        epoch = g // n
        if getattr(self, "_order_epoch", None) != epoch:
            order = list(range(n))
            random.Random(f"{self.cfg.seed}/grpo/{epoch}").shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self.train_prompts[self._order[g % n]]

    # ----- the loop's hooks
    def model_config(self) -> ModelConfig:
        return self._model_cfg

    def plan(self, dp_size: int) -> Plan:
        for name in ("prompts_per_step", "micro_batches"):
            if getattr(self.cfg, name) % dp_size:
                raise ConfigError(f"{name} {getattr(self.cfg, name)} is not a multiple of the {dp_size} data-parallel "
                                  f"processes (each rolls out and trains an equal share); set it to a multiple of {dp_size}")
        return Plan(grad_accum=max(1, self.cfg.micro_batches // dp_size), total_steps=self.cfg.max_steps)

    def setup(self, ctx: LoopContext, *, resuming: bool) -> nn.Module:
        log.info("grpo: %d train prompts from %s, %d validation prompts; reward %s; G=%d x %d prompts per step",
                 len(self.train_prompts), ", ".join(self.tasks), len(self.val_prompts), self.reward.name,
                 self.cfg.group_size, self.cfg.prompts_per_step)
        model = build_model(self._model_cfg, device=ctx.device)
        if not resuming:
            model.load_state_dict(load_model_state(self.init_from, verify=False))  # verified in __init__
            log.info("initialised the weights from %s", self.init_from)
        if self.cfg.kl_coef > 0:  # the frozen reference: init_from's weights, neither trained nor saved
            ref = build_model(self._model_cfg, device=ctx.device)
            ref.load_state_dict(load_model_state(self.init_from, verify=False))
            ref.requires_grad_(False).eval()
            # FSDP shards it like the policy; DDP needs no wrapper for a module that is never trained.
            self.ref = ctx.parallelize(ref) if ctx.mesh is not None and ctx.parallel.mode == "fsdp" else ref
        self.ctx, self.model = ctx, model
        self.grad_accum = max(1, self.cfg.micro_batches // ctx.dp_size)
        self._reset_acc()
        return model

    def _engine(self) -> Rollouts:
        """The engine over the live weights, built at first use (after the loop has parallelized the model),
        and reset when the weights changed or another rollout ran since its last reset."""
        cfg, dp = self.cfg, self.ctx.dp_size
        if self.rollouts is None:
            own = max(cfg.prompts_per_step // dp * cfg.group_size, -(-len(self.val_prompts) // dp) * cfg.eval_samples)
            self.rollouts = Rollouts(self.model, max_prompt_tokens=self.max_prompt_tokens,
                                     max_new_tokens=self.max_new_tokens, max_sequences=cfg.max_sequences or own,
                                     eos_ids=(END_ID, EOT_ID))
        elif self._weights_dirty:
            self.rollouts.weights_changed()  # a collective under FSDP: every rank gets here together
        elif self._cache_dirty:
            # Same weights, but a cached prompt prefix computed inside another batch may differ in the last
            # bits from a fresh one; a resumed run starts empty, so every rollout does.
            self.rollouts.engine.reset_prefix_cache()
        self._weights_dirty, self._cache_dirty = False, True
        return self.rollouts

    def _sample(self, prompts: list[Prompt], n: int, seeds: list[int]) -> tuple[list[list[Completion]], list[Rollout]]:
        with torch.no_grad(), self.ctx.autocast():  # the update's compute dtype (evaluate is under it already)
            groups = self._engine().generate([p.ids for p in prompts], n=n, temperature=self.cfg.temperature,
                                             top_p=self.cfg.top_p, seeds=seeds)
        rollouts = [Rollout(p.messages, self._text(p, c), p.sample, p.task) for p, g in zip(prompts, groups) for c in g]
        return groups, rollouts

    def _text(self, p: Prompt, c: Completion) -> str:
        """The reply as the graders read it: the one text edge, cut at the task's chat stop strings."""
        stream = TextStream(self.tokenizer, stop=self.tasks[p.task].generation.chat_stop)
        return stream.push(c.token_ids) + stream.finish()

    def _passes(self, rollouts: list[Rollout]) -> list[float]:
        """1.0 where the task's grader gives full marks (a grader that raises: 0)."""
        out = []
        for r in rollouts:
            try:
                out.append(float(tasks_lib.grade_sample(self.tasks[r.task], r.sample, r.completion).score >= 1.0))
            except Exception:
                out.append(0.0)
        return out

    def _rollout(self) -> list[tuple]:
        """This rank's sequences of a new rollout batch: (prompt ids, completion, advantage) each."""
        cfg, t0 = self.cfg, time.perf_counter()
        share = cfg.prompts_per_step // self.ctx.dp_size
        first = self.ctx.dp_rank * share
        prompts = [self._train_prompt(self.pos + j) for j in range(first, first + share)]
        seeds = [rollout_seed(cfg.seed, self.step, j) for j in range(first, first + share)]
        self.pos += cfg.prompts_per_step  # every rank moves past the whole step's prompts
        groups, rollouts = self._sample(prompts, cfg.group_size, seeds)
        errors = reward_errors(self.reward)
        rewards = [r.score for r in self.reward.score(rollouts)]
        if len(rewards) != len(rollouts):
            raise UsageError(f"reward {self.reward.name} returned {len(rewards)} scores for {len(rollouts)} replies")
        G = cfg.group_size
        by_group = [rewards[i * G:(i + 1) * G] for i in range(len(groups))]
        advs = group_advantages(by_group, cfg.scale_rewards)
        informative = [max(g) > min(g) for g in by_group]
        passes = self._passes(rollouts)
        acc = self._acc
        acc["rollouts"] += 1
        acc["samples"] += len(rewards)
        acc["reward"] += sum(rewards)
        acc["reward_sq"] += sum(r * r for r in rewards)
        acc["passes"] += sum(passes)
        acc["response_tokens"] += sum(len(c.token_ids) for g in groups for c in g)
        acc["errors"] += reward_errors(self.reward) - errors
        acc["groups"] += len(groups)
        acc["informative"] += sum(informative)
        seqs = [(p.ids, c.token_ids, c.logprobs, a) for p, g, ga in zip(prompts, groups, advs) for c, a in zip(g, ga)]
        if cfg.drop_equal_groups:
            seqs = keep_informative(seqs, informative, G, self.grad_accum)
        self._step_rollout_s = time.perf_counter() - t0
        acc["rollout_s"] += self._step_rollout_s
        return seqs

    def _close_step(self) -> None:
        """Count the wall time since the step's first micro-batch, less its rollout, as update time."""
        if self._step_t0 is not None:
            self._acc["update_s"] += time.perf_counter() - self._step_t0 - self._step_rollout_s
            self._acc["steps"] += 1
            self._step_t0 = None

    def next_batch(self) -> MicroBatch:
        if self._mb == 0:  # the first micro-batch of a step: maybe a new rollout batch
            self._close_step()
            self._step_t0, self._step_rollout_s = time.perf_counter(), 0.0
            if self._batch is None or self.step % self.cfg.updates_per_batch == 0:
                self._batch = self._rollout()
                if self.cfg.updates_per_batch > 1 and self.cfg.temperature != 1.0:
                    self._batch = self._sampler_logprobs(self._batch)
            self._chunks = [list(c) for c in np.array_split(np.arange(len(self._batch)), self.grad_accum)]
        seqs = [self._batch[i] for i in self._chunks[self._mb]]
        self._mb += 1
        if self._mb == self.grad_accum:  # every micro-batch of the step is out: the weights change next
            self._mb, self.step = 0, self.step + 1
            self._weights_dirty = True
        return self._collate(seqs)

    def _sampler_logprobs(self, seqs: list[tuple]) -> list[tuple]:
        """`seqs` with each completion's log-probabilities under the tempered policy that sampled it, from the
        training forward on the current weights (the sampler's: no update since the rollout), in the step's
        micro-batches (the same count on every rank: FSDP's forward is a collective). The engine reports
        the raw model's log-probabilities (T = 1), which are pi_old only at temperature 1."""
        T, out = self.cfg.temperature, []
        with torch.no_grad(), self.ctx.autocast():
            for chunk in np.array_split(np.arange(len(seqs)), self.grad_accum):
                part = [seqs[i] for i in chunk]
                x, y, _, _ = self._collate(part).inputs
                logp = token_logprobs(self.model, x, y, T)[0].float().cpu()
                for r, (prompt, completion, _, adv) in enumerate(part):
                    start = len(prompt) - 1  # position t predicts token t + 1
                    out.append((prompt, completion, logp[r, start:start + len(completion)].tolist(), adv))
        return out

    def _collate(self, seqs: list[tuple]) -> MicroBatch:
        rows, old = [], []
        for prompt, completion, logprobs, _ in seqs:
            ids = np.asarray(list(prompt) + list(completion), dtype=np.int64)
            mask = np.zeros(len(ids), dtype=np.uint8)
            mask[len(prompt):] = 1
            rows.append((ids, mask))
            # aligned with the targets: position t predicts ids[t + 1]
            old.append([0.0] * (len(prompt) - 1) + list(logprobs))
        x, y, units, tokens = collate(rows, self.ctx.device)
        old_t = torch.zeros(x.shape, dtype=torch.float32)
        for r, lp in enumerate(old):
            old_t[r, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
        adv = torch.tensor([s[3] for s in seqs], dtype=torch.float32)
        return MicroBatch(inputs=(x, y, old_t.to(self.ctx.device), adv.to(self.ctx.device)), loss_units=units,
                          tokens=tokens)

    def loss(self, model: nn.Module, batch: MicroBatch) -> torch.Tensor:
        x, y, old, adv = batch.inputs
        mask = y != -1
        T = self.cfg.temperature
        logp, logits = token_logprobs(model, x, y, T)  # the sampler's distribution: tempered
        ref_logp = None
        if self.ref is not None:
            with torch.no_grad():
                ref_logp = token_logprobs(self.ref, x, y, T)[0]
        # One update per batch: pi_old is the policy itself (rho = 1, its gradient that of log pi); more: the sampler's.
        old_logp = old if self.cfg.updates_per_batch > 1 else logp.detach()
        total, kl = policy_loss(logp, old_logp, adv, mask, clip_eps=self.cfg.clip_eps, ref_logp=ref_logp,
                                kl_coef=self.cfg.kl_coef)
        with torch.no_grad():  # entropy of the policy where it sampled, (N, V) -> (N,)
            sel = logits[mask]
            entropy = (torch.logsumexp(sel, -1) - (torch.softmax(sel, -1) * sel).sum(-1)).sum()
            self._acc_t += torch.stack([entropy, kl.float(), torch.tensor(float(batch.loss_units), device=entropy.device)])
        return total

    # ----- evaluation
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        self._close_step()
        if not self.val_prompts:
            return {}
        k, dp, rank = self.cfg.eval_samples, self.ctx.dp_size, self.ctx.dp_rank
        idx = list(range(rank, len(self.val_prompts), dp))
        names = list(self.tasks)
        sums = torch.zeros(len(names), 5, dtype=torch.float64)  # per task: prompts, samples, passes, any pass, reward
        self._engine()  # on every rank, with prompts or not: the weight sync may be a collective
        if idx:
            prompts = [self.val_prompts[i] for i in idx]
            _, rollouts = self._sample(prompts, k, [eval_seed(self.cfg.seed, i) for i in idx])
            rewards = [r.score for r in self.reward.score(rollouts)]
            passes = self._passes(rollouts)
            for j, p in enumerate(prompts):
                row = sums[names.index(p.task)]
                got = passes[j * k:(j + 1) * k]
                row += torch.tensor([1, k, sum(got), float(max(got) > 0), sum(rewards[j * k:(j + 1) * k])],
                                    dtype=torch.float64)
        if self.ctx.mesh is not None:
            sums = self.ctx.all_reduce_sum(sums.to(self.ctx.device)).cpu()
        total = sums.sum(0)
        out = self._eval_numbers(total, k, "")
        if len(names) > 1:
            for name, row in zip(names, sums):
                if row[0] > 0:
                    out.update(self._eval_numbers(row, k, f"_{name}"))
        return out

    @staticmethod
    def _eval_numbers(row: torch.Tensor, k: int, suffix: str) -> dict[str, float]:
        prompts, samples, passes, anyp, reward = row.tolist()
        return {f"pass@1{suffix}": passes / max(samples, 1), f"pass@{k}{suffix}": anyp / max(prompts, 1),
                f"val_reward{suffix}": reward / max(samples, 1)}

    # ----- metrics
    def _reset_acc(self) -> None:
        self._acc = dict.fromkeys(("rollouts", "samples", "reward", "reward_sq", "passes", "response_tokens", "errors",
                                   "groups", "informative", "rollout_s", "update_s", "steps"), 0.0)
        ctx = getattr(self, "ctx", None)
        # entropy sum, kl sum, completion tokens: added to on the device, read at log steps only
        self._acc_t = torch.zeros(3, dtype=torch.float32, device=ctx.device if ctx is not None else "cpu")

    def step_metrics(self) -> dict[str, float]:
        self._close_step()
        keys = list(self._acc)
        both = torch.tensor([self._acc[k] for k in keys] + self._acc_t.tolist(), dtype=torch.float64)
        if self.ctx.mesh is not None:
            both = self.ctx.all_reduce_sum(both.to(self.ctx.device)).cpu()
        a = dict(zip(keys + ["entropy", "kl", "tokens"], both.tolist()))
        self._reset_acc()
        dp, out = self.ctx.dp_size, {}
        steps = max(a["steps"] / dp, 1.0)
        if a["samples"]:
            mean = a["reward"] / a["samples"]
            out.update(reward_mean=mean, reward_std=math.sqrt(max(a["reward_sq"] / a["samples"] - mean * mean, 0.0)),
                       pass_rate=a["passes"] / a["samples"], response_len=a["response_tokens"] / a["samples"],
                       reward_errors=a["errors"], informative_groups=a["informative"] / max(a["groups"], 1))
        if a["tokens"]:
            out["entropy"] = a["entropy"] / a["tokens"]
            if self.ref is not None:
                out["kl"] = a["kl"] / a["tokens"]
        out.update(rollout_s=a["rollout_s"] / dp / steps, update_s=a["update_s"] / dp / steps)
        return {k: round(v, 6) for k, v in out.items()}

    # ----- state
    def state_dict(self) -> dict:
        self._close_step()
        state: dict = {"pos": self.pos, "step": self.step}
        if self.cfg.updates_per_batch > 1 and self.step % self.cfg.updates_per_batch:
            # The batch the next steps still train on: each rank's, gathered (they differ).
            mine = [[list(p), list(c), list(lp), float(a)] for p, c, lp, a in self._batch]
            if dmesh.is_initialized():
                gathered = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, mine)
            else:
                gathered = [mine]
            state["batches"] = gathered
        return state

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.step = int(state["pos"]), int(state["step"])
        batches = state.get("batches")
        if batches is not None:
            world = torch.distributed.get_world_size() if dmesh.is_initialized() else 1
            if len(batches) == world:
                rank = torch.distributed.get_rank() if dmesh.is_initialized() else 0
                self._batch = [(p, c, lp, a) for p, c, lp, a in batches[rank]]
            else:  # another process count: a fresh rollout batch now (not bit-identical to the killed run)
                log.warning("resuming on %d processes a batch rolled out on %d: rolling out a new batch", world, len(batches))

    def flops_per_token(self) -> float:
        # The update's forward and backward (6N per token), plus the reference's forward (2N) with a KL;
        # the rollouts' generation is not counted (their time is rollout_s).
        base = super().flops_per_token()
        return base * (4 / 3) if self.ref is not None else base

    def memory_hint(self) -> str:
        return (f"raise --set micro_batches (now {self.cfg.micro_batches}), or lower --prompts-per-step "
                f"({self.cfg.prompts_per_step}), --group-size ({self.cfg.group_size}) or --max-new-tokens "
                f"({self.max_new_tokens})")


def grpo_loop(cfg: GRPOConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False,
              reward: RewardFunction | None = None) -> TrainLoop:
    """The loop `muse grpo` runs: GRPO from `cfg.init_from` (or RUN's latest stage) into `run_dir`/grpo/."""
    return TrainLoop(GRPO(cfg, run_dir, reward=reward), cfg, run_dir, resume=resume, force=force)
