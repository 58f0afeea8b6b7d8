"""Sharded checkpoints (torch.distributed.checkpoint) for multi-process runs, and their conversions.

A multi-process save is the usual checkpoint directory (muse.checkpoint: config.json, tokenizer.json,
meta.json, train_state.pt, manifest.json, built in a temporary sibling and renamed into place, `latest`
moved last) plus the DCP files every rank writes in parallel:

    step_000500/
        .metadata, __0_0.distcp, __1_0.distcp, ...   model + optimizer state, keyed by parameter name
                                                      (wrapper prefixes stripped), each rank its shards
        model.safetensors                             full weights gathered on rank 0 (full_weights=True),
                                                      so `muse sample`, eval, export read it unchanged
        train_state.pt                                step, tokens, loader position, RNG (rank 0); no optimizer
        config.json tokenizer.json meta.json manifest.json

Resuming reads the DCP files into whatever layout the new run has: another world size, FSDP or DDP,
another tp, or one plain process (DCP reshards by name and offset). A single-device checkpoint resumes
on N processes too: the weights are loaded before the model is sharded, and the optimizer state is cut
into the same shards as the parameters (`shard_optimizer_state`). `consolidate` adds model.safetensors
to a sharded checkpoint saved without it, offline, with no process group.

Rank 0 alone writes the small files and moves `latest`; every rank writes its shards. What this module
does not know: the training loop, data, how parameters are grouped by the optimizer (it sees
`optimizer.optimizers`, the torch optimizers behind muse's MuseOptimizer).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from muse.checkpoint import (
    load_train_state,
    read_config,
    read_head,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from muse.checkpoint.manifest import SHARDED_METADATA, step_of
from muse.common import dist
from muse.common.errors import CheckpointError
from muse.common.logging import get_logger
from muse.distributed.mesh import barrier, broadcast_object, is_initialized

log = get_logger(__name__)

MODEL_FILE = "model.safetensors"


def _dcp_load(state: dict, ckpt_dir) -> None:
    """dcp.load, without its warning when one plain process reads a checkpoint (that is intended here)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(ckpt_dir))


def is_sharded(ckpt_dir) -> bool:
    """True if the checkpoint holds DCP shards (resumable at any world size through `load_sharded`)."""
    return (Path(ckpt_dir) / SHARDED_METADATA).is_file()


def _is_dcp_file(name: str) -> bool:
    return name == SHARDED_METADATA or name.endswith(".distcp")


def _app_state(model: nn.Module, optimizer) -> dict:
    """{"model": ..., "optim": ...} keyed by clean parameter names, tensors as this rank's DTensor shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        # A fresh optimizer has no state yet: torch initialises it with one zero-lr step on zero grads.
        state["optim"] = get_optimizer_state_dict(model, optimizer.optimizers)
    return state


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0's CPU ({} on the other ranks). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(stage_dir, step: int, *, model: nn.Module, optimizer, model_config, tokenizer,
                 train_state: dict, meta: dict, keep_last: int | None, milestone_every: int | None,
                 full_weights: bool = True) -> Path:
    """Every rank: write `stage_dir/step_{step}` (see the module docstring). Returns its path."""
    import torch.distributed.checkpoint as dcp

    state = _app_state(model, optimizer)
    full = full_model_state(model) if full_weights else None

    def write_shards(tmp: Path) -> None:
        broadcast_object(str(tmp))  # rank 0 made the temporary directory; the others write into it too
        dcp.save(state, checkpoint_id=str(tmp))  # returns once every rank's files and .metadata exist

    if dist.is_main():
        meta = {**meta, "sharded": True, "world_size": dist.world_size(),
                "n_params": sum(int(p.numel()) for p in model.parameters()),  # DTensor numel is global
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
        path = save_checkpoint(stage_dir, step, model_state=full or None, model_config=model_config,
                               tokenizer=tokenizer, train_state=train_state, meta=meta, keep_last=keep_last,
                               milestone_every=milestone_every, write_extra=write_shards)
    else:
        dcp.save(state, checkpoint_id=broadcast_object(None))
        path = None
    barrier()  # nobody moves on (and, say, saves again) before rank 0 has renamed the directory
    return Path(broadcast_object(str(path)))


def load_sharded(ckpt_dir, model: nn.Module, optimizer=None) -> None:
    """Every rank: fill `model` (and `optimizer`) from a sharded checkpoint, whatever the layouts then and
    now. Works without a process group (one plain process reads every shard)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    ckpt_dir = Path(ckpt_dir)
    if not is_sharded(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} is not a sharded checkpoint (no {SHARDED_METADATA})")
    state = _app_state(model, optimizer)
    try:
        _dcp_load(state, ckpt_dir)
    except Exception as e:  # DCP reports a missing key or a wrong shape with its own exception types
        raise CheckpointError(
            f"{ckpt_dir} does not fit this model/optimizer ({str(e).strip().splitlines()[0][:300]}); resume "
            "with the model and optimizer settings it was trained with"
        ) from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer.optimizers, state["optim"])


