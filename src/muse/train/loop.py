"""The training loop: one for every stage, driving an objective (muse.train.objective), resumable exactly.

`TrainLoop(objective, cfg, run_dir).train()` sets up devices, asks the objective for its model and data,
trains, and writes `run_dir/<objective.stage>/`: step_* checkpoints, `latest`, metrics.jsonl,
tensorboard/, loss.png and `train_config.json`. The same process count and flags resume bit for bit on
CPU, because everything that decides the next step is in the checkpoint: weights, optimizer moments,
the step, the global RNG states and the objective's own state (its data position).

One code path for 1 and N processes. Under torchrun (WORLD_SIZE > 1) it joins the process group, builds
the (dp, tp) mesh, parallelizes the model (FSDP2 or DDP, optional TP), normalises the loss over the
global number of loss terms (objective.py says why), and saves sharded checkpoints that resume at any
world size (muse.distributed). With one process every one of those steps is a no-op. Rank 0 alone
writes metrics, plots, configs and progress bars. A rank that fails records its error for the launcher
(muse.distributed.launch), which stops the others.

What it does not know: what is trained or on what (the objective), how the model is built
(muse.model), how optimizers group parameters (muse.train.optim), how checkpoints are laid out
(muse.checkpoint, muse.distributed.checkpoint) or how the model is sharded (muse.distributed).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from muse.checkpoint import (
    capture_rng_state,
    describe_difference,
    get_stage,
    latest_good,
    list_checkpoints,
    load_model_state,
    load_train_state,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from muse.common import dist
from muse.common.device import device_info, dtype_policy, pick_device, synchronize
from muse.common.errors import (
    CheckpointError,
    ConfigError,
    OutputExistsError,
    ResourceError,
    TrainingDiverged,
)
from muse.common.logging import get_logger, progress
from muse.common.paths import atomic_write_json, ensure_writable_dir
from muse.distributed import checkpoint as sharded
from muse.distributed import mesh as dmesh
from muse.distributed.launch import maybe_inject_fault, record_failure
from muse.distributed.parallelize import ParallelConfig, check_supported, grad_sync, parallelize
from muse.train.metrics import MetricsLogger, format_count, format_eta
from muse.train.objective import LoopContext, MicroBatch, Objective
from muse.train.optim import OptimConfig, build_optimizer
from muse.train.schedule import ScheduleConfig, lr_multiplier, muon_momentum

log = get_logger("muse.train")

_OOM_TYPES = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t)


@dataclass
class LoopConfig:
    """The loop's settings. A stage's config extends it (TrainConfig does), so that every stage spells
    these keys the same in TOML and in `--set`."""

    max_time_s: float = 0.0  # stop (and save) after this wall time; 0 = no limit
    # optimisation
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # evaluation, logging, checkpoints
    eval_every: int = 100
    log_every: int = 10
    save_every: int = 200
    keep_last: int = 3
    milestone_every: int = 0
    full_weights: bool = True  # multi-process saves also gather model.safetensors (muse.distributed.checkpoint)
    # runtime
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto = bf16 autocast where the device multiplies bf16 natively, else fp32 (common.device)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # processes, FSDP/DDP, TP, AC, compile
    peak_flops: float = 0.0  # dense bf16 FLOP/s for chips missing from muse.common.device.PEAKS
    # Rows per chunk of the chunked cross-entropy (muse.model.layers.chunked_cross_entropy): the loss
    # without a (tokens, vocab) logits tensor. 0 = the plain loss. Measured on a 2-vCPU EPYC (BENCHMARKS.md
    # section 2): the loss's fwd+bwd 1.27x faster than the plain one at 4,096 x 3,968 in fp32 (a training
    # step 1.03x), holding one (1024, vocab) block instead of three (tokens, vocab) tensors; its gradients
    # differ from the plain loss's in the last bits only (~5e-7 relative).
    loss_chunk: int = 1024
    tensorboard: bool = True
    plot: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    stage_dir: Path
    checkpoint: Path | None
    steps: int
    tokens: int
    params: int
    wall_s: float
    tokens_per_s: float
    final_loss: float
    evals: dict[str, float]  # the last evaluation's numbers (val_loss, val_bpb for pretraining)
    mfu: float | None
    flops_per_s: float


def _check_loss_chunk(rows) -> None:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ConfigError(f"loss_chunk must be a whole number of rows >= 0 (0 = the plain loss), got {rows!r}")


def _is_oom(e: BaseException) -> bool:
    if _OOM_TYPES and isinstance(e, _OOM_TYPES):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg or "DefaultCPUAllocator" in msg)


class TrainLoop:
    def __init__(self, objective: Objective, cfg: LoopConfig, run_dir: str | Path, *, resume: bool = False,
                 force: bool = False):
        self.objective = objective
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.stage_dir = self.run_dir / get_stage(objective.stage).name  # only registered stages get a directory
        self.resume = resume
        self.force = force

    # ---------------------------------------------------------------- setup
    def check(self, world_size: int | None = None) -> None:
        """Fail fast, before any process starts, on settings that cannot run on `world_size` processes."""
        world = world_size or dist.world_size()
        self.objective.plan(self._check_layout(world))
        if world > 1:
            pick_device(self.cfg.device, local_rank=world - 1)  # one accelerator per process on this node

    def _check_layout(self, world: int) -> int:
        """The data-parallel size of `world` processes; ConfigError when the model cannot be laid out so."""
        dp, tp = dmesh.resolve_mesh_shape(world, self.cfg.parallel.dp, self.cfg.parallel.tp)
        check_supported(self.cfg.parallel, self.objective.model_config(), tp=tp, seq_len=self.objective.seq_len)
        return dp

    def _setup_devices(self) -> LoopContext:
        cfg = self.cfg
        self.world = dist.world_size()
        self.device = pick_device(cfg.device, local_rank=dist.local_rank() if self.world > 1 else None)
        self.info = device_info(self.device, cfg.peak_flops or None)
        policy = dtype_policy(self.device, cfg.dtype)
        self._check_layout(self.world)
        self.owns_process_group = self.world > 1 and not dmesh.is_initialized()
        self.mesh = dmesh.init_distributed(self.device, cfg.parallel.dp, cfg.parallel.tp)  # None: one process
        # The ranks of one tensor-parallel group read the same batches; data-parallel ranks disjoint ones.
        self.dp_rank, self.dp_size = dmesh.data_rank(self.mesh)
        return LoopContext(device=self.device, mesh=self.mesh, dp_rank=self.dp_rank, dp_size=self.dp_size,
                           policy=policy, parallel=cfg.parallel, run_dir=self.run_dir)

    def _resume_checkpoint(self) -> tuple[Path | None, dict | None]:
        """(checkpoint, its train state) to continue from, or (None, None); refuses to clobber a run."""
        existing = list_checkpoints(self.stage_dir) if self.stage_dir.exists() else []
        if not self.resume:
            if existing and not self.force:
                raise OutputExistsError(
                    f"{self.stage_dir} already holds checkpoints (newest {existing[-1].name}); "
                    "pass --resume to continue it or --force to start over"
                )
            return None, None
        if not existing:
            raise CheckpointError(f"--resume: no checkpoint in {self.stage_dir}; start without --resume")
        ckpt = resolve_checkpoint(self.stage_dir, stages=(self.objective.stage,))
        verify_checkpoint(ckpt)
        state = load_train_state(ckpt)
        diff = describe_difference(state.get("model_config") or {}, self.model_cfg.to_dict())
        if diff:
            raise ConfigError(f"--resume with a changed model shape is not possible ({ckpt}):\n{diff}")
        return ckpt, state

    def _build(self, ctx: LoopContext, ckpt: Path | None) -> None:
        """The objective's model (a single-device checkpoint's weights in first), parallelized, and its optimizer."""
        # Every rank builds and initialises the full model from the same seed, so a sharded run starts
        # from exactly the weights of a single-process one; parallelize() then keeps each rank's shards.
        torch.manual_seed(self.cfg.seed)
        self.plain = self.objective.setup(ctx, resuming=ckpt is not None)
        _check_loss_chunk(self.cfg.loss_chunk)
        if hasattr(self.plain, "loss_chunk"):  # a muse Transformer (a stage may train something else)
            self.plain.loss_chunk = self.cfg.loss_chunk
        self.n_params = sum(p.numel() for p in self.plain.parameters())  # a stage's extra head included
        if ckpt is not None and not sharded.is_sharded(ckpt):
            self.plain.load_state_dict(load_model_state(ckpt))
        self.model = parallelize(self.plain, self.mesh, self.cfg.parallel, policy=ctx.policy, device=self.device)
        # --depth derives the learning rates too: AdamW lrs for embeddings and head scale with width.
        optim = self.cfg.optim
        self.optim_cfg = optim.for_width(self.model_cfg.d_model) if optim.name == "muon" else optim
        self.optimizer = build_optimizer(self.model, self.optim_cfg)

    def _restore(self, ckpt: Path | None, state: dict | None) -> tuple[int, int, float]:
        """(step, tokens, elapsed_s) to continue from, with optimizer, objective and RNG restored."""
        self.train_time_before = 0.0
        if ckpt is None:
            return 0, 0, 0.0
        if sharded.is_sharded(ckpt):  # any world size, any layout -> this one
            sharded.load_sharded(ckpt, self.model, self.optimizer)
        else:
            optim_state = state["optimizer"]
            if self.mesh is not None:  # a single-device checkpoint resumed on N processes
                optim_state = sharded.shard_optimizer_state(self.optimizer, optim_state)
            self.optimizer.load_state_dict(optim_state)
        # Checkpoints from before objectives kept the (pretraining) loader at the top level of the state.
        self.objective.load_state_dict(state.get("objective", state))
        restore_rng_state(state["rng"])
        self.train_time_before = float(state.get("train_time_s", 0.0))
        log.info("resumed from %s (step %d)", ckpt, state["step"])
        return int(state["step"]), int(state["tokens"]), float(state.get("elapsed_s", 0.0))

    def _init_from(self) -> str | None:
        """The objective's first weights for meta.json: RUN-relative inside this run (the "latest stage"
        rule of muse.checkpoint.stages reads it), else absolute."""
        if self.objective.init_from is None:
            return None
        init = Path(self.objective.init_from).resolve()
        try:
            return init.relative_to(self.run_dir.resolve()).as_posix()
        except ValueError:
            return str(init)

    # ---------------------------------------------------------------- pieces
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            with self.ctx.autocast():
                return dict(self.objective.evaluate(self.model))
        finally:
            self.model.train()

    def _global_counts(self, batches: list[MicroBatch]) -> tuple[int, int]:
        """(loss units, tokens) of one step over every micro-batch of every data-parallel rank."""
        units, tokens = sum(b.loss_units for b in batches), sum(b.tokens for b in batches)
        if self.mesh is None:
            return units, tokens
        # One tiny all-reduce, and a wait for the device, per step; both are small next to a step.
        both = self.ctx.all_reduce_sum(torch.tensor([units, tokens], dtype=torch.int64, device=self.device))
        return int(both[0]), int(both[1])

    def _train_step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns this rank's share of the step's mean loss (summed over ranks: the mean)."""
        self.optimizer.set_lr_multiplier(lr_multiplier(step, self.schedule))
        if self.optim_cfg.name == "muon":
            self.optimizer.set_muon_momentum(muon_momentum(step, end=self.optim_cfg.momentum,
                                                           warmup_steps=self.optim_cfg.momentum_warmup_steps))
        batches = [self.objective.next_batch() for _ in range(self.plan.grad_accum)]
        units, self.step_tokens = self._global_counts(batches)
        self.step_units = units
        # DDP and FSDP average gradients over the dp ranks: dp_size undoes that, so each loss term weighs
        # 1/units. No loss term at all (every target masked) makes a zero gradient, not a division by 0.
        scale = self.dp_size / max(units, 1)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            # Gradients are reduced across ranks on the last micro-batch only (no-op for one process).
            with grad_sync(self.model, enabled=i == len(batches) - 1):
                with self.ctx.autocast():
                    loss = self.objective.loss(self.model, batch)
                (loss * scale).backward()
            loss_sum += loss.detach()
        self.optimizer.clip_grad_norm_(self.optim_cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / max(units, 1)

    def _global_loss(self, loss: torch.Tensor) -> float:
        """The step's mean loss over every rank's terms (each rank holds its share); syncs."""
        if self.mesh is None:
            return float(loss)
        return float(self.ctx.all_reduce_sum(loss.detach().clone()))

    def _save(self, step: int, tokens: int, elapsed: float, train_time: float, evals: dict) -> Path:
        train_state = {
            "step": step,
            "tokens": tokens,
            "elapsed_s": elapsed,
            "train_time_s": train_time,  # time inside training steps only: tokens / train_time_s = throughput
            "objective": self.objective.state_dict(),  # the same on every rank: they move in lockstep
            "rng": capture_rng_state(),  # rank 0's; a rank that draws its own numbers keeps them in its objective
            "model_config": self.model_cfg.to_dict(),
        }
        meta = {"stage": self.objective.stage, "tokens": tokens, **evals, "init_from": self._init_from()}
        keep = dict(keep_last=self.cfg.keep_last, milestone_every=self.cfg.milestone_every or None)
        if self.mesh is not None:  # the optimizer state goes into the shards, by parameter name
            return sharded.save_sharded(
                self.stage_dir, step, model=self.model, optimizer=self.optimizer, model_config=self.model_cfg,
                tokenizer=self.objective.tokenizer, train_state=train_state, meta=meta,
                full_weights=self.cfg.full_weights, **keep,
            )
        train_state["optimizer"] = self.optimizer.state_dict()
        return save_checkpoint(self.stage_dir, step, model=self.plain, model_config=self.model_cfg,
                               tokenizer=self.objective.tokenizer, train_state=train_state, meta=meta, **keep)

    def _last_good(self) -> str:
        good = latest_good(self.stage_dir) if self.stage_dir.exists() else None
        return f"the last good checkpoint is {good}" if good else "no checkpoint was saved yet"

    # ---------------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        """Train to the horizon (or max_time_s); on several processes a failure on any rank ends them all."""
        self.step: int | None = None  # the last finished step, once training has started
        try:
            result = self._train()
        except BaseException as e:
            # Log it here, on the failing rank, and leave it where the launcher/torchrun reads it. The
            # process group is not torn down: the other ranks may sit in a collective; the agent stops them.
            if dist.world_size() > 1 and not isinstance(e, KeyboardInterrupt):
                raised = record_failure(e, None if self.step is None else self.step + 1)
                if raised is not e:
                    raise raised from None
            raise
        if getattr(self, "owns_process_group", False):
            dmesh.barrier()
            dmesh.shutdown()
        return result

    def _prepare(self) -> tuple[int, int, float]:
        """Everything before the first step; returns (step, tokens, elapsed_s) to continue from."""
        cfg = self.cfg
        ensure_writable_dir(self.stage_dir)
        self.model_cfg = self.objective.model_config()
        self.ctx = self._setup_devices()
        self.plan = self.objective.plan(self.dp_size)
        self.schedule = ScheduleConfig(**{**cfg.schedule.__dict__, "total_steps": self.plan.total_steps})
        resume_from, resume_state = self._resume_checkpoint()
        self._build(self.ctx, resume_from)
        self.flops_per_token = self.objective.flops_per_token()
        start = self._restore(resume_from, resume_state)
        if dist.is_main():
            atomic_write_json(self.stage_dir / "train_config.json", {
                "train": cfg.to_dict(), "model": self.model_cfg.to_dict(), "stage": self.objective.stage,
                "init_from": self._init_from(), "total_steps": self.plan.total_steps,
                "tokens_per_step": self.plan.tokens_per_step, "grad_accum": self.plan.grad_accum,
                "params": self.n_params, "device": self.info.name, "dtype": self.ctx.policy.describe(),
                "world_size": self.world,
                "mesh": {"dp": self.dp_size, "tp": self.world // self.dp_size} if self.mesh is not None else None,
            })
        where = self.info.name if self.world == 1 else (
            f"{self.world} x {self.info.name} ({cfg.parallel.mode}, dp {self.dp_size} x tp {self.world // self.dp_size})")
        per_step = f"{format_count(self.plan.tokens_per_step)} tokens" if self.plan.tokens_per_step else "batches"
        log.info("%s: %s model, %s params, %d steps x %s (grad accum %d) on %s, compute %s", self.objective.stage,
                 self.model_cfg.arch, format_count(self.n_params), self.plan.total_steps, per_step,
                 self.plan.grad_accum, where, self.ctx.policy.describe())
        return start

    def _train(self) -> TrainResult:
        cfg = self.cfg
        step, tokens, elapsed_before = self._prepare()
        self.step = step
        total_steps = self.plan.total_steps
        metrics = MetricsLogger(self.stage_dir, tensorboard=cfg.tensorboard, plot=cfg.plot)
        metrics.truncate_after(step)
        self.model.train()
        last_loss = float("nan")
        evals: dict[str, float] = {}
        ckpt = None
        t_start = time.perf_counter()
        t_window, tok_window, steps_window, units_window = t_start, 0, 0, 0
        units_name = f"{self.objective.unit_name}_per_s"
        train_time, train_tokens = 0.0, 0  # time spent in training steps only (no eval, no saves)
        tps = flops_s = 0.0
        mfu = None
        bar = progress(total=total_steps, initial=step, desc=self.objective.stage, unit="step")
        try:
            while step < total_steps:
                maybe_inject_fault(step + 1)
                try:
                    loss = self._train_step(step)
                except Exception as e:
                    if _is_oom(e):
                        raise ResourceError(f"out of memory: {self.objective.memory_hint()}; {self._last_good()}") from None
                    raise
                step += 1
                self.step = step
                tokens += self.step_tokens
                tok_window += self.step_tokens
                units_window += self.step_units
                steps_window += 1
                last = step == total_steps
                out_of_time = cfg.max_time_s and (time.perf_counter() - t_start) >= cfg.max_time_s
                if cfg.max_time_s and self.mesh is not None:
                    out_of_time = dmesh.any_rank(bool(out_of_time), self.device)  # the ranks stop together
                step_loss = None  # the global loss, computed at most once per step (it syncs)
                if step % cfg.log_every == 0 or last or out_of_time:
                    last_loss = step_loss = self._global_loss(loss)
                    if not math.isfinite(last_loss):
                        raise TrainingDiverged(
                            f"loss became {last_loss} at step {step}; stopped without saving, {self._last_good()}. "
                            "Lower the learning rates (e.g. --set optim.matrix_lr=...) or raise warmup"
                        )
                    now = time.perf_counter()
                    tps = tok_window / max(now - t_window, 1e-9)
                    ups = units_window / max(now - t_window, 1e-9)
                    eta = (total_steps - step) * (now - t_window) / max(steps_window, 1)
                    if cfg.max_time_s:  # a time budget ends the run first (GRPO's and the bench's arms)
                        eta = min(eta, max(cfg.max_time_s - (now - t_start), 0.0))
                    train_time += now - t_window
                    train_tokens += tok_window
                    t_window, tok_window, steps_window, units_window = now, 0, 0, 0
                    flops_s = tps * self.flops_per_token
                    mfu = flops_s / (self.info.peak_flops * self.world) if self.info.peak_flops else None
                    lr = self.optimizer.param_groups[0]["lr"]
                    extra = self.objective.step_metrics()
                    metrics.log(step, loss=last_loss, lr=lr, tokens=tokens, tokens_per_s=round(tps, 1),
                                **{units_name: round(ups, 1)},
                                **({"mfu": round(mfu, 4)} if mfu is not None else {"flops_per_s": round(flops_s)}),
                                **extra)
                    line = f"loss {last_loss:.4f} | {format_count(tps)} tok/s" + (f" | mfu {mfu:.1%}" if mfu else "")
                    bar.set_postfix_str(line, refresh=False)
                    if bar.disable:
                        log.info("step %d/%d | %s | eta %s", step, total_steps, line, format_eta(eta))
                if (cfg.eval_every and step % cfg.eval_every == 0) or last or out_of_time:
                    evals = self.evaluate()
                    metrics.log(step, **evals, tokens=tokens)
                    if evals:
                        log.info("step %d | %s", step, " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in evals.items()))
                    metrics.plot(title=f"{self.objective.stage}: {self.model_cfg.arch}, {format_count(self.n_params)} params",
                                 curve=self.objective.curve)
                    t_window, tok_window, steps_window, units_window = time.perf_counter(), 0, 0, 0  # throughput excludes evaluation
                bar.update(1)
                if (cfg.save_every and step % cfg.save_every == 0) or last or out_of_time:
                    if step_loss is None:
                        step_loss = self._global_loss(loss)
                    if not math.isfinite(step_loss):
                        raise TrainingDiverged(f"loss became {step_loss} at step {step}; not saving it, {self._last_good()}")
                    synchronize(self.device)
                    now = time.perf_counter()  # count the steps since the last log before saving the totals
                    train_time += now - t_window
                    train_tokens += tok_window
                    elapsed = elapsed_before + now - t_start
                    ckpt = self._save(step, tokens, elapsed, self.train_time_before + train_time, evals)
                    t_window, tok_window, steps_window, units_window = time.perf_counter(), 0, 0, 0  # ... and checkpointing
                if out_of_time:
                    log.info("max_time_s reached at step %d; saved %s", step, ckpt)
                    break
        finally:
            bar.close()
            metrics.close()
        wall = time.perf_counter() - t_start
        if train_time > 0:
            tps = train_tokens / train_time
            flops_s = tps * self.flops_per_token
            mfu = flops_s / (self.info.peak_flops * self.world) if self.info.peak_flops else None
        return TrainResult(
            stage_dir=self.stage_dir, checkpoint=ckpt, steps=step, tokens=tokens, params=self.n_params, wall_s=wall,
            tokens_per_s=tps, final_loss=last_loss, evals=evals, mfu=mfu, flops_per_s=flops_s,
        )
