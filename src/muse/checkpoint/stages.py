"""The stage registry, and which checkpoint a command means when it is handed a path.

A run directory holds one directory per training stage (`runs/x/base/`, `runs/x/sft/`, ...). This module
is the one list of those stages - the name of each directory, the `muse` command that fills it, and
whether it holds a language model that `load`, `muse serve`, `muse generate`, `muse export` and
`muse eval` may pick - and the one rule for picking among them:

    latest = the stage trained last, read from the checkpoints themselves (see `latest_stage`).

A stage's newest checkpoint *supersedes* the checkpoint it was initialised from (its meta.json
`init_from`, written by the training loop as RUN-relative `sft/step_000400`) while that is still the
parent stage's newest checkpoint: it was trained from it, so it is newer by construction, whatever the
clocks say. Among the stages nobody supersedes, the one whose newest checkpoint was saved last wins
(meta.json `saved_at`, written by every save; manifest.json's modification time for checkpoints that
predate it). So base -> sft -> grpo -> dpo serves dpo, and so does base -> sft -> dpo -> grpo -> dpo;
retraining sft after dpo was made from it serves the new sft.

It reads directories and meta.json files; it never loads weights and never writes. It does not know how
a stage trains (muse.train, muse.posttrain).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from muse.checkpoint.manifest import (
    LATEST,
    MANIFEST,
    corrupt_error,
    list_checkpoints,
    read_latest,
    verify_checkpoint,
)
from muse.common.errors import CheckpointError, UsageError, closest


@dataclass(frozen=True)
class Stage:
    name: str  # the directory inside a run, RUN/<name>/
    command: str  # the `muse` verb that writes it (for "run `muse ...` first" hints)
    generative: bool  # a language model that serving, generation, export and eval may pick by default
    summary: str


# In the order a run usually makes them. Adding a stage is one line here (docs/posttrain.md).
REGISTRY: tuple[Stage, ...] = (
    Stage("base", "train", True, "pretraining on raw text"),
    Stage("sft", "sft", True, "supervised fine-tuning on chats, loss on assistant tokens"),
    Stage("rm", "rm", False, "reward model: a scalar head scoring a chat, trained on preference pairs"),
    Stage("dpo", "dpo", True, "direct preference optimisation against a frozen reference"),
    Stage("grpo", "grpo", True, "group-relative policy optimisation on task rewards"),
)
STAGES: dict[str, Stage] = {s.name: s for s in REGISTRY}


def get_stage(name: str) -> Stage:
    """The registered stage called `name`; a UsageError naming the valid ones otherwise."""
    try:
        return STAGES[name]
    except KeyError:
        hint = closest(name, STAGES) or f" Stages: {', '.join(STAGES)}."
        raise UsageError(f"unknown stage {name!r}.{hint}") from None


def generative_stages() -> tuple[str, ...]:
    return tuple(s.name for s in REGISTRY if s.generative)


# --- what a run directory holds ----------------------------------------------------------------------


def is_checkpoint_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file() or ((path / "config.json").is_file() and (path / "model.safetensors").is_file())


def is_stage_dir(path: Path) -> bool:
    return bool(list_checkpoints(path)) or os.path.lexists(path / LATEST)


@dataclass(frozen=True)
class TrainedStage:
    name: str
    checkpoint: Path  # the one a command would use: what `latest` names, else the newest step
    init_from: str | None  # meta.json's init_from: RUN-relative "sft/step_000400", or a path outside the run
    saved_at: float  # seconds since the epoch


def _current(stage_dir: Path) -> Path | None:
    target = read_latest(stage_dir)
    if target is not None:
        return stage_dir / target
    ckpts = list_checkpoints(stage_dir)
    return ckpts[-1] if ckpts else None


def _read_trained(name: str, ckpt: Path) -> TrainedStage:
    try:
        meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}  # a broken checkpoint still counts as trained: picking it raises, never skips it silently
    saved_at = meta.get("saved_at") if isinstance(meta, dict) else None
    if not isinstance(saved_at, (int, float)):
        try:
            saved_at = (ckpt / MANIFEST).stat().st_mtime
        except OSError:
            saved_at = 0.0
    init_from = meta.get("init_from") if isinstance(meta, dict) else None
    return TrainedStage(name, ckpt, init_from if isinstance(init_from, str) else None, float(saved_at))


def trained_stages(run_dir: str | os.PathLike, *, generative_only: bool = True) -> list[TrainedStage]:
    """The registered stages that hold a checkpoint in `run_dir`, in registry order."""
    run_dir = Path(run_dir)
    found = []
    for stage in REGISTRY:
        if generative_only and not stage.generative:
            continue
        ckpt = _current(run_dir / stage.name) if is_stage_dir(run_dir / stage.name) else None
        if ckpt is not None:
            found.append(_read_trained(stage.name, ckpt))
    return found


def _superseded(trained: dict[str, TrainedStage]) -> set[str]:
    """Stages whose newest checkpoint another stage's newest checkpoint was initialised from."""
    out = set()
    for child in trained.values():
        if not child.init_from or os.path.isabs(child.init_from):
            continue  # started outside this run (an import, another run): no order inside this one
        parts = Path(child.init_from).parts
        parent = trained.get(parts[0]) if len(parts) == 2 else None
        if parent is not None and parent.name != child.name and parent.checkpoint.name == parts[1]:
            out.add(parent.name)
    return out


