"""Starting N processes on this node through torchrun's machinery, and what happens when one fails.

`muse train RUN --nproc 8` calls `launch(8, ["train", RUN, ...])`: torch's elastic agent (the engine
behind `torchrun`) starts 8 copies of `python -m muse train RUN ...` with a standalone c10d rendezvous on
a free local port, exactly like `torchrun --standalone --nproc-per-node 8 -m muse train RUN ...`, which
is also what to type for several nodes (`torchrun --nnodes 4 --rdzv-backend c10d --rdzv-endpoint
HOST:PORT ...`); the trainer only reads the environment torchrun sets.

When a rank fails, it logs its error and writes it where torchrun's agent looks for it (the elastic error
file), then exits non-zero; the agent stops the other ranks at once (no rank waits forever in a
collective), and `launch` raises one `WorkerFailed` whose message is the failing rank's error. Under a
plain `torchrun`, torchrun prints the same error as the root cause.

Testing hook: MUSE_FAULT_AT_STEP=3 MUSE_FAULT_RANK=1 makes rank 1 raise just before training step 3
(`maybe_inject_fault`). It exists so that the failure path above has a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid

from muse.common import dist
from muse.common.errors import MuseError
from muse.common.logging import get_logger

log = get_logger(__name__)

FAULT_STEP_ENV = "MUSE_FAULT_AT_STEP"
FAULT_RANK_ENV = "MUSE_FAULT_RANK"
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # set by torch's elastic agent for each worker


class WorkerFailed(MuseError):
    """A rank of a multi-process run failed; the message is that rank's error."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code if exit_code in (1, 2) else 1


class PeerLost(MuseError):
    """A collective failed because another rank went away; that rank's own error is the root cause."""


# How the backends word "another process is gone" (gloo, NCCL, the TCP store).
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "remote worker", "broken pipe",
              "communicator was aborted", "nccl watchdog", "socket closed")


def is_peer_lost(exc: BaseException) -> bool:
    """True for the error a rank sees in a collective when another rank has died."""
    import torch.distributed as tdist

    network = getattr(tdist, "DistNetworkError", None)
    if network is not None and isinstance(exc, network):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(p in text for p in _PEER_LOST)


class InjectedFault(RuntimeError):
    """Raised by `maybe_inject_fault` (the testing hook); a stand-in for any crash inside a step."""


def maybe_inject_fault(step: int) -> None:
    """Raise InjectedFault on rank MUSE_FAULT_RANK (default 0) before step MUSE_FAULT_AT_STEP."""
    at = os.environ.get(FAULT_STEP_ENV)
    if not at or int(at) != step:
        return
    if dist.rank() == int(os.environ.get(FAULT_RANK_ENV, "0")):
        raise InjectedFault(f"injected fault before step {step} on rank {dist.rank()} ({FAULT_STEP_ENV}, a testing hook)")


