"""The pretraining loop: data -> model -> optimizer -> metrics and checkpoints, resumable exactly.

`Trainer(cfg, run_dir).train()` reads `run_dir/data` (from `muse prepare`), trains, and writes
`run_dir/<stage>/`: step_* checkpoints, `latest`, metrics.jsonl, tensorboard/, loss.png and the resolved
`train_config.json`. One code path for every device; the same process count and flags resume bit for
bit on CPU, because everything that decides the next step (weights, optimizer moments, loader position,
RNG states, step) is in the checkpoint.

One code path for 1 and N processes too. Under torchrun (WORLD_SIZE > 1) it joins the process group,
builds the (dp, tp) mesh, parallelizes the model (FSDP2 or DDP, optional TP), reads the data-parallel
rank's share of the batches, averages the logged loss and the val loss over the data-parallel ranks and
saves sharded checkpoints that resume at any world size (muse.distributed). With one process every one
of those steps is a no-op. Rank 0 alone writes metrics, plots, configs and progress bars. A rank that
fails records its error for the launcher (muse.distributed.launch), which stops the others.

What it does not know: how the model is built (muse.model), how optimizers group parameters
(muse.train.optim), how checkpoints are laid out (muse.checkpoint, muse.distributed.checkpoint), how
the model is sharded (muse.distributed) or where data come from (muse.data).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from muse.checkpoint import (
    capture_rng_state,
    describe_difference,
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
    DataError,
    OutputExistsError,
    ResourceError,
    TrainingDiverged,
)
from muse.common.logging import get_logger, progress
from muse.common.paths import atomic_write_json, ensure_writable_dir
from muse.data import TokenLoader, bytes_per_token
from muse.distributed import checkpoint as sharded
from muse.distributed import mesh as dmesh
from muse.distributed.launch import maybe_inject_fault, record_failure
from muse.distributed.parallelize import check_supported, grad_sync, parallelize
from muse.model import build_model, count_params, flops_per_token
from muse.tokenizer import Tokenizer
from muse.train.config import TrainConfig, model_config
from muse.train.metrics import MetricsLogger, format_count, format_eta
from muse.train.optim import build_optimizer
from muse.train.schedule import ScheduleConfig, lr_multiplier, muon_momentum

log = get_logger("muse.train")

_OOM_TYPES = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t)


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
    val_loss: float | None
    val_bpb: float | None
    mfu: float | None
    flops_per_s: float


def _is_oom(e: BaseException) -> bool:
    if _OOM_TYPES and isinstance(e, _OOM_TYPES):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg or "DefaultCPUAllocator" in msg)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, stage: str = "base", resume: bool = False,
                 force: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.stage_dir = self.run_dir / stage
        self.stage = stage
        self.resume = resume
        self.force = force
        self.data_dir = self.run_dir / "data"
        if not (self.data_dir / "meta.json").exists():
            raise DataError(f"no prepared data in {self.data_dir}; run `muse prepare --out {self.run_dir}` first")
        # Resolved (every file hashed against its manifest) once, here; the shape and weights come from it.
        self.init_ckpt = resolve_checkpoint(cfg.init_from, stages=("base",)) if cfg.init_from else None

    # ---------------------------------------------------------------- setup
    def check(self, world_size: int | None = None) -> None:
        """Fail fast, before any process starts, on settings that cannot run on `world_size` processes."""
        cfg = self.cfg
        world = world_size or dist.world_size()
        model_cfg = model_config(cfg, Tokenizer.from_file(self.data_dir / "tokenizer.json").vocab_size, self.init_ckpt)
        _, tp = dmesh.resolve_mesh_shape(world, cfg.parallel.dp, cfg.parallel.tp)
        check_supported(cfg.parallel, model_cfg, tp=tp, seq_len=cfg.seq_len)
        if world > 1:
            pick_device(cfg.device, local_rank=world - 1)  # one accelerator per process on this node

    def _setup(self):
        cfg = self.cfg
        self.world = dist.world_size()
        self.rank = dist.rank()
        self.device = pick_device(cfg.device, local_rank=dist.local_rank() if self.world > 1 else None)
        self.info = device_info(self.device, cfg.peak_flops or None)
        self.policy = dtype_policy(self.device, cfg.dtype)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.policy.compute == "bfloat16"
            else contextlib.nullcontext()
        )
        self.tokenizer = Tokenizer.from_file(self.data_dir / "tokenizer.json")
        self.model_cfg = model_config(cfg, self.tokenizer.vocab_size, self.init_ckpt)
        if cfg.seq_len > self.model_cfg.max_seq_len:
            raise ConfigError(
                f"seq_len {cfg.seq_len} is beyond what the model supports (max_seq_len {self.model_cfg.max_seq_len}); "
                f"lower --seq-len or --set model.max_seq_len={cfg.seq_len}"
            )
        _, tp = dmesh.resolve_mesh_shape(self.world, cfg.parallel.dp, cfg.parallel.tp)
        check_supported(cfg.parallel, self.model_cfg, tp=tp, seq_len=cfg.seq_len)
        self.owns_process_group = self.world > 1 and not dmesh.is_initialized()
        self.mesh = dmesh.init_distributed(self.device, cfg.parallel.dp, cfg.parallel.tp)  # None: one process
        # The ranks of one tensor-parallel group read the same batches; data-parallel ranks disjoint ones.
        self.dp_rank, self.dp_size = dmesh.data_rank(self.mesh)
        micro_tokens = cfg.batch_size * cfg.seq_len * self.dp_size
        total = cfg.total_batch_tokens or micro_tokens
        if total % micro_tokens:
            raise ConfigError(
                f"total_batch_tokens {total} is not a multiple of batch_size*seq_len*data-parallel processes = "
                f"{micro_tokens}; choose a multiple (e.g. {max(1, round(total / micro_tokens)) * micro_tokens})"
            )
        self.accum = total // micro_tokens
        self.tokens_per_step = total
        if cfg.max_steps:
            self.total_steps = cfg.max_steps
        elif cfg.train_tokens:
            self.total_steps = max(1, cfg.train_tokens // total)
        else:
            raise ConfigError("set a horizon: --max-steps N or --train-tokens N")
        # Every rank builds and initialises the full model from the same seed, so a sharded run starts
        # from exactly the weights of a single-process one; parallelize() then keeps each rank's shards.
        torch.manual_seed(cfg.seed)
        self.plain = build_model(self.model_cfg, device=self.device)
        self.n_params = count_params(self.model_cfg)
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.seq_len)
        # --depth derives the learning rates too: AdamW lrs for embeddings and head scale with width.
        self.optim_cfg = cfg.optim.for_width(self.model_cfg.d_model) if cfg.optim.name == "muon" else cfg.optim
        self.train_loader = TokenLoader(self.data_dir, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                                        rank=self.dp_rank, world_size=self.dp_size, device=self.device)
        self.val_loader = TokenLoader(self.data_dir, "val", cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                                      rank=self.dp_rank, world_size=self.dp_size, device=self.device)
        self.val_bytes_per_token = bytes_per_token(self.data_dir, "val")

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
        ckpt = resolve_checkpoint(self.stage_dir, stages=(self.stage,))
        verify_checkpoint(ckpt)
        state = load_train_state(ckpt)
        saved_model = state.get("model_config") or {}
        diff = describe_difference(saved_model, self.model_cfg.to_dict())
        if diff:
            raise ConfigError(f"--resume with a changed model shape is not possible ({ckpt}):\n{diff}")
        return ckpt, state

    def _build(self, ckpt: Path | None) -> None:
        """Parallelize the model (weights of a single-device checkpoint go in first) and build the optimizer."""
        if ckpt is not None and not sharded.is_sharded(ckpt):
            self.plain.load_state_dict(load_model_state(ckpt))
        elif ckpt is None and self.init_ckpt is not None:  # continued pretraining: weights, a fresh optimizer
            self.plain.load_state_dict(load_model_state(self.init_ckpt, verify=False))  # verified in __init__
            log.info("initialised the weights from %s", self.init_ckpt)
        self.model = parallelize(self.plain, self.mesh, self.cfg.parallel, policy=self.policy, device=self.device)
        self.optimizer = build_optimizer(self.model, self.optim_cfg)

    def _restore(self, ckpt: Path | None, state: dict | None) -> tuple[int, int, float]:
        """(step, tokens, elapsed_s) to continue from, with optimizer, loader and RNG restored."""
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
        self.train_loader.load_state_dict(state["loader"])
        restore_rng_state(state["rng"])
        self.train_time_before = float(state.get("train_time_s", 0.0))
        log.info("resumed from %s (step %d)", ckpt, state["step"])
        return int(state["step"]), int(state["tokens"]), float(state.get("elapsed_s", 0.0))

    # ---------------------------------------------------------------- pieces
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(mean val loss in nats/token, bits per byte) over the first `eval_batches` val batches."""
        self.model.eval()
        total, n = 0.0, 0
        for x, y in self.val_loader.eval_batches(self.cfg.eval_batches):
            with self.autocast:
                loss = self.model(x, y, reduction="sum")
            total += float(loss)
            n += int((y != -1).sum())  # the last batch may be smaller: weight by tokens
        self.model.train()
        if self.mesh is not None:  # sum over the data-parallel ranks (tp ranks saw the same windows)
            both = dmesh.all_reduce_sum(torch.tensor([total, float(n)], dtype=torch.float64, device=self.device),
                                        self.mesh, "dp")
            total, n = float(both[0]), int(both[1])
        if n == 0:
            raise DataError("the val split is too small for one batch; lower --seq-len/--batch-size or raise --val-fraction")
        val = total / n
        return val, val / math.log(2) / self.val_bytes_per_token

    def _train_step(self, step: int) -> torch.Tensor:
        self.optimizer.set_lr_multiplier(lr_multiplier(step, self.schedule))
        if self.optim_cfg.name == "muon":
            self.optimizer.set_muon_momentum(muon_momentum(step, end=self.optim_cfg.momentum))
        loss_sum = torch.zeros((), device=self.device)
        for i in range(self.accum):
            x, y = self.train_loader.next_batch()
            # Gradients are reduced across ranks on the last micro-batch only (no-op for one process).
            with grad_sync(self.model, enabled=i == self.accum - 1):
                with self.autocast:
                    loss = self.model(x, y)
                (loss / self.accum).backward()
            loss_sum += loss.detach()
        self.optimizer.clip_grad_norm_(self.optim_cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / self.accum

    def _save(self, step: int, tokens: int, elapsed: float, train_time: float, extra_meta: dict) -> Path:
        train_state = {
            "step": step,
            "tokens": tokens,
            "elapsed_s": elapsed,
            "train_time_s": train_time,  # time inside training steps only: tokens / train_time_s = throughput
            "loader": self.train_loader.state_dict(),  # the same on every rank: they move in lockstep
            "rng": capture_rng_state(),  # rank 0's; training draws no random numbers after init
            "model_config": self.model_cfg.to_dict(),
        }
        if self.mesh is not None:  # the optimizer state goes into the shards, by parameter name
            return sharded.save_sharded(
                self.stage_dir, step, model=self.model, optimizer=self.optimizer, model_config=self.model_cfg,
                tokenizer=self.tokenizer, train_state=train_state,
                meta={"stage": self.stage, "tokens": tokens, **extra_meta}, keep_last=self.cfg.keep_last,
                milestone_every=self.cfg.milestone_every or None, full_weights=self.cfg.full_weights,
            )
        train_state["optimizer"] = self.optimizer.state_dict()
        return save_checkpoint(
            self.stage_dir, step, model=self.plain, model_config=self.model_cfg, tokenizer=self.tokenizer,
            train_state=train_state, meta={"stage": self.stage, "tokens": tokens, **extra_meta},
            keep_last=self.cfg.keep_last, milestone_every=self.cfg.milestone_every or None,
        )

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

    def _global_loss(self, loss: torch.Tensor) -> float:
        """The step's loss averaged over the data-parallel ranks (each saw its own batches); syncs."""
        if self.mesh is None:
            return float(loss)
        return float(dmesh.all_reduce_mean(loss.detach().clone(), self.mesh, "dp"))

    def _train(self) -> TrainResult:
        cfg = self.cfg
        ensure_writable_dir(self.stage_dir)
        self._setup()
        self.schedule = ScheduleConfig(**{**cfg.schedule.__dict__, "total_steps": self.total_steps})
        resume_from, resume_state = self._resume_checkpoint()
        self._build(resume_from)
        step, tokens, elapsed_before = self._restore(resume_from, resume_state)
        self.step = step
        if dist.is_main():
            atomic_write_json(self.stage_dir / "train_config.json", {
                "train": cfg.to_dict(), "model": self.model_cfg.to_dict(), "total_steps": self.total_steps,
                "tokens_per_step": self.tokens_per_step, "grad_accum": self.accum, "params": self.n_params,
                "device": self.info.name, "world_size": self.world,
                "mesh": {"dp": self.dp_size, "tp": self.world // self.dp_size} if self.mesh is not None else None,
            })
        metrics = MetricsLogger(self.stage_dir, tensorboard=cfg.tensorboard, plot=cfg.plot)
        metrics.truncate_after(step)
        where = self.info.name if self.world == 1 else (
            f"{self.world} x {self.info.name} ({cfg.parallel.mode}, dp {self.dp_size} x tp {self.world // self.dp_size})")
        log.info("%s model, %s params, %d steps x %s tokens (grad accum %d) on %s", self.model_cfg.arch,
                 format_count(self.n_params), self.total_steps, format_count(self.tokens_per_step), self.accum, where)
        self.model.train()
        last_loss = float("nan")
        val_loss = val_bpb = None
        ckpt = None
        t_start = time.perf_counter()
        t_window, tok_window = t_start, 0
        train_time, train_tokens = 0.0, 0  # time spent in training steps only (no eval, no saves)
        tps = flops_s = 0.0
        mfu = None
        bar = progress(total=self.total_steps, initial=step, desc="train", unit="step")
        try:
            while step < self.total_steps:
                maybe_inject_fault(step + 1)
                try:
                    loss = self._train_step(step)
                except Exception as e:
                    if _is_oom(e):
                        raise ResourceError(
                            f"out of memory at batch_size {cfg.batch_size} x seq_len {cfg.seq_len}: lower --batch-size "
                            "(keep --total-batch-tokens to keep the global batch through gradient accumulation) "
                            f"or --seq-len; {self._last_good()}"
                        ) from None
                    raise
                step += 1
                self.step = step
                tokens += self.tokens_per_step
                tok_window += self.tokens_per_step
                last = step == self.total_steps
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
                    train_time += now - t_window
                    train_tokens += tok_window
                    t_window, tok_window = now, 0
                    flops_s = tps * self.flops_per_token
                    mfu = flops_s / (self.info.peak_flops * self.world) if self.info.peak_flops else None
                    lr = self.optimizer.param_groups[0]["lr"]
                    metrics.log(step, loss=last_loss, lr=lr, tokens=tokens, tokens_per_s=round(tps, 1),
                                **({"mfu": round(mfu, 4)} if mfu is not None else {"flops_per_s": round(flops_s)}))
                    eta = (self.total_steps - step) * self.tokens_per_step / max(tps, 1e-9)
                    line = f"loss {last_loss:.4f} | {format_count(tps)} tok/s" + (f" | mfu {mfu:.1%}" if mfu else "")
                    bar.set_postfix_str(line, refresh=False)
                    if bar.disable:
                        log.info("step %d/%d | %s | eta %s", step, self.total_steps, line, format_eta(eta))
                if (cfg.eval_every and step % cfg.eval_every == 0) or last or out_of_time:
                    val_loss, val_bpb = self.evaluate()
                    metrics.log(step, val_loss=val_loss, val_bpb=val_bpb, tokens=tokens)
                    log.info("step %d | val loss %.4f | val bpb %.4f", step, val_loss, val_bpb)
                    metrics.plot(title=f"{self.model_cfg.arch}, {format_count(self.n_params)} params")
                    t_window, tok_window = time.perf_counter(), 0  # throughput excludes evaluation
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
                    t_window, tok_window = now, 0
                    elapsed = elapsed_before + now - t_start
                    ckpt = self._save(step, tokens, elapsed, self.train_time_before + train_time,
                                      {"val_loss": val_loss, "val_bpb": val_bpb})
                    t_window, tok_window = time.perf_counter(), 0  # ... and checkpointing
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
            tokens_per_s=tps, final_loss=last_loss, val_loss=val_loss, val_bpb=val_bpb, mfu=mfu, flops_per_s=flops_s,
        )
