"""`TrainConfig`: what `muse train` needs, resolved from defaults <- TOML file <- flags <- `--set`.

`TrainConfig` is the training loop's `LoopConfig` (muse.train.loop) plus what pretraining adds, so a
post-training stage's config that extends LoopConfig too spells the shared keys the same way. Sections
are small dataclasses owned by their components (`OptimConfig`, `ScheduleConfig`, `ParallelConfig`); the model's
shape is derived from `depth` by `ModelConfig.from_depth`, and any model field can be overridden under
`[model]` (or `--set model.n_kv_head=2`). Unknown keys are errors that name the closest valid keys.
The resolved config is written into the run directory as `train_config.json`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muse.common.errors import ConfigError, closest
from muse.distributed.parallelize import ParallelConfig
from muse.model import ModelConfig
from muse.train.loop import LoopConfig


@dataclass
class TrainConfig(LoopConfig):
    """Pretraining's settings: the loop's (LoopConfig: optimizer, schedule, cadence, runtime) and these."""

    # shape: one knob, then any ModelConfig field under `model`; or the shape and weights of a checkpoint
    init_from: str = ""  # a checkpoint (e.g. from `muse import`) to continue pretraining: its config wins
    depth: int = 4
    arch: str = "llama"
    model: dict[str, Any] = field(default_factory=dict)
    # data
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch per process
    total_batch_tokens: int = 0  # tokens per optimizer step across processes; 0 = one micro-batch each
    # horizon: max_steps wins over train_tokens when both are set
    max_steps: int = 0
    train_tokens: int = 0
    # evaluation
    eval_batches: int = 20


def _coerce(value, typ, key: str):
    """Turn a TOML value or a `--set` string into the field's type, or a ConfigError."""
    origin = typing.get_origin(typ)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = args[0]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if typ in (int, float):
        try:
            if isinstance(value, str):
                v = float(value) if typ is float else int(float(value)) if "e" in value.lower() else int(value)
            else:
                v = typ(value)
            if typ is int and isinstance(value, float) and value != int(value):
                raise ValueError
            return v
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {'an integer' if typ is int else 'a number'}, got {value!r}") from None
    if typ is str:
        return str(value)
    if origin is tuple or typ is tuple:
        if isinstance(value, str):
            value = [x for x in value.strip("()[] ").split(",") if x.strip()]
        inner = typing.get_args(typ) or (float,)
        return tuple(_coerce(v, inner[0], key) for v in value)
    return value


def _parse_literal(text: str):
    """`--set` values: TOML literal syntax when it parses (numbers, bools, strings, arrays), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(obj, overrides: dict[str, Any], prefix: str = "") -> None:
    """Set (possibly dotted / nested) keys on a dataclass tree, type-checked, in place."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        name = f"{prefix}{head}"
        if head not in fields:
            raise ConfigError(f"unknown config key '{name}'.{closest(head, fields) or ' Valid keys: ' + ', '.join(fields)}")
        current = getattr(obj, head)
        if head == "model":  # free-form ModelConfig overrides, validated when the model config is built
            if rest:
                current[rest] = value
            elif isinstance(value, dict):
                current.update(value)
            else:
                raise ConfigError("model overrides take the form model.FIELD=value")
            continue
        if dataclasses.is_dataclass(current):
            if rest:
                apply_overrides(current, {rest: value}, prefix=f"{name}.")
            elif isinstance(value, dict):
                apply_overrides(current, value, prefix=f"{name}.")
            else:
                raise ConfigError(f"'{name}' is a section; set one of its keys, e.g. {name}.{next(iter(f.name for f in dataclasses.fields(current)))}=...")
            continue
        if rest:
            raise ConfigError(f"'{name}' is not a section; use {name}=value")
        setattr(obj, head, _coerce(value, hints[head], name))


def load_config(config_file: str | Path | None = None, flags: dict[str, Any] | None = None,
                sets: list[str] | None = None) -> TrainConfig:
    """defaults <- TOML file <- flags (already-typed, None = not given) <- `--set key=value` strings."""
    cfg = layer_overrides(TrainConfig(), config_file, flags, sets)
    validate(cfg)
    return cfg


def layer_overrides(cfg, config_file: str | Path | None = None, flags: dict[str, Any] | None = None,
                    sets: list[str] | None = None):
    """Apply, in order, a TOML file, flags (already-typed, None = not given) and `--set key=value` strings
    to any loop config (TrainConfig, SFTConfig, ...); returns it. Every stage resolves its flags this way."""
    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        apply_overrides(cfg, data)
    if flags:
        apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None})
    for item in sets or []:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        apply_overrides(cfg, {key.strip(): _parse_literal(text.strip())})
    return cfg


def validate(cfg: TrainConfig) -> None:
    for name in ("seq_len", "batch_size", "eval_batches", "log_every", "keep_last"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("max_steps", "train_tokens", "total_batch_tokens", "eval_every", "save_every", "milestone_every"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.arch not in ("llama", "gpt2"):
        raise ConfigError(f"arch must be llama or gpt2, got {cfg.arch!r}")
    cfg.parallel = ParallelConfig(**dataclasses.asdict(cfg.parallel))  # re-validate after overrides


def model_config(cfg: TrainConfig, vocab_size: int, init_ckpt: Path | None = None) -> ModelConfig:
    """The model's shape: `depth` derives the rest; `cfg.model` overrides any field. With `init_from`, the
    checkpoint's config is the shape (`cfg.model` may still change max_seq_len, which has no weights);
    `init_ckpt` is that checkpoint already resolved, so callers that hold it need not verify it again."""
    if cfg.init_from:
        from muse.checkpoint import read_config, resolve_checkpoint

        ckpt = init_ckpt or resolve_checkpoint(cfg.init_from, stages=("base",))
        saved = read_config(ckpt)
        extra = {k: v for k, v in cfg.model.items() if saved.get(k) != v}
        if set(extra) - {"max_seq_len"}:
            raise ConfigError(f"init_from {cfg.init_from} fixes the model shape; drop these model settings: "
                              f"{', '.join(sorted(set(extra) - {'max_seq_len'}))}")
        if saved["vocab_size"] < vocab_size:  # a model may pad its vocabulary; it may not lack ids
            raise ConfigError(f"init_from {ckpt} has vocab {saved['vocab_size']} but the run's tokenizer has "
                              f"{vocab_size}; prepare the data with `muse prepare --tokenizer {ckpt}/tokenizer.json`")
        saved["max_seq_len"] = max(saved["max_seq_len"], extra.get("max_seq_len", cfg.seq_len))
        return ModelConfig.from_dict(saved)
    overrides = dict(cfg.model)
    overrides.setdefault("max_seq_len", cfg.seq_len)
    return ModelConfig.from_depth(cfg.depth, vocab_size, arch=cfg.arch, **overrides)
