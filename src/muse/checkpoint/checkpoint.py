"""Saving a training state as a checkpoint directory, and turning one back into (model, tokenizer, meta).

    <stage_dir>/step_000500/
        model.safetensors   weights (CPU, contiguous); tied weights stored once, aliases in its metadata
        config.json         {"format_version": 1, "model": ModelConfig.to_dict()}, and "head" when the trunk
                            carries another head than the LM's (a reward model: {"kind": "reward", ...})
        tokenizer.json      the tokenizer the model was trained with
        train_state.pt      optional: optimizer, schedule, loader and RNG states (loads with weights_only=True)
        meta.json           step, stage, muse version, dtype, saved_at, and what the trainer adds (tokens, init_from)
        manifest.json       written last: size and sha256 of every file above (see manifest.py)
    <stage_dir>/latest -> step_000500   moved only after the directory above is durable

A save is built in a hidden temporary sibling and renamed into place (muse.common.paths.atomic_dir), so a
killed save leaves the previous checkpoint and `latest` untouched; the next save removes its leftovers.

This module does not know how a model is trained, sharded or compiled: callers hand it a plain module
(compiled/DDP wrappers are unwrapped) or a full, unsharded state dict.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import muse
from muse.checkpoint.manifest import (
    FORMAT_VERSION,
    LATEST,
    SHARDED_METADATA,
    build_manifest,
    corrupt_error,
    find_problem,
    list_checkpoints,
    read_latest,
    step_dir_name,
    step_of,
)
from muse.checkpoint.stages import resolve_checkpoint, resolve_stage
from muse.common.errors import CheckpointError, ConfigError, TokenizerError
from muse.common.logging import get_logger
from muse.common.paths import atomic_dir, atomic_write_text, fsync_dir
from muse.model import ModelConfig, build_model
from muse.tokenizer import Tokenizer

log = get_logger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TRAIN_STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
# safetensors metadata key holding {alias_name: stored_name} for tensors that share storage (tied weights).
TIED_KEY = "muse.tied"
# config.json key for a non-LM head. A model_config with a `head` dict attribute (muse.posttrain.rm's
# RewardModelConfig) saves it there; `load` refuses such a checkpoint, which is not a language model.
HEAD_KEY = "head"
# Prefixes that wrappers add to parameter names; a checkpoint stores the plain module's names.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.")


# --- RNG state ---------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Every global RNG a training step may draw from, as plain lists and tensors (weights_only-safe).

    CUDA: only the current device. Reading every device's state would create a CUDA context on each
    visible GPU from each rank under torchrun (hundreds of MB apiece); each rank owns one device anyway.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses: store a list.
        "numpy": {
            "bit_generator": name,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Put back what capture_rng_state() returned, so the next random numbers are the ones that would have come."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["bit_generator"],
            np.asarray(npst["keys"], dtype=np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:  # resuming a GPU run on a CPU: harmless for correctness, but dropout/sampling will differ
            log.warning("the checkpoint holds a CUDA RNG state but CUDA is unavailable; not restoring it")


# --- helpers for save --------------------------------------------------------------------------------


def _check_weights_only_safe(obj, where: str = "train_state") -> None:
    """Refuse what torch.load(weights_only=True) would refuse, naming where it sits (a bug in the caller).

    Exact types on purpose: numpy.float64 is a float subclass that pickles as a numpy object.
    """
    t = type(obj)
    if obj is None or t in (bool, int, float, str, bytes):
        return
    if t in (torch.Tensor, nn.Parameter, torch.dtype, torch.device):
        return
    if t in (dict, collections.OrderedDict):
        for k, v in obj.items():
            _check_weights_only_safe(k, f"{where} key")
            _check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    if t in (list, tuple, torch.Size):
        for i, v in enumerate(obj):
            _check_weights_only_safe(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {t.__module__}.{t.__qualname__}, which torch.load(weights_only=True) cannot read; "
        "store plain dicts/lists/numbers/tensors (e.g. dataclasses.asdict(x), array.tolist())"
    )


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (`_orig_mod`) and DistributedDataParallel (`module`)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _prepare_state(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU, contiguous, storage-independent tensors for safetensors, plus {alias: stored name} for ties.

    safetensors refuses tensors that share storage. The same view under two names (a tied embedding
    and output head) is stored once and recorded as an alias; any other overlap is copied apart.
    Aliases are found on the original tensors: moving each to the CPU first would make two copies.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    seen_storage: set[int] = set()
    for raw_name, t in state.items():
        name = _clean_name(raw_name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model state {raw_name!r} is a {type(t).__name__}, not a tensor")
        if type(t).__name__ == "DTensor":
            raise TypeError(
                f"model state {raw_name!r} is a sharded DTensor; gather a full state dict first "
                "(torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True)"
            )
        if t.device.type == "meta":
            raise ValueError(f"model state {raw_name!r} is on the meta device (never materialized)")
        t = t.detach()
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in seen_views:
            aliases[name] = seen_views[view]
            continue
        seen_views[view] = name
        t = t.to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen_storage:
            t = t.clone()  # a different view of storage another tensor already uses
        seen_storage.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return tensors, aliases


def _json_default(obj):
    """meta.json accepts what trainers naturally have at hand: 0-d tensors, numpy scalars, paths."""
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"meta value of type {type(obj).__name__} is not JSON-serializable")


def _config_dict(model_config) -> dict:
    if isinstance(model_config, ModelConfig):
        return model_config.to_dict()
    if isinstance(model_config, dict):
        # Round-trip now: a checkpoint whose config cannot be read back is worse than a failed save.
        return ModelConfig.from_dict(model_config).to_dict()
    raise TypeError(f"model_config must be a ModelConfig or a dict, not {type(model_config).__name__}")


def _tokenizer_for(tokenizer, config: dict):
    """A Tokenizer from an object or a path (file, or a directory holding tokenizer.json), checked to fit."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_file(tokenizer)  # TokenizerError naming the path when it is missing
    if not hasattr(tokenizer, "save"):
        raise TypeError(f"tokenizer must be a Tokenizer or a path to tokenizer.json, not {type(tokenizer).__name__}")
    # A model may have more rows than the tokenizer has ids (vocab padded for fast matmuls), never fewer.
    if getattr(tokenizer, "vocab_size", 0) > config["vocab_size"]:
        raise TokenizerError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {config['vocab_size']}; "
            "build the model with vocab_size >= the tokenizer's"
        )
    return tokenizer