def _shard_like(full: torch.Tensor, p):
    from torch.distributed.tensor import DTensor, Replicate

    mesh = p.device_mesh
    whole = DTensor.from_local(full.to(p.device), mesh, [Replicate()] * mesh.ndim, run_check=False)
    return whole.redistribute(mesh, p.placements)  # a local slice: no communication


def shard_optimizer_state(optimizer, state: dict) -> dict:
    """A single-device MuseOptimizer state_dict (full tensors) with each tensor of a sharded parameter's
    shape replaced by this rank's shard, so `optimizer.load_state_dict` can take it. Index keys follow
    the parameter order, which wrapping does not change (same modules, same names). `state` is not
    modified (its inner dicts may be a live optimizer's)."""
    out = {**state, "optimizers": []}
    for opt, sd in zip(optimizer.optimizers, state["optimizers"], strict=True):
        params = [p for g in opt.param_groups for p in g["params"]]
        cut = {}
        for idx, entries in sd["state"].items():
            p = params[int(idx)]
            if type(p).__name__ == "DTensor":
                entries = {key: _shard_like(value, p) if torch.is_tensor(value) and value.shape == p.shape else value
                           for key, value in entries.items()}
            cut[idx] = entries
        out["optimizers"].append({**sd, "state": cut})
    return out


def consolidate(ckpt_dir) -> Path:
    """Add model.safetensors (the full weights) to a sharded checkpoint, rewriting it atomically in place
    (`latest` stays where it is). One process, no process group, CPU. Returns the checkpoint path."""
    import json

    from muse.model import ModelConfig, build_model

    ckpt = resolve_checkpoint(ckpt_dir)
    if (ckpt / MODEL_FILE).exists():
        return ckpt
    if not is_sharded(ckpt):
        raise CheckpointError(f"{ckpt} has neither {MODEL_FILE} nor sharded weights; it cannot be consolidated")
    if is_initialized():
        raise RuntimeError("consolidate() runs in a single process without a process group")
    if read_head(ckpt) is not None:  # a reward model: the trunk with another head than build_model's
        raise CheckpointError(f"{ckpt} holds a {read_head(ckpt)['kind']} model saved as shards only; it cannot be "
                              "consolidated here - save it with full weights (full_weights = true, the default)")
    cfg = ModelConfig.from_dict(read_config(ckpt))
    model = build_model(cfg)
    state = {"model": model.state_dict()}
    _dcp_load(state, ckpt)
    meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    train_state = load_train_state(ckpt) if (ckpt / "train_state.pt").exists() else None

    def copy_shards(tmp: Path) -> None:
        for f in ckpt.iterdir():
            if f.is_file() and _is_dcp_file(f.name):
                shutil.copy2(f, tmp / f.name)

    step = step_of(ckpt)
    if step is None:
        raise CheckpointError(f"{ckpt} is not a step_* directory; pass the checkpoint inside a stage directory")
    out = save_checkpoint(ckpt.parent, step, model_state=state["model"], model_config=cfg,
                          tokenizer=ckpt / "tokenizer.json", train_state=train_state, meta=meta, keep_last=None,
                          write_extra=copy_shards, point_latest=False)
    verify_checkpoint(out)
    log.info("wrote %s", out / MODEL_FILE)
    return out
