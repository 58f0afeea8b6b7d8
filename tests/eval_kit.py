"""Shared pieces of the tests that kill a run that writes to the eval response cache and resume it."""

from __future__ import annotations

from muse.eval.cache import ResponseCache


class Killed(Exception):
    pass


class DyingCache(ResponseCache):
    """Dies (like a killed process) right after storing its `after`-th response."""

    def __init__(self, path, after):
        super().__init__(path)
        self.after = after

    def put(self, *args):
        super().put(*args)
        if self.writes >= self.after:
            raise Killed()
