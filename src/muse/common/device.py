"""Which accelerator to run on, which dtype and collective backend go with it, and how fast it is.

`pick_device("auto")` prefers cuda, then xpu, then mps, then an out-of-tree PrivateUse1 backend that
has been registered with PyTorch (how in-house chips plug in), else cpu. `--device` overrides.

The peak table holds dense (no 2:4 sparsity) bf16 tensor-core FLOP/s and HBM bandwidth from the vendors'
data sheets; MFU is model FLOPs divided by this peak. Unknown chips report no MFU unless `--peak-flops`
is given. On CPU there is no honest peak, so Muse reports achieved FLOP/s instead.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cuda", "cpu", "mps", "xpu" or the PrivateUse1 backend's name
    name: str  # human-readable, e.g. "NVIDIA H100 80GB HBM3"
    peak_flops: float | None  # dense bf16 FLOP/s, None when unknown (cpu, unlisted chips)
    peak_bandwidth: float | None  # bytes/s
    dist_backend: str  # "nccl", "xccl", "gloo", ...
    autocast_dtype: str | None  # "bfloat16" on accelerators, None (fp32) on cpu


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


def pick_device(requested: str = "auto"):
    """A torch.device for `requested` ("auto", "cpu", "cuda", "cuda:1", "mps", ...), or a UsageError."""
    import torch

    found = available_types()
    if requested in (None, "", "auto"):
        return torch.device(found[0])
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"--device {requested!r} is not a device PyTorch knows; available here: {', '.join(found)}") from None
    if dev.type not in found:
        raise UsageError(f"--device {requested!r} is not available on this machine; available: {', '.join(found)}")
    return dev


def lookup_peak(name: str) -> tuple[float | None, float | None]:
    low = name.lower()
    for frag, flops, bw in PEAKS:
        if frag.lower() in low:
            return flops, bw
    return None, None


def device_info(device, peak_flops: float | None = None) -> DeviceInfo:
    """Facts about `device`; `peak_flops` (from --peak-flops) overrides the table."""
    import torch

    device = torch.device(device)
    t = device.type
    if t == "cuda":
        name = torch.cuda.get_device_name(device)
        backend = "nccl"
    elif t == "xpu":
        name = torch.xpu.get_device_name(device)
        backend = "xccl"
    elif t == "cpu":
        import platform

        name = platform.processor() or platform.machine() or "cpu"
        backend = "gloo"
    else:
        name = t
        backend = {"mps": "gloo"}.get(t, "gloo")
    flops, bw = (None, None) if t == "cpu" else lookup_peak(name)
    if peak_flops:
        flops = float(peak_flops)
    autocast = None if t == "cpu" else "bfloat16"
    return DeviceInfo(type=t, name=name, peak_flops=flops, peak_bandwidth=bw, dist_backend=backend, autocast_dtype=autocast)


def synchronize(device) -> None:
    """Wait for queued work on `device` (for honest timings); a no-op on cpu."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
