"""Parallelism applied to a plain Transformer from outside: TP, activation checkpointing, compile, FSDP2/DDP.

    model = build_model(cfg, device)                 # the same full model on every rank (same seed)
    model = parallelize(model, mesh, ParallelConfig(mode="fsdp", tp=2), policy=dtype_policy(device))

The order, as in torchtitan, and why:
  1. tensor parallelism (DTensor `parallelize_module`) first: it replaces the block's weights by DTensors
     sharded over the "tp" mesh dimension and installs the hooks that move activations between layouts.
     Everything after it must see those final weights and hooks.
  2. activation checkpointing per block: the recomputation in backward then replays the whole block,
     TP collectives included, and frees every activation inside it.
  3. torch.compile per block: the compiled graph covers the checkpointed block (the compiler sees the
     recomputation and the TP collectives and can fuse and overlap them). Per block, not the whole model:
     all blocks have the same code, so it compiles once and recompiles never, and the FSDP hooks below
     stay outside the compiled region.
  4. FSDP2 (`fully_shard`) or DDP last: FSDP groups each block's (possibly TP-sharded, possibly compiled)
     parameters into one all-gather unit, so it must wrap the final modules; DDP registers its gradient
     hooks and buckets on the final parameters. The root module is sharded too, for the embeddings,
     the final norm and the head.

Tensor parallel plan per block (Megatron-LM): attention wq/wk/wv and feed_forward w1/w3 column-wise
(each rank owns a slice of the heads / hidden units), attention wo and feed_forward w2 row-wise (their
partial sums are all-reduced). The attention reshapes with -1 heads, so it runs on the local heads.
Embeddings, norms and the head are replicated over tp (their gradients are identical on every tp rank).
With sequence parallelism the norms and the residual stream between the TP regions are sharded along
the sequence: the all-reduces become reduce-scatters + all-gathers, and activation memory falls by tp.

Not supported (a ConfigError says so): DDP with tp > 1 (use FSDP: with tp > 1 every parameter must be a
DTensor), QK-norm with tp > 1 (its weight is shared across heads that live on different ranks),
sequence parallelism for the gpt2 arch (learned positions and tied embeddings).

What this module does not know: data, optimizers, checkpoints, the training loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from muse.common.errors import ConfigError, closest

MODES = ("fsdp", "ddp")
AC_MODES = ("none", "full")


@dataclass
class ParallelConfig:
    """How to spread training over processes; `--nproc`, `--dp`, `--tp`, `--parallel`, `--ac`, `--compile`."""

    mode: str = "fsdp"  # with more than one process: "fsdp" (FSDP2, sharded) or "ddp" (replicated)
    dp: int = 0  # data-parallel size; 0 = processes // tp
    tp: int = 1  # tensor-parallel size (a divisor of the processes per node, ideally)
    sequence_parallel: bool = False  # shard norms + residual stream over tp along the sequence
    ac: str = "none"  # activation checkpointing per block: "none" or "full" (recompute the block)
    compile: bool = False  # torch.compile each block
    nproc: int = 1  # processes `muse train` starts on this node through torchrun; 1 = this process

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"parallel.mode must be one of {', '.join(MODES)}, got {self.mode!r}." + closest(str(self.mode), MODES))
        if self.ac not in AC_MODES:
            raise ConfigError(f"parallel.ac must be one of {', '.join(AC_MODES)}, got {self.ac!r}." + closest(str(self.ac), AC_MODES))
        for name in ("tp", "nproc"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp < 0:
            raise ConfigError(f"parallel.dp must be >= 0 (0 = processes // tp), got {self.dp}")


def check_supported(cfg: ParallelConfig, model_cfg, *, tp: int, seq_len: int) -> None:
    """ConfigError for a combination this module cannot run (see the module docstring)."""
    if tp == 1:
        return
    if cfg.mode == "ddp":
        raise ConfigError("--parallel ddp cannot be combined with --tp > 1; use --parallel fsdp (the default)")
    for name in ("n_head", "n_kv_head", "d_ff"):
        value = getattr(model_cfg, name)
        if value % tp:
            raise ConfigError(f"--tp {tp} must divide the model's {name} ({value}): each rank holds {name} / tp of "
                              f"them; choose another --tp or set --set model.{name}=...")
    if model_cfg.qk_norm:
        raise ConfigError("QK-norm is not supported with --tp > 1 (its weight is shared by heads on different ranks); "
                          "set model.qk_norm=false or --tp 1")
    if cfg.sequence_parallel:
        if model_cfg.arch != "llama" or model_cfg.tie_embeddings:
            raise ConfigError("sequence parallelism needs arch llama with untied embeddings; "
                              "drop parallel.sequence_parallel")
        if seq_len % tp:
            raise ConfigError(f"sequence parallelism splits the {seq_len} positions over --tp {tp}; choose a "
                              "seq_len divisible by tp")


# --- 1. tensor parallelism ----------------------------------------------------------------------------


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> None:
    """Megatron-style column/row sharding of every block's attention and MLP over `tp_mesh`, in place."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    # Without SP the block's input and output are replicated (plain tensors); with SP they are this
    # rank's slice of the sequence (dim 1), and the row-wise layers reduce-scatter instead of all-reduce.
    row_out = Shard(1) if sequence_parallel else Replicate()
    for block in model.layers.values():
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=row_out),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=row_out),
        }
        if hasattr(block.feed_forward, "w3"):
            plan["feed_forward.w3"] = ColwiseParallel()
        if sequence_parallel:
            # attention(x, rope, kv_cache, start) and feed_forward(x): gather the sequence before them.
            plan.update({
                "attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                                desired_input_layouts=(Replicate(), None, None, None)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
    if sequence_parallel:
        # The residual stream enters the first block split along the sequence and leaves the last one
        # whole again before the final norm and the (replicated) head.
        blocks = list(model.layers.values())
        parallelize_module(blocks[0], tp_mesh, PrepareModuleInput(
            input_layouts=(Replicate(), None, None, None), desired_input_layouts=(Shard(1), None, None, None),
            use_local_output=True))
        parallelize_module(model.norm, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))


# --- 2. activation checkpointing ----------------------------------------------------------------------


def apply_ac(model: nn.Module) -> None:
    """Recompute each block in backward instead of keeping its activations (~1/3 more compute)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, block in list(model.layers.items()):
        # Non-reentrant checkpointing (the wrapper's default) works with compile, FSDP2 and DTensor.
        # Parameter names gain `_checkpoint_wrapped_module.`; checkpoints and the optimizer strip it.
        model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)  # no dropout: no RNG to replay


# --- 3. compile ---------------------------------------------------------------------------------------


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block (parameter names gain `_orig_mod.`, stripped by checkpoints)."""
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block)