def _point_latest(stage_dir: Path, name: str) -> None:
    """Make `latest` name `name` in one atomic rename (temp symlink + os.replace), then fsync the stage dir."""
    link = stage_dir / LATEST
    if link.is_dir() and not link.is_symlink():
        raise CheckpointError(f"{link} is a directory, not a link; move it away so muse can point it at {name}")
    tmp = stage_dir / f".{LATEST}.tmp-{os.getpid()}"
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(name, tmp)
    except OSError:  # no symlinks (some Windows setups, some network filesystems): a one-line file
        atomic_write_text(link, name + "\n")
        return
    os.replace(tmp, link)
    fsync_dir(stage_dir)


def _remove_dir(path: Path) -> None:
    """Delete a step dir so that a kill midway leaves a hidden leftover, never a half-deleted `step_*`."""
    doomed = path.parent / f".{path.name}.del-{os.getpid()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _clean_leftovers(stage_dir: Path) -> None:
    # Only our own names: `.step_*` (temp/old/deleting dirs from atomic_dir and _remove_dir) and the
    # temporary `latest` link. One writer per stage dir is assumed (rank 0 saves).
    for p in stage_dir.iterdir():
        if p.name.startswith(".step_") and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{LATEST}.tmp-") and os.path.lexists(p):
            os.unlink(p)


