"""Rank and world size from the environment torchrun sets, with safe single-process defaults.

Collectives elsewhere become no-ops when `torch.distributed` is not initialised, so the same code runs
on 1 and N processes. This module must import without torch.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0
