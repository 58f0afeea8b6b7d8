"""Loading a bench/ script as a module in the bench tests (bench/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str, *, register: bool = False) -> ModuleType:
    """bench/<name>.py, executed as module `name`. register: put it in sys.modules first, under `name`
    (dataclasses, and bench scripts importing each other, look modules up by name); the caller pops it."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
