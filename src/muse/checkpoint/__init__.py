"""muse.checkpoint: atomic checkpoint directories with a manifest, the stage registry, and the one loader.

`load(path)` turns a run, stage or checkpoint directory into (model, tokenizer, meta); `save_checkpoint`
writes one; `resolve_stage` / `resolve_checkpoint` / `verify_checkpoint` say which directory to trust, and
`STAGES` / `latest_stage` which stage of a run a command means. See docs/checkpoints.md.
"""

from muse.checkpoint.checkpoint import (
    capture_rng_state,
    describe_difference,
    load,
    load_model_state,
    load_train_state,
    read_config,
    read_head,
    restore_rng_state,
    rotate_checkpoints,
    save_checkpoint,
)
from muse.checkpoint.manifest import (
    latest_good,
    list_checkpoints,
    verify_checkpoint,
)
from muse.checkpoint.stages import (
    STAGES,
    Stage,
    generative_stages,
    get_stage,
    latest_stage,
    resolve_checkpoint,
    resolve_stage,
    trained_stages,
)

__all__ = [
    "STAGES",
    "Stage",
    "capture_rng_state",
    "describe_difference",
    "generative_stages",
    "get_stage",
    "latest_good",
    "latest_stage",
    "list_checkpoints",
    "load",
    "load_model_state",
    "load_train_state",
    "read_config",
    "read_head",
    "resolve_checkpoint",
    "resolve_stage",
    "restore_rng_state",
    "rotate_checkpoints",
    "save_checkpoint",
    "trained_stages",
    "verify_checkpoint",
]
