"""Where a post-training stage starts: the checkpoint it loads (resolved, and verified, once), the
tokenizer and model config saved beside it, and the sequence length it trains at. SFT, the preference
objectives (RM, DPO) and GRPO all begin here; what each does next is its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from muse.checkpoint import read_config, resolve_checkpoint
from muse.common.errors import ConfigError
from muse.model import ModelConfig
from muse.tokenizer import Tokenizer


def open_start(path: str | os.PathLike, stages: tuple[str, ...]) -> tuple[Path, Tokenizer, ModelConfig]:
    """(checkpoint, tokenizer, model config) of the latest of `stages` in `path` (a run or a checkpoint)."""
    init_from = resolve_checkpoint(path, stages=stages)
    return (init_from, Tokenizer.from_file(init_from / "tokenizer.json"),
            ModelConfig.from_dict(read_config(init_from)))


def train_seq_len(requested: int | None, model_cfg: ModelConfig) -> int:
    """The rows' length: `requested` (--seq-len), else the model's context; never beyond the context."""
    ctx = model_cfg.max_seq_len
    seq_len = requested or ctx
    if seq_len > ctx:
        raise ConfigError(f"seq_len {seq_len} is beyond the model's context ({ctx}); lower --seq-len")
    return seq_len
