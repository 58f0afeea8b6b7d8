"""Device discovery, collective backends, dtype policies and the peak table (no accelerator needed)."""

from __future__ import annotations

import types

import pytest
import torch

from muse.common import device as dev
from muse.common.errors import UsageError


def test_cpu_is_always_there_and_auto_falls_back_to_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert dev.available_types()[-1] == "cpu"
    assert dev.pick_device("auto") == torch.device("cpu")
    assert dev.pick_device("cpu", local_rank=3) == torch.device("cpu")  # no per-rank index on cpu


def test_unavailable_or_unknown_device_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="not available on this machine"):
        dev.pick_device("cuda")
    with pytest.raises(UsageError, match="not a device PyTorch knows"):
        dev.pick_device("warp-drive")


def test_local_rank_picks_the_process_device(monkeypatch):
    monkeypatch.setattr(dev, "available_types", lambda: ["cuda", "cpu"])
    monkeypatch.setattr(dev, "device_count", lambda t: 8)
    assert dev.pick_device("auto", local_rank=5) == torch.device("cuda", 5)
    assert dev.pick_device("cuda:2", local_rank=5) == torch.device("cuda", 2)  # an explicit index wins
    with pytest.raises(UsageError, match="at most 8 processes per node"):
        dev.pick_device("cuda", local_rank=8)


def test_privateuse1_backend_is_found_with_its_collective(monkeypatch):
    """An out-of-tree chip registered as PrivateUse1 (as torch_npu does) is picked before cpu, and the
    collective backend its plugin registered for that device type is used."""
    import torch.distributed as tdist

    monkeypatch.setattr(torch._C, "_get_privateuse1_backend_name", lambda: "fakechip")
    monkeypatch.setattr(torch, "fakechip", types.SimpleNamespace(is_available=lambda: True), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert "fakechip" in dev.available_types() and dev.available_types()[-1] == "cpu"
    monkeypatch.setitem(tdist.Backend.default_device_backend_map, "fakechip", "fakeccl")
    assert dev.dist_backend("fakechip") == "fakeccl"
    assert dev.dist_backend("otherchip") == "gloo"  # nothing registered: the portable fallback


def test_nothing_registered_means_no_privateuse1_device():
    assert torch._C._get_privateuse1_backend_name() == "privateuseone"
    assert dev._privateuse1_name() is None


@pytest.mark.parametrize("device_type,backend", [("cuda", "nccl"), ("xpu", "xccl"), ("cpu", "gloo"), ("mps", "gloo")])
def test_collective_backend_per_device(device_type, backend):
    assert dev.dist_backend(device_type) == backend


def test_dtype_policy(monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    cpu = dev.dtype_policy("cpu")
    assert (cpu.param, cpu.compute, cpu.reduce, cpu.mixed) == ("float32", "float32", "float32", False)
    assert dev.dtype_policy("cpu", "bfloat16").compute == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = dev.dtype_policy(torch.device("cuda"))
    assert (gpu.param, gpu.compute, gpu.reduce, gpu.mixed) == ("float32", "bfloat16", "float32", True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # V100 and older
    assert dev.dtype_policy(torch.device("cuda")).compute == "float32"
    with pytest.raises(UsageError, match="bf16"):
        dev.dtype_policy(torch.device("cuda"), "bfloat16")
    with pytest.raises(UsageError, match="--dtype"):
        dev.dtype_policy("cpu", "float16")


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch, native):
    """auto = bf16 autocast exactly where the CPU multiplies bf16 in hardware; the reason says so."""
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    auto = dev.dtype_policy("cpu")
    assert auto.compute == ("bfloat16" if native else "float32") and auto.param == auto.reduce == "float32"
    assert auto.mixed is native
    assert auto.reason == ("auto: CPU with native bf16 matmul (AVX512-BF16/AMX)" if native
                           else "auto: CPU without native bf16 matmul")
    assert auto.describe().startswith("bfloat16 autocast (auto: " if native else "float32 (auto: ")
    assert dev.device_info("cpu").autocast_dtype == ("bfloat16" if native else None)
    pinned = dev.dtype_policy("cpu", "float32")  # what the golden-curve and resume tests ask for
    assert (pinned.compute, pinned.reason) == ("float32", "--dtype float32")
    forced = dev.dtype_policy("cpu", "bfloat16")
    assert forced.compute == "bfloat16" and ("no native bf16" in forced.reason) is not native


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme avx512f avx512_vnni {extra} avx512_vpopcntdq
bugs\t\t: sysret_ss_attrs avx512_bf16_lookalike
"""


@pytest.mark.parametrize("extra,want", [("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx2", False)])
def test_cpuinfo_flags(extra, want):
    assert dev.cpuinfo_has_bf16(CPUINFO.format(extra=extra)) is want
    assert dev.cpuinfo_has_bf16("") is False


def test_native_bf16_detection(monkeypatch, tmp_path):
    """torch's probes win when present; without them Linux x86 reads /proc/cpuinfo and every other
    platform (macOS, ARM) says no."""
    import builtins

    real_open = builtins.open
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(extra="avx512_bf16"))
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k))

    def answer(probes, system="Linux", machine="x86_64"):
        monkeypatch.setattr(dev, "_torch_cpu_probes", lambda: probes)
        monkeypatch.setattr(dev.platform, "system", lambda: system)
        monkeypatch.setattr(dev.platform, "machine", lambda: machine)
        dev.cpu_has_native_bf16.cache_clear()
        try:
            return dev.cpu_has_native_bf16()
        finally:
            dev.cpu_has_native_bf16.cache_clear()

    assert answer(True) is True and answer(False) is False  # the probes' word is final
    assert answer(None) is True  # no probes: the flags
    assert answer(None, "Darwin", "arm64") is False
    assert answer(None, "Linux", "aarch64") is False
    cpuinfo.write_text(CPUINFO.format(extra="avx2"))
    assert answer(None) is False


def test_torch_probes_answer_plainly():
    assert dev._torch_cpu_probes() in (True, False, None)


@pytest.mark.parametrize("name,flops", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA B200", 2.25e15),
    ("NVIDIA GB200", 2.5e15),
    ("AMD Instinct MI300X", 1.307e15),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12),
])
def test_peak_table(name, flops):
    peak, bandwidth = dev.lookup_peak(name)
    assert peak == flops and bandwidth > 1e11


def test_peak_table_order_puts_specific_names_first():
    names = [frag.lower() for frag, _, _ in dev.PEAKS]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert a not in b, f"{a!r} comes before {b!r} and would shadow it"


def test_device_info_cpu_and_peak_override(monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    info = dev.device_info("cpu")
    assert info.type == "cpu" and info.peak_flops is None and info.dist_backend == "gloo"
    assert info.autocast_dtype is None
    assert dev.device_info("cpu", peak_flops=1e12).peak_flops == 1e12
    assert dev.lookup_peak("Some Future Chip") == (None, None)
    dev.synchronize("cpu")  # a no-op, but it must not fail