# --- 4. FSDP2 / DDP -----------------------------------------------------------------------------------


def apply_fsdp(model: nn.Module, dp_mesh, policy=None) -> None:
    """FSDP2 over `dp_mesh`: each block one unit, then the root; bf16 compute / fp32 reduce per `policy`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    param_dtype = reduce_dtype = None
    if policy is not None and policy.mixed:
        param_dtype = getattr(torch, policy.compute)
        reduce_dtype = getattr(torch, policy.reduce)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right at the start of backward: keeping them
        # gathered after forward saves one all-gather per step.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def apply_ddp(model: nn.Module, dp_mesh, device) -> nn.Module:
    """DistributedDataParallel over `dp_mesh` (gradients all-reduced in buckets during backward)."""
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    ids = [device.index] if device.type not in ("cpu", "mps") and device.index is not None else None
    return DistributedDataParallel(model, device_ids=ids, process_group=dp_mesh.get_group())


def parallelize(model: nn.Module, mesh, cfg: ParallelConfig, *, policy=None, device=None) -> nn.Module:
    """Apply cfg to `model` in the order of the module docstring; returns the module to train.

    `mesh` is the (dp, tp) DeviceMesh, or None for one process (then only AC and compile apply). The
    returned module is `model` itself, except under DDP where it is the DDP wrapper around it.
    """
    tp = mesh["tp"].size() if mesh is not None else 1
    if tp > 1:
        apply_tp(model, mesh["tp"], cfg.sequence_parallel)
    if cfg.ac == "full":
        apply_ac(model)
    if cfg.compile:
        apply_compile(model)
    if mesh is None:
        return model
    if cfg.mode == "ddp":
        return apply_ddp(model, mesh["dp"], device if device is not None else next(model.parameters()).device)
    apply_fsdp(model, mesh["dp"], policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer under a DDP wrapper (FSDP2, TP, AC and compile keep the root module)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Within it, backward accumulates gradients locally (enabled=False) or also reduces them across
    ranks (True). Gradient accumulation syncs on the last micro-batch only; without a wrapper, no-op."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
