"""muse.distributed: running one training job on many devices with torch.distributed, nothing home-made.

    mesh.py         process group from torchrun's environment, the (dp, tp) DeviceMesh, no-op collectives
    parallelize.py  ParallelConfig and parallelize(model, mesh, cfg): TP -> activation checkpointing ->
                    compile -> FSDP2 / DDP, applied from outside the model (the order is explained there)
    checkpoint.py   sharded (DCP) saves, resume at any world size, conversion to the single-device format
    launch.py       `muse train --nproc N` through torch's elastic agent; rank failures; the fault hook

docs/distributed.md says what is supported and tested.
"""

from muse.distributed.mesh import data_rank, init_distributed, resolve_mesh_shape, shutdown
from muse.distributed.parallelize import ParallelConfig, check_supported, grad_sync, parallelize

__all__ = [
    "ParallelConfig",
    "check_supported",
    "data_rank",
    "grad_sync",
    "init_distributed",
    "parallelize",
    "resolve_mesh_shape",
    "shutdown",
]