def rotate_checkpoints(stage_dir: str | os.PathLike, keep_last: int | None, milestone_every: int | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` step dirs, milestones (step % milestone_every == 0) and `latest`.

    Returns the deleted directories. keep_last=None keeps everything.
    """
    stage_dir = Path(stage_dir)
    if keep_last is None:
        return []
    ckpts = list_checkpoints(stage_dir)
    keep = {p.name for p in ckpts[-keep_last:]}
    target = read_latest(stage_dir)
    if target:
        keep.add(target)
    deleted = []
    for p in ckpts:
        if p.name in keep or (milestone_every and step_of(p) % milestone_every == 0):
            continue
        _remove_dir(p)
        deleted.append(p)
    if deleted:
        fsync_dir(stage_dir)
    return deleted


# --- save --------------------------------------------------------------------------------------------


def save_checkpoint(
    stage_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module | None = None,
    model_state: dict | None = None,
    model_config=None,
    tokenizer,
    train_state: dict | None = None,
    meta: dict | None = None,
    keep_last: int | None = 3,
    milestone_every: int | None = None,
    write_extra=None,
    point_latest: bool = True,
) -> Path:
    """Write `stage_dir/step_{step:06d}/` atomically, move `latest` to it, rotate; return its path.

    Pass either `model` (a plain, compiled or DDP-wrapped module) or `model_state` (a full state dict).
    `model_config` (ModelConfig or dict) defaults to `model.config`. `tokenizer` is a Tokenizer or the
    path of a tokenizer.json (or of the directory holding it, like runs/x/data). Saving a step that already exists replaces it atomically.
    `write_extra(tmp_dir)` writes more files into the directory before its manifest (sharded saves,
    muse.distributed.checkpoint); with it, the weights may be left out (neither model nor model_state).
    point_latest=False leaves `latest` where it is (rewriting an older checkpoint in place).
    """
    if (model is None) == (model_state is None) and not (write_extra and model is None):
        raise TypeError("pass exactly one of model= or model_state=")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ConfigError(f"keep_last must be at least 1 (or None to keep every checkpoint), got {keep_last}")
    if milestone_every is not None and milestone_every < 1:
        raise ConfigError(f"milestone_every must be at least 1 (or None), got {milestone_every}")
    if model is not None:
        model = _unwrap(model)
        if model_config is None:
            model_config = getattr(model, "config", None)
        model_state = model.state_dict()
    if model_config is None:
        raise TypeError("pass model_config= (the model has no .config)")
    config = _config_dict(model_config)
    head = getattr(model_config, HEAD_KEY, None)
    if head is not None and not (isinstance(head, dict) and isinstance(head.get("kind"), str)):
        raise TypeError(f"model_config.head must be a dict with a 'kind', not {head!r}")
    tokenizer = _tokenizer_for(tokenizer, config)
    if train_state is not None:
        _check_weights_only_safe(train_state)
    tensors, aliases = _prepare_state(model_state) if model_state is not None else ({}, {})

    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    float_dtypes = sorted({str(t.dtype) for t in tensors.values() if t.is_floating_point()})
    full_meta = {
        **(meta or {}),
        "step": step,
        "stage": stage_dir.name,
        "muse_version": muse.__version__,
        "dtype": float_dtypes[0].removeprefix("torch.") if len(float_dtypes) == 1 else None,
        "n_params": sum(t.numel() for t in tensors.values()),
        # What "latest stage" is decided by (stages.py). A rewrite of an old checkpoint (consolidate) keeps
        # the time it was trained, which its caller passes back in.
        "saved_at": (meta or {}).get("saved_at") or round(time.time(), 3),
    }
    if not tensors:  # sharded only: the caller's meta knows the dtype and size
        full_meta.update({k: (meta or {}).get(k) for k in ("dtype", "n_params")})
    meta_text = json.dumps(full_meta, indent=2, default=_json_default) + "\n"  # fail before writing anything

    with atomic_dir(stage_dir / name, overwrite=True) as tmp:
        if tensors:
            _write_weights(tensors, aliases, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(
            json.dumps({"format_version": FORMAT_VERSION, "model": config, **({HEAD_KEY: head} if head else {})},
                       indent=2) + "\n", encoding="utf-8"
        )
        tokenizer.save(tmp / TOKENIZER_FILE)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE_FILE)
        (tmp / META_FILE).write_text(meta_text, encoding="utf-8")
        if write_extra is not None:
            write_extra(tmp)
        # Last: its presence is what says the directory is complete.
        (tmp / "manifest.json").write_text(json.dumps(build_manifest(tmp, step), indent=2) + "\n", encoding="utf-8")
    # atomic_dir has fsynced every file, the directory, and the rename; only now may `latest` move.
    if point_latest:
        _point_latest(stage_dir, name)
    rotate_checkpoints(stage_dir, keep_last, milestone_every)
    _clean_leftovers(stage_dir)
    return stage_dir / name


def _write_weights(tensors: dict[str, torch.Tensor], aliases: dict[str, str], path: Path) -> None:
    save_file(tensors, str(path), metadata={TIED_KEY: json.dumps(aliases, sort_keys=True)})


# --- load --------------------------------------------------------------------------------------------


def _check_one(ckpt_dir: Path, name: str) -> None:
    problem = find_problem(ckpt_dir, only=name)
    if problem is not None:
        raise corrupt_error(ckpt_dir, problem)


def load_model_state(ckpt_dir: str | os.PathLike, *, device="cpu", verify: bool = True) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint by parameter name, tied names pointing at the same tensor.

    verify=True checks model.safetensors against the manifest first (one file's hash).
    """
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MODEL_FILE).exists() and (ckpt_dir / SHARDED_METADATA).exists():
        raise CheckpointError(
            f"{ckpt_dir} holds sharded weights only (saved by a multi-process run without full weights); "
            f"add them with `muse train {ckpt_dir} --consolidate`"
        )
    if verify:
        _check_one(ckpt_dir, MODEL_FILE)
    try:
        with safe_open(str(ckpt_dir / MODEL_FILE), framework="pt", device=str(device)) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get(TIED_KEY, "{}"))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise corrupt_error(ckpt_dir, f"{MODEL_FILE} cannot be read: {e}") from None
    for alias, stored in aliases.items():
        state[alias] = state[stored]
    return state


def load_train_state(ckpt_dir: str | os.PathLike, *, verify: bool = True) -> dict:
    """The train_state dict saved with a checkpoint (tensors on CPU), read with weights_only=True."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / TRAIN_STATE_FILE
    if not path.exists():
        raise CheckpointError(
            f"{ckpt_dir} has no {TRAIN_STATE_FILE} (it was saved without training state): it can be loaded "
            "for inference or fine-tuning but not resumed; drop --resume"
        )
    if verify:
        _check_one(ckpt_dir, TRAIN_STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read with weights_only=True ({e}); it was not written by muse") from None


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    """The model config dict of a checkpoint (config.json's "model"), refusing formats this muse cannot read."""
    return _read_config_file(ckpt_dir)["model"]


def read_head(ckpt_dir: str | os.PathLike) -> dict | None:
    """config.json's "head" ({"kind": "reward", ...}), or None for a language model."""
    head = _read_config_file(ckpt_dir).get(HEAD_KEY)
    return head if isinstance(head, dict) else None


def _read_config_file(ckpt_dir: str | os.PathLike) -> dict:
    ckpt_dir = Path(ckpt_dir)
    try:
        with open(ckpt_dir / CONFIG_FILE, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise corrupt_error(ckpt_dir, f"{CONFIG_FILE} is unreadable: {e}") from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if version is None or not isinstance(config.get("model"), dict):
        raise CheckpointError(
            f"{ckpt_dir}/{CONFIG_FILE} is not a muse checkpoint config (no format_version/model); "
            "a Hugging Face model directory must be imported first"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt_dir} was written by a newer muse (checkpoint format {version}; this muse reads "
            f"{FORMAT_VERSION}); upgrade muse"
        )
    return config


def load(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None, stages=None):
    """(model, tokenizer, meta) from a run, stage or checkpoint directory; the model is in eval mode.

    In a run directory, stages=None takes the stage trained last (muse.checkpoint.stages); a tuple
    takes the first of those stages that holds a checkpoint, e.g. ("sft",). dtype=None keeps the saved
    dtype. meta is meta.json plus "path" (the checkpoint directory) and "config" (the model config dict).
    """
    # Both verify every file's hash.
    ckpt = resolve_stage(path) if stages is None else resolve_checkpoint(path, tuple(stages))
    config_dict = read_config(ckpt)
    head = read_head(ckpt)
    if head is not None:
        raise CheckpointError(f"{ckpt} holds a {head.get('kind', 'non-language')} model (config.json \"head\"), not a language model; "
                              "pass a checkpoint of a generative stage (base, sft, dpo, grpo)")
    try:
        cfg = ModelConfig.from_dict(config_dict)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt}/{CONFIG_FILE} does not match this muse's ModelConfig: {e}") from None
    with open(ckpt / META_FILE, encoding="utf-8") as f:
        meta = json.load(f)
    if dtype is None:
        dtype = getattr(torch, meta.get("dtype") or "float32")
    state = load_model_state(ckpt, verify=False)
    # Build normally (meta device, then init_weights on `device`) and copy the weights in. The wasted
    # init is cheap at our sizes, and copying keeps what build_model set up that a state dict does not
    # carry: tied parameters stay one Parameter, non-persistent buffers (RoPE tables) are computed.
    model = build_model(cfg, device=device, dtype=dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing/unexpected names or wrong shapes
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"{ckpt}/{MODEL_FILE} does not fit its config.json ({' '.join(first[:3])[:400]}); "
            "the checkpoint was edited by hand or written by an incompatible muse"
        ) from None
    model.eval()
    tokenizer = Tokenizer.from_file(ckpt / TOKENIZER_FILE)
    meta = {**meta, "path": str(ckpt), "config": config_dict}
    meta.setdefault("step", step_of(ckpt))
    return model, tokenizer, meta


def describe_difference(saved_cfg: dict, new_cfg: dict) -> str:
    """One line per field that differs between two config dicts ('' when they match), nested keys dotted."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(saved_cfg), flat(new_cfg)
    lines = []
    for key in list(a) + [k for k in b if k not in a]:
        if key not in b:
            lines.append(f"{key}: {a[key]!r} in the checkpoint, absent now")
        elif key not in a:
            lines.append(f"{key}: absent in the checkpoint, {b[key]!r} now")
        elif a[key] != b[key]:
            lines.append(f"{key}: {a[key]!r} in the checkpoint, {b[key]!r} now")
    return "\n".join(lines)