def describe_failure(exc: BaseException) -> str:
    """One line: a MuseError's own message, or `Type: message` for anything else (a bug)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, MuseError) else f"{type(exc).__name__}: {text}"


def record_failure(exc: BaseException, step: int | None = None) -> BaseException:
    """Log this rank's failure and leave it in the elastic error file (for the launcher / torchrun).

    Returns the exception to raise: `exc` itself, or a one-line PeerLost when `exc` only says that
    another rank died (that rank records the real cause; a traceback here would bury it).
    """
    at = f" at step {step}" if step is not None else ""
    peer_lost = is_peer_lost(exc)
    if peer_lost:
        exc = PeerLost(f"rank {dist.rank()} lost contact with another rank{at}; that rank's error is the cause")
        line = str(exc)
    else:
        line = f"rank {dist.rank()} failed{at}: {describe_failure(exc)}"
    if not peer_lost:  # (a lost peer is said once, by the CLI's one-line error)
        log.error("%s", line)  # on the failing rank, whatever its rank: it is the one that knows why
    path = os.environ.get(ERROR_FILE_ENV)
    if path and not os.path.exists(path):
        try:
            with open(path, "w", encoding="utf-8") as f:
                # torch's elastic agent reads "message" and "timestamp" (whole seconds); the launcher
                # also reads "time" (to order failures within a second), "secondary" and "exit_code".
                json.dump({"message": line, "timestamp": int(time.time()), "time": time.time(),
                           "secondary": peer_lost, "exit_code": getattr(exc, "exit_code", 1)}, f)
        except OSError:
            pass  # the log line above still says it
    return exc


def _root_cause(e) -> tuple[str, int]:
    """(message, exit code) of the failure that started it: the earliest recorded one that is not a
    rank losing its peers; a rank that died without a record (a signal, a hard crash) otherwise."""
    found = []
    for rank, failure in e.failures.items():
        record = {}
        try:
            with open(failure.error_file, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError, TypeError):
            pass
        message = record.get("message") if isinstance(record.get("message"), str) else None
        if message is None:
            message = f"rank {rank} exited with code {failure.exitcode}"
            if failure.exitcode < 0:
                message += f" ({failure.signal_name()})"
            message += "; its error is in the log above"
        rank_order = (bool(record.get("secondary")), not record, float(record.get("time", failure.timestamp)), rank)
        found.append((rank_order, message, int(record.get("exit_code", failure.exitcode))))
    _, message, code = min(found)
    return message, code


def _quiet_elastic_loggers() -> dict[str, int]:
    """The agent logs each stopped worker at ERROR; our one line replaces those. Returns the old levels."""
    old = {}
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
            old[name] = logger.level
            logger.setLevel(logging.CRITICAL)
    return old


def launch(nproc: int, argv: list[str], *, monitor_interval: float = 0.1) -> None:
    """Run `python -m muse *argv` in `nproc` processes on this node; raise WorkerFailed if any fails."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise MuseError(f"--nproc must be >= 1, got {nproc}")
    if "OMP_NUM_THREADS" not in os.environ:
        # As torchrun does, but sharing the cores instead of 1 thread each: CPU runs stay usable.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=monitor_interval,
    )
    old_levels = _quiet_elastic_loggers()
    try:
        elastic_launch(config, sys.executable)("-m", "muse", *argv)
    except ChildFailedError as e:
        message, code = _root_cause(e)
        others = " (the other ranks were stopped)" if nproc > 1 else ""
        raise WorkerFailed(f"{message}{others}", exit_code=code) from None
    except SignalException as e:
        raise KeyboardInterrupt from e
    finally:
        for name, level in old_levels.items():
            logging.getLogger(name).setLevel(level)


def rebuild_argv(add_arguments, args: argparse.Namespace) -> list[str]:
    """The command line that produced `args` (for the worker processes `launch` starts), rebuilt from the
    verb's own `add_arguments`: every flag that differs from its default, in the parser's order."""
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    out: list[str] = []
    for action in p._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings:
            out.append(str(value))
        elif isinstance(action, argparse.BooleanOptionalAction):
            if value is not None and value != action.default:
                out.append(action.option_strings[0 if value else 1])  # --compile / --no-compile
        elif value is None or value is False or value == action.default:
            continue
        elif isinstance(action, argparse._StoreTrueAction):
            out.append(action.option_strings[0])
        elif isinstance(action, argparse._AppendAction):
            for v in value:
                out += [action.option_strings[0], str(v)]
        else:
            out += [action.option_strings[0], str(value)]
    return out


def train_or_launch(loop, cfg, verb: str, add_arguments, args):
    """Train `loop` in this process, or, with --nproc N outside torchrun, start N workers running `muse VERB`
    with the same flags. The TrainResult on the main rank; None on other ranks and in the launcher."""
    if cfg.parallel.nproc > 1 and "WORLD_SIZE" not in os.environ:
        loop.check(world_size=cfg.parallel.nproc)
        launch(cfg.parallel.nproc, [verb, *rebuild_argv(add_arguments, args)])
        return None
    result = loop.train()
    return result if dist.is_main() else None
