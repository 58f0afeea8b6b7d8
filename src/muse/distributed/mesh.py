"""The process group and the 2-D device mesh (dp x tp), and the few collectives the trainer needs.

    mesh = init_distributed(device, dp=0, tp=2)    # None when WORLD_SIZE is 1: no process group at all
    dp_rank, dp_size = data_rank(mesh)              # which slice of the data this process reads
    all_reduce_sum(t, mesh, "dp")                   # in place; a no-op without a process group

World size, rank and the rendezvous come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT), nothing home-made. The mesh is (dp, tp) with tp innermost, so the processes of one
tensor-parallel group are neighbours on one node (tp's all-reduces are the chatty ones; they want NVLink).

Every helper here is a no-op (or the single-process answer) when torch.distributed is not initialised:
the trainer has one code path for 1 and N processes. What this module does not know: models, data,
optimizers (parallelize.py applies the mesh to a model).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as tdist

from muse.common import dist
from muse.common.device import dist_backend, set_device
from muse.common.errors import ConfigError

# How long a collective may wait for the other ranks before it fails. A crashed rank normally ends the
# job at once (torchrun's agent stops the others); this is the backstop for launchers that do not.
DEFAULT_TIMEOUT_S = 1800


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def resolve_mesh_shape(world: int, dp: int = 0, tp: int = 1) -> tuple[int, int]:
    """(dp, tp) for `world` processes: dp=0 means "whatever tp leaves"; a ConfigError unless dp*tp == world."""
    if tp < 1 or dp < 0:
        raise ConfigError(f"--tp must be >= 1 and --dp >= 0 (0 = derive it), got dp={dp}, tp={tp}")
    if world % tp:
        raise ConfigError(f"--tp {tp} does not divide the {world} processes; choose a --tp that divides --nproc")
    if dp == 0:
        dp = world // tp
    if dp * tp != world:
        raise ConfigError(f"--dp {dp} x --tp {tp} = {dp * tp}, but {world} processes were started; "
                          f"make dp x tp equal the number of processes (or leave --dp out)")
    return dp, tp


def init_distributed(device, dp: int = 0, tp: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Join the process group torchrun set up and build the (dp, tp) DeviceMesh; None for one process.

    Accelerators get their own backend for tensors on the device plus gloo for CPU tensors (DCP's and
    the loader's small CPU-side exchanges), e.g. "cuda:nccl,cpu:gloo".
    """
    world = dist.world_size()
    dp, tp = resolve_mesh_shape(world, dp, tp)
    if world == 1:
        return None
    device = torch.device(device)
    set_device(device)
    if not is_initialized():
        backend = dist_backend(device.type)
        if device.type != "cpu" and backend != "gloo":
            backend = f"{device.type}:{backend},cpu:gloo"
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))


def init_single_process_group(device) -> None:
    """A process group of one (rank 0 of 1) for code that needs one on a single device, e.g. FSDP2 in a
    benchmark. Uses a free local TCP port; torchrun's variables win when they are set."""
    if is_initialized():
        return
    import socket

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    device = torch.device(device)
    set_device(device)
    tdist.init_process_group(backend=dist_backend(device.type), rank=0, world_size=1)


def single_rank_mesh(device):
    """A 1 x 1 (dp, tp) mesh over a process group of one (see init_single_process_group)."""
    from torch.distributed.device_mesh import init_device_mesh

    init_single_process_group(device)
    return init_device_mesh(torch.device(device).type, (1, 1), mesh_dim_names=("dp", "tp"))


def shutdown() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def data_rank(mesh) -> tuple[int, int]:
    """(rank, size) of this process along the data-parallel dimension: the processes of one tensor-
    parallel group read the same batches, the dp groups read disjoint ones."""
    if mesh is None:
        return 0, 1
    return mesh.get_local_rank("dp"), mesh["dp"].size()


def _group(mesh, dim: str | None):
    if mesh is None or dim is None:
        return None  # the default (whole-world) group
    return mesh[dim].get_group()


def all_reduce_sum(t: torch.Tensor, mesh=None, dim: str | None = None) -> torch.Tensor:
    """Sum `t` in place over the processes of mesh dimension `dim` (all processes when None)."""
    if is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=_group(mesh, dim))
    return t


def all_reduce_mean(t: torch.Tensor, mesh=None, dim: str | None = None) -> torch.Tensor:
    """Average `t` in place over mesh dimension `dim` (gloo has no AVG: sum, then divide)."""
    if is_initialized():
        group = _group(mesh, dim)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=group)
        t.div_(tdist.get_world_size(group))
    return t


def any_rank(flag: bool, device) -> bool:
    """True on every process if `flag` is true on any (a decision every rank must take together)."""
    if not is_initialized():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every process (a small picklable value: a path, a decision)."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]
