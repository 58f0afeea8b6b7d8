"""muse.checkpoint: atomic checkpoint directories with a manifest, and the one loader of them.

`load(path)` turns a run, stage or checkpoint directory into (model, tokenizer, meta); `save_checkpoint`
writes one; `resolve_checkpoint` / `verify_checkpoint` say which directory to trust. See docs/checkpoints.md.
"""

from muse.checkpoint.checkpoint import (
    capture_rng_state,
    describe_difference,
    load,
    load_model_state,
    load_train_state,
    read_config,
    restore_rng_state,
    rotate_checkpoints,
    save_checkpoint,
)
from muse.checkpoint.manifest import (
    latest_good,
    list_checkpoints,
    resolve_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "capture_rng_state",
    "describe_difference",
    "latest_good",
    "list_checkpoints",
    "load",
    "load_model_state",
    "load_train_state",
    "read_config",
    "resolve_checkpoint",
    "restore_rng_state",
    "rotate_checkpoints",
    "save_checkpoint",
    "verify_checkpoint",
]
