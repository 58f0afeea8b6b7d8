"""The manifest of a checkpoint directory, and what it lets us trust: verify, list, find the last good one.

A checkpoint is a directory `<stage>/step_000500/` whose LAST file written is `manifest.json`: the size and
sha256 of every other file. So a directory without a manifest is a save that never finished, and a file
whose size or hash disagrees is truncated or corrupt. A stage directory (`runs/x/base/`) holds step
directories and a `latest` link; a run directory (`runs/x/`) holds stage directories.

This module reads directories and names problems; it never loads a tensor and never deletes anything.
Writing checkpoints (and rotating them) lives in checkpoint.py; which stage and checkpoint a path means
(the stage registry, "latest") in stages.py. It knows nothing about models.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from muse.common.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# A checkpoint cannot be used without these; a manifest that does not list them is refused.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "meta.json")
# A sharded checkpoint (torch.distributed.checkpoint, written by muse.distributed.checkpoint) has this
# DCP metadata file beside its shards; it may stand in for model.safetensors.
SHARDED_METADATA = ".metadata"
LATEST = "latest"
STEP_DIR_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(ckpt_dir: str | os.PathLike) -> int | None:
    """The step encoded in a step directory's name, or None for any other name."""
    m = STEP_DIR_RE.match(Path(ckpt_dir).name)
    return int(m.group(1)) if m else None


# --- hashing and the manifest itself ---------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    # Hashing is the whole cost of a full verify: sha256 runs at roughly 1-2 GB/s on one core, so a
    # 125M-parameter fp32 model (500 MB) costs well under a second and a 1B model a few seconds.
    # That is cheap next to loading the weights, and it is the only way to catch a flipped byte.
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def build_manifest(ckpt_dir: str | os.PathLike, step: int) -> dict:
    """The manifest for every regular file already in `ckpt_dir` (call it after all of them are written)."""
    ckpt_dir = Path(ckpt_dir)
    files = {}
    for p in sorted(ckpt_dir.iterdir()):
        if p.name == MANIFEST or not p.is_file():
            continue
        files[p.name] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return {"format_version": FORMAT_VERSION, "step": step, "files": files}


def read_manifest(ckpt_dir: str | os.PathLike) -> dict | None:
    """The parsed manifest, or None when there is none or it cannot be parsed (callers say which)."""
    try:
        with open(Path(ckpt_dir) / MANIFEST, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def _file_problem(ckpt_dir: Path, name: str, entry, fast: bool) -> str | None:
    """Why one manifest entry does not match the file on disk, or None when it does."""
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        return f"manifest.json lists an unexpected path {name!r}"
    if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or "sha256" not in entry:
        return f"manifest.json has a malformed entry for {name}"
    path = ckpt_dir / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{name}: {size} bytes, expected {entry['size']} (truncated or overwritten)"
    if not fast and file_sha256(path) != entry["sha256"]:
        return f"{name}: sha256 mismatch"
    return None


def find_problem(ckpt_dir: str | os.PathLike, *, fast: bool = False, only: str | None = None) -> str | None:
    """A short description of what is wrong with a checkpoint directory, or None when it verifies.

    `only` checks a single file's entry (after checking that the manifest exists), for loaders that
    read one file and do not want to hash the others.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return "it does not exist" if not ckpt_dir.exists() else "it is not a directory"
    if not (ckpt_dir / MANIFEST).exists():
        return "no manifest.json: the save did not finish, or muse did not write this directory"
    manifest = read_manifest(ckpt_dir)
    if manifest is None:
        return "manifest.json is unreadable"
    files = manifest["files"]
    if only is not None:
        if only not in files:
            return f"manifest.json does not list {only}"
        return _file_problem(ckpt_dir, only, files[only], fast)
    for name in REQUIRED_FILES:
        if name not in files and not (name == "model.safetensors" and SHARDED_METADATA in files):
            return f"manifest.json does not list {name}"
    for name, entry in files.items():
        problem = _file_problem(ckpt_dir, name, entry, fast)
        if problem:
            return problem
    return None


def corrupt_error(ckpt_dir: str | os.PathLike, problem: str, *, fast: bool = False) -> CheckpointError:
    """The CheckpointError for a bad checkpoint: what is wrong, and which checkpoint to use instead."""
    ckpt_dir = Path(ckpt_dir)
    kind = "incomplete" if problem.startswith("no manifest.json") else "corrupt"
    good = _last_good(ckpt_dir.parent, exclude=ckpt_dir.name, fast=fast) if step_of(ckpt_dir) is not None else None
    if good is not None:
        advice = f"the last good checkpoint is {good} - pass that path, or delete the bad one"
    elif step_of(ckpt_dir) is not None:
        advice = f"there is no good checkpoint beside it in {ckpt_dir.parent}; delete it and train again"
    else:
        advice = "re-create or re-download it"
    return CheckpointError(f"{ckpt_dir} is {kind} ({problem}); {advice}")


def verify_checkpoint(ckpt_dir: str | os.PathLike, *, fast: bool = False) -> None:
    """Raise CheckpointError unless every file in the manifest is present with the recorded size and sha256.

    fast=True compares sizes only (catches truncation and unfinished saves, not flipped bytes).
    """
    problem = find_problem(ckpt_dir, fast=fast)
    if problem is not None:
        raise corrupt_error(ckpt_dir, problem, fast=fast)


# --- stage directories: listing, `latest`, the last good checkpoint ---------------------------------


def list_checkpoints(stage_dir: str | os.PathLike) -> list[Path]:
    """Every `step_NNNNNN` directory in a stage directory, oldest step first (good or not)."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    found = []
    for p in stage_dir.iterdir():
        step = step_of(p)
        # `latest` is never listed (its name does not match); a symlinked step dir would be odd but fine.
        if step is not None and p.is_dir():
            found.append((step, p))
    return [p for _, p in sorted(found)]


def read_latest(stage_dir: str | os.PathLike) -> str | None:
    """The directory name `latest` points to: a symlink, or a one-line file where symlinks are unavailable."""
    link = Path(stage_dir) / LATEST
    if link.is_symlink():
        return Path(os.readlink(link)).name
    if link.is_file():
        try:
            return link.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None
    return None  # absent, or a copied directory (`cp -rL`): fall back to the newest step dir


def _last_good(stage_dir: Path, *, exclude: str | None = None, fast: bool = False) -> Path | None:
    for ckpt in reversed(list_checkpoints(stage_dir)):
        if ckpt.name != exclude and find_problem(ckpt, fast=fast) is None:
            return ckpt
    return None


def latest_good(stage_dir: str | os.PathLike, *, fast: bool = False) -> Path | None:
    """The checkpoint `latest` points to if it verifies, else the newest step directory that verifies."""
    stage_dir = Path(stage_dir)
    target = read_latest(stage_dir)
    if target and find_problem(stage_dir / target, fast=fast) is None:
        return stage_dir / target
    return _last_good(stage_dir, exclude=target, fast=fast)
