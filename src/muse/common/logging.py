"""Logging and progress bars: both go to stderr so stdout stays for results (and `--json`).

Only rank 0 shows progress; other ranks stay quiet. Set MUSE_LOG_LEVEL=DEBUG for more detail and
MUSE_NO_PROGRESS=1 to turn progress bars off (they are also off when stderr is not a terminal,
unless MUSE_PROGRESS=1).
"""

from __future__ import annotations

import logging
import os
import sys

from muse.common import dist

_CONFIGURED = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is *now* (pytest's capture and redirections swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def get_logger(name: str = "muse") -> logging.Logger:
    global _CONFIGURED
    if not _CONFIGURED:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root = logging.getLogger("muse")
        root.addHandler(handler)
        root.setLevel(os.environ.get("MUSE_LOG_LEVEL", "INFO" if dist.is_main() else "WARNING").upper())
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name)


def progress_enabled() -> bool:
    if os.environ.get("MUSE_NO_PROGRESS"):
        return False
    if not dist.is_main():
        return False
    return bool(os.environ.get("MUSE_PROGRESS")) or sys.stderr.isatty()


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", **kw):
    """A tqdm bar on stderr that only draws for steps longer than a second (mininterval/delay)."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not progress_enabled(),
        delay=1.0,
        dynamic_ncols=True,
        **kw,
    )