def latest_stage(run_dir: str | os.PathLike, *, generative_only: bool = True) -> str | None:
    """The stage of `run_dir` trained last (the module docstring has the rule), or None when none is."""
    trained = {t.name: t for t in trained_stages(run_dir, generative_only=generative_only)}
    if not trained:
        return None
    superseded = _superseded(trained)
    # Everything superseded means a cycle of init_froms, which the newest save breaks.
    candidates = [t for t in trained.values() if t.name not in superseded] or list(trained.values())
    return max(candidates, key=lambda t: t.saved_at).name


# --- resolving what the user typed ---------------------------------------------------------------------


def _pick_in_stage(stage_dir: Path, *, fast: bool) -> Path:
    target = read_latest(stage_dir)
    if target is not None:
        ckpt = stage_dir / target
        if not ckpt.is_dir():
            raise corrupt_error(ckpt, f"{stage_dir / LATEST} points to it but it does not exist", fast=fast)
    else:
        ckpts = list_checkpoints(stage_dir)
        if not ckpts:
            command = STAGES[stage_dir.name].command if stage_dir.name in STAGES else "train"
            raise CheckpointError(f"no checkpoint in {stage_dir}; run `muse {command}` to make one")
        ckpt = ckpts[-1]
    # No silent fallback: training on from an older step than the user expects loses work quietly.
    verify_checkpoint(ckpt, fast=fast)
    return ckpt


def resolve_checkpoint(path: str | os.PathLike, stages=("base",), *, fast: bool = False) -> Path:
    """The verified checkpoint directory that `path` names.

    `path` may be a checkpoint directory, a stage directory (its `latest`, else its newest step) or a run
    directory (the first of `stages` that holds checkpoints, so ("sft", "base") prefers post-trained
    weights). A corrupt choice raises CheckpointError naming the last good checkpoint instead of
    falling back to it. `resolve_stage` is the same with the registry's "latest" rule.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"{p} does not exist; pass a run directory (e.g. runs/x) or a checkpoint directory "
            "(e.g. runs/x/base/step_000500)"
        )
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; pass a run directory or a checkpoint directory")
    if p.is_symlink() and p.name == LATEST:  # report the real step directory, not the link
        p = p.parent / read_latest(p.parent)
    if is_checkpoint_dir(p):
        verify_checkpoint(p, fast=fast)
        return p
    if is_stage_dir(p):
        return _pick_in_stage(p, fast=fast)
    for stage in stages:
        if is_stage_dir(p / stage):
            return _pick_in_stage(p / stage, fast=fast)
    looked = ", ".join(f"{s}/" for s in stages)
    first = stages[-1] if stages else "base"
    command = STAGES[first].command if first in STAGES else first
    raise CheckpointError(f"no checkpoint in {p} (looked in {looked}); run `muse {command} {p}` first")


def resolve_stage(path: str | os.PathLike, stage: str | None = None, *, fast: bool = False) -> Path:
    """The verified checkpoint a command means by `path` and its `--stage`.

    A checkpoint or stage directory names itself. In a run directory, `stage` picks RUN/<stage>/ and None
    picks the latest generative stage (the module docstring). `stage` must be a registered name.
    """
    if stage is not None:
        return resolve_checkpoint(path, (get_stage(stage).name,), fast=fast)
    p = Path(path)
    latest = latest_stage(p) if p.is_dir() and not is_checkpoint_dir(p) and not is_stage_dir(p) else None
    if latest is not None:
        return resolve_checkpoint(p, (latest,), fast=fast)
    # Newest-made first, base last, so "nothing found" says to run `muse train`.
    return resolve_checkpoint(path, tuple(reversed(generative_stages())), fast=fast)
