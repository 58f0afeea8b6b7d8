"""The errors users can cause, and nothing else.

Every `MuseError` carries a message that says what went wrong *and what to do about it*. The CLI prints
it as one line on stderr and exits with code 2; any other exception is a bug (traceback, exit 1).
Library callers catch the subclass they care about.
"""

from __future__ import annotations


class MuseError(Exception):
    """Base class: a problem with the user's input, flags, data or environment."""

    exit_code = 2


class UsageError(MuseError):
    """A bad flag, a bad combination of flags, or a bad config value."""


class ConfigError(UsageError):
    """A config file or `--set key=value` override that does not make sense."""


class DataError(MuseError):
    """A corpus, shard or dataset file that cannot be used (empty, binary, malformed)."""


class TokenizerError(MuseError):
    """A tokenizer file or setting that cannot be used."""


class CheckpointError(MuseError):
    """A checkpoint that is missing, truncated, corrupt, or does not match what was asked for."""


class OutputExistsError(MuseError):
    """An output directory already holds something else; pass --force to replace it."""


class ResourceError(MuseError):
    """Out of memory or another resource limit; the message names the knob to lower."""


class TrainingDiverged(MuseError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


def closest(name: str, choices, n: int = 3) -> str:
    """' Did you mean: a, b?' for the closest valid names, or '' when nothing is close."""
    import difflib

    matches = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(matches)}?" if matches else ""
