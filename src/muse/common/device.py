"""Which accelerator to run on, which dtypes and collective backend go with it, and how fast it is.

`pick_device("auto")` prefers cuda, then xpu, then mps, then an out-of-tree PrivateUse1 backend that
has been registered with PyTorch (how in-house chips plug in, e.g. `torch_npu`), else cpu. `--device`
overrides. Under torchrun each process takes the accelerator of its LOCAL_RANK (`local_rank=`).

`dist_backend(type)` is the torch.distributed backend for collectives on that device: nccl (cuda), xccl
(xpu), gloo (cpu, mps), or whatever backend a PrivateUse1 plugin registered for its device type
(`torch.distributed.Backend.register_backend(..., devices=[name])`, e.g. hccl for npu).

`dtype_policy(device, requested)` says which dtype the weights are kept in (fp32: the optimizer's master
copy), which one the matmuls run in (bf16 where the device has bf16 autocast, else fp32), which one
gradients are reduced in across processes (fp32, so that averaging over many ranks loses nothing), and
why (`reason`, for the run's log and report). On CPU, `auto` is bf16 autocast only where the CPU
multiplies bf16 in hardware (`cpu_has_native_bf16`: AVX512-BF16 or AMX); elsewhere bf16 is emulated and
slower than fp32.

The peak table holds dense (no 2:4 sparsity) bf16 tensor-core FLOP/s and HBM bandwidth from the vendors'
data sheets; MFU is model FLOPs divided by this peak. Unknown chips report no MFU unless `--peak-flops`
is given. On CPU there is no honest peak, so Muse reports achieved FLOP/s instead.

What it does not know: models, process groups, meshes (muse.distributed builds those from the answers here).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

from muse.common.errors import UsageError

# name fragment (matched case-insensitively against torch's device name) -> (bf16 dense FLOP/s, bytes/s)
# Order matters: the first fragment found in the name wins, so longer/more specific names go first.
PEAKS: list[tuple[str, float, float]] = [
    ("GH200", 989e12, 4.0e12),
    ("H200", 989e12, 4.8e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),  # SXM
    ("H800", 989e12, 3.35e12),
    ("H20", 148e12, 4.0e12),
    ("GB200", 2.5e15, 8.0e12),
    ("B200", 2.25e15, 8.0e12),
    ("A100", 312e12, 2.0e12),
    ("A800", 312e12, 2.0e12),
    ("L40S", 362e12, 0.864e12),
    ("L4", 121e12, 0.3e12),
    ("A10G", 70e12, 0.6e12),
    ("A10", 125e12, 0.6e12),
    ("RTX 4090", 165e12, 1.0e12),
    ("RTX 3090", 71e12, 0.936e12),
    ("V100", 125e12, 0.9e12),  # fp16; V100 has no bf16
    ("MI355X", 2.5e15, 8.0e12),
    ("MI325X", 1.307e15, 6.0e12),
    ("MI300X", 1.307e15, 5.3e12),
    ("MI250X", 383e12, 3.2e12),
    ("Max 1550", 838e12, 3.2e12),  # Intel Data Center GPU Max
]

# Collective backends of the in-tree device types; PrivateUse1 plugins are looked up in torch's registry.
_DIST_BACKENDS = {"cuda": "nccl", "xpu": "xccl", "cpu": "gloo", "mps": "gloo"}
DTYPES = ("auto", "float32", "bfloat16")
# x86 /proc/cpuinfo flags of a native bf16 dot product (AVX512-BF16) or bf16 tiles (AMX), for a torch
# without its feature probes. ARM's bf16 (BFMMLA, Apple M2+, Graviton3) is not counted: not measured.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class DtypePolicy:
    """Dtype names (strings, so the policy prints and serialises as plain data)."""

    param: str  # weights and optimizer state: "float32"
    compute: str  # matmuls (autocast / FSDP's param_dtype): "bfloat16" or "float32"
    reduce: str  # gradient reductions across processes: "float32"
    reason: str = ""  # why compute is what it is, for the run's log and report

    def describe(self) -> str:
        """One line for logs and reports, e.g. 'bfloat16 autocast (auto: CPU with native bf16 matmul)'."""
        what = f"{self.compute} autocast" if self.mixed else self.compute
        return f"{what} ({self.reason})" if self.reason else what

    @property
    def mixed(self) -> bool:
        return self.compute != self.param


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cuda", "cpu", "mps", "xpu" or the PrivateUse1 backend's name
    name: str  # human-readable, e.g. "NVIDIA H100 80GB HBM3"
    peak_flops: float | None  # dense bf16 FLOP/s, None when unknown (cpu, unlisted chips)
    peak_bandwidth: float | None  # bytes/s
    dist_backend: str  # "nccl", "xccl", "gloo", ...
    autocast_dtype: str | None  # "bfloat16" where the device autocasts to bf16, None (fp32) otherwise


def _privateuse1_name() -> str | None:
    import torch

    name = torch._C._get_privateuse1_backend_name()
    if name == "privateuseone":
        return None  # nothing registered
    mod = getattr(torch, name, None)
    if mod is not None and getattr(mod, "is_available", lambda: False)():
        return name
    return None


def available_types() -> list[str]:
    import torch

    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        found.append("xpu")
    if torch.backends.mps.is_available():
        found.append("mps")
    pu1 = _privateuse1_name()
    if pu1:
        found.append(pu1)
    found.append("cpu")
    return found


def pick_device(requested: str = "auto", *, local_rank: int | None = None):
    """A torch.device for `requested` ("auto", "cpu", "cuda", "cuda:1", "mps", ...), or a UsageError.

    `local_rank` (from torchrun's LOCAL_RANK) gives an accelerator without an explicit index the index of
    this process on its node, so the 8 processes of a node get cuda:0 .. cuda:7. mps has one device.
    """
    import torch

    found = available_types()
    if requested in (None, "", "auto"):
        dev = torch.device(found[0])
    else:
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise UsageError(f"--device {requested!r} is not a device PyTorch knows; available here: {', '.join(found)}") from None
        if dev.type not in found:
            raise UsageError(f"--device {requested!r} is not available on this machine; available: {', '.join(found)}")
    if local_rank is not None and dev.index is None and dev.type not in ("cpu", "mps"):
        count = device_count(dev.type)
        if count and local_rank >= count:
            raise UsageError(
                f"process {local_rank} on this node has no {dev.type} device ({count} visible); start at most "
                f"{count} processes per node (--nproc / --nproc-per-node)"
            )
        dev = torch.device(dev.type, local_rank)
    return dev


def device_count(device_type: str) -> int:
    """How many devices of `device_type` this process sees (0 when unknown)."""
    import torch

    if device_type == "cpu":
        return 1
    mod = getattr(torch, device_type, None)
    return int(getattr(mod, "device_count", lambda: 0)())


def set_device(device) -> None:
    """Make `device` this process's current device (NCCL and friends pick their GPU from it)."""
    import torch

    device = torch.device(device)
    if device.type in ("cpu", "mps") or device.index is None:
        return
    mod = getattr(torch, device.type, None)
    if mod is not None and hasattr(mod, "set_device"):
        mod.set_device(device)


def dist_backend(device_type: str) -> str:
    """The torch.distributed backend for collectives on `device_type`; gloo when none is known."""
    if device_type in _DIST_BACKENDS:
        return _DIST_BACKENDS[device_type]
    try:  # a PrivateUse1 plugin registers its backend for its device type
        import torch.distributed as tdist

        return tdist.Backend.default_device_backend_map.get(device_type, "gloo")
    except (ImportError, AttributeError):
        return "gloo"


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """True when a /proc/cpuinfo text lists a native bf16 flag (CPU_BF16_FLAGS) on its `flags` lines."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and any(f in value.split() for f in CPU_BF16_FLAGS):
            return True
    return False


def _torch_cpu_probes() -> bool | None:
    """torch.cpu's feature probes (private, hence the guards): True/False, None where torch has none."""
    import torch

    answers = []
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is None:
            continue
        try:
            answers.append(bool(fn()))
        except RuntimeError:
            continue
    return any(answers) if answers else None


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX tiles).

    There oneDNN runs a bf16 matmul at ~2.3x the fp32 rate (a 2-vCPU AMD EPYC with AVX512-BF16: ~210
    vs ~90 GFLOP/s per core); elsewhere bf16 is emulated and slower than fp32.
    `torch.backends.cpu.get_cpu_capability()` says only "AVX512" on such a CPU, so ask torch.cpu's
    probes; a torch without them falls back to /proc/cpuinfo (Linux x86). Anything else (macOS, ARM,
    Windows without the probes) answers False: fp32 is the safe default there.
    """
    found = _torch_cpu_probes()
    if found is not None:
        return found
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return cpuinfo_has_bf16(f.read())
    except OSError:
        return False


def _has_bf16_autocast(device) -> bool:
    import torch

    t = device.type
    if t == "cpu":
        # bf16 autocast pays only where bf16 is multiplied in hardware; measured to keep the loss curve
        # (val bpb within 1% of fp32 over the speedrun, BENCHMARKS.md section 6)
        return cpu_has_native_bf16()
    if t == "cuda":
        return torch.cuda.is_bf16_supported()  # V100 and older: no bf16 tensor cores
    check = getattr(torch.amp, "is_autocast_available", None)
    return bool(check(t)) if check is not None else t in ("xpu", "mps")


def dtype_policy(device, requested: str = "auto") -> DtypePolicy:
    """The dtypes for training on `device`; `requested` is --dtype: auto, float32 or bfloat16.

    Weights stay fp32 in every case: bf16 is a compute dtype (autocast, FSDP's param_dtype), and the
    fp32 master weights are what the optimizer updates, so small updates are not rounded away.
    """
    import torch

    device = torch.device(device)
    if requested not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    if requested == "bfloat16" and device.type == "cpu":
        compute, reason = "bfloat16", "--dtype bfloat16"  # allowed everywhere (CPU autocast has bf16)
        if not cpu_has_native_bf16():
            reason += "; this CPU has no native bf16 matmul, fp32 is likely faster"
    elif requested == "bfloat16" and not _has_bf16_autocast(device):
        raise UsageError(f"--dtype bfloat16: {device.type} has no bf16 autocast here; use --dtype float32")
    elif requested == "auto":
        compute = "bfloat16" if _has_bf16_autocast(device) else "float32"
        reason = "auto: " + _auto_reason(device, compute)
    else:
        compute, reason = requested, f"--dtype {requested}"
    return DtypePolicy(param="float32", compute=compute, reduce="float32", reason=reason)


def _auto_reason(device, compute: str) -> str:
    if device.type == "cpu":
        return ("CPU with native bf16 matmul (AVX512-BF16/AMX)" if compute == "bfloat16"
                else "CPU without native bf16 matmul")
    return f"{device.type} has bf16 autocast" if compute == "bfloat16" else f"{device.type} has no bf16 autocast"


def lookup_peak(name: str) -> tuple[float | None, float | None]:
    low = name.lower()
    for frag, flops, bw in PEAKS:
        if frag.lower() in low:
            return flops, bw
    return None, None


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    t = device.type
    if t in ("cuda", "xpu"):
        return getattr(torch, t).get_device_name(device)
    if t == "cpu":
        import platform

        return platform.processor() or platform.machine() or "cpu"
    mod = getattr(torch, t, None)  # PrivateUse1 plugins usually mirror torch.cuda's API
    get_name = getattr(mod, "get_device_name", None)
    if get_name is not None:
        try:
            return str(get_name(device.index or 0))
        except Exception:  # a plugin without a real name lookup: the type is all we know
            pass
    return t


def device_info(device, peak_flops: float | None = None) -> DeviceInfo:
    """Facts about `device`; `peak_flops` (from --peak-flops) overrides the table."""
    import torch

    device = torch.device(device)
    t = device.type
    name = device_name(device)
    flops, bw = (None, None) if t == "cpu" else lookup_peak(name)
    if peak_flops:
        flops = float(peak_flops)
    autocast = "bfloat16" if _has_bf16_autocast(device) else None
    return DeviceInfo(type=t, name=name, peak_flops=flops, peak_bandwidth=bw, dist_backend=dist_backend(t),
                      autocast_dtype=autocast)


def synchronize(device) -> None:
    """Wait for queued work on `device` (for honest timings); a no-op on cpu."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return
    mod = getattr(torch, device.type, None)
    sync = getattr(mod, "synchronize", None)
    if sync is None:
        return
    if device.type == "mps":
        sync()
    else:
        sync(device)
