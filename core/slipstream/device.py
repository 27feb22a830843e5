"""What a device is: vendor, architecture and limits, the facts implementations are chosen by.

PyTorch calls both CUDA and ROCm devices ``"cuda"``; :func:`device_info` tells them apart
(``torch.version.hip``, ``gcnArchName``). Plugins describe device kinds core does not know
through the ``slipstream_detect_device`` hook.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field

import torch

VENDORS = ("nvidia", "amd", "intel", "apple", "cpu", "other")


@dataclass(frozen=True)
class DeviceInfo:
    """One device, as implementations see it.

    Attributes:
        vendor: one of :data:`VENDORS`.
        type: torch device type (``"cuda"`` for NVIDIA *and* ROCm, ``"xpu"``, ``"mps"``, ``"cpu"``).
        index: device ordinal (0 for the CPU).
        name: marketing name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        arch: ``"sm_90"``, ``"gfx942"``, ``"pvc"``/``"bmg"``, or the CPU's machine type.
        family: a coarser arch group a tuning space can key on (``"hopper"``, ``"cdna3"``, ``"rdna3"``).
        warp_size: threads per warp / wavefront / sub-group (32 NVIDIA and RDNA, 64 CDNA).
        memory_bytes: total device memory (host RAM for the CPU).
        compute_units: SMs / CUs / Xe cores / CPU threads.
        versions: runtime versions, e.g. ``{"torch": "2.11.0", "cuda": "13.0"}``.
    """

    vendor: str
    type: str
    index: int = 0
    name: str = ""
    arch: str = ""
    family: str = ""
    warp_size: int = 1
    memory_bytes: int = 0
    compute_units: int = 0
    versions: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type, self.index) if self.type != "cpu" else torch.device("cpu")

    @property
    def key(self) -> str:
        """Stable identity for caches: vendor, arch and name (not the ordinal)."""
        return f"{self.vendor}:{self.arch}:{self.name}"

    def describe(self) -> str:
        mem = f"{self.memory_bytes / 2**30:.1f} GiB" if self.memory_bytes else "? GiB"
        return (f"{self.type}:{self.index} {self.name or '?'} [{self.vendor}, {self.arch or '?'}"
                f"{', ' + self.family if self.family else ''}, warp {self.warp_size}, {self.compute_units} CUs, {mem}]")


NVIDIA_FAMILIES = {7: "volta", 8: "ampere", 9: "hopper", 10: "blackwell", 12: "blackwell"}


def nvidia_family(major: int, minor: int) -> str:
    if major == 8 and minor == 9:
        return "ada"
    if major == 7 and minor == 5:
        return "turing"
    return NVIDIA_FAMILIES.get(major, f"sm_{major}x")


AMD_FAMILIES = {
    "gfx908": "cdna1", "gfx90a": "cdna2", "gfx940": "cdna3", "gfx941": "cdna3", "gfx942": "cdna3",
    "gfx950": "cdna4", "gfx1100": "rdna3", "gfx1101": "rdna3", "gfx1102": "rdna3", "gfx1150": "rdna3",
    "gfx1151": "rdna3", "gfx1200": "rdna4", "gfx1201": "rdna4",
}


def amd_family(arch: str) -> str:
    """Map a gfx target (``"gfx942:sramecc+:xnack-"`` allowed) to its family name."""
    return AMD_FAMILIES.get(arch.split(":")[0], "amd-other")


def amd_wavefront(arch: str) -> int:
    """CDNA runs 64-wide wavefronts; RDNA 32-wide (its wave64 mode aside)."""
    return 32 if amd_family(arch).startswith("rdna") else 64


def _versions(**extra: str | None) -> dict[str, str]:
    out = {"torch": torch.__version__.split("+")[0]}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # triton is optional (macOS, Windows)
        pass
    out.update({k: v for k, v in extra.items() if v})
    return out


def _cuda_like(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    hip = getattr(torch.version, "hip", None)
    if hip:
        arch = getattr(props, "gcnArchName", "") or ""
        base = arch.split(":")[0]
        return DeviceInfo(
            vendor="amd", type="cuda", index=index, name=props.name, arch=base, family=amd_family(base),
            warp_size=getattr(props, "warp_size", amd_wavefront(base)), memory_bytes=props.total_memory,
            compute_units=props.multi_processor_count, versions=_versions(rocm=hip),
        )
    return DeviceInfo(
        vendor="nvidia", type="cuda", index=index, name=props.name, arch=f"sm_{props.major}{props.minor}",
        family=nvidia_family(props.major, props.minor), warp_size=getattr(props, "warp_size", 32),
        memory_bytes=props.total_memory, compute_units=props.multi_processor_count,
        versions=_versions(cuda=torch.version.cuda),
    )


def _xpu(index: int) -> DeviceInfo:
    props = torch.xpu.get_device_properties(index)
    name = getattr(props, "name", "Intel GPU")
    arch = intel_arch(name)
    return DeviceInfo(
        vendor="intel", type="xpu", index=index, name=name, arch=arch, family=arch,
        warp_size=max(getattr(props, "sub_group_sizes", [16]) or [16]), memory_bytes=getattr(props, "total_memory", 0),
        compute_units=getattr(props, "gpu_subslice_count", getattr(props, "max_compute_units", 0)),
        versions=_versions(xpu=getattr(torch.version, "xpu", None)),
    )


def intel_arch(name: str) -> str:
    """Coarse Intel GPU arch from its name: ``pvc`` (Data Center Max), ``bmg`` (Arc B), ``acm`` (Arc A)."""
    lowered = name.lower()
    if "max" in lowered or "pvc" in lowered or "data center" in lowered:
        return "pvc"
    if "b580" in lowered or "b570" in lowered or "battlemage" in lowered or "arc b" in lowered:
        return "bmg"
    if "arc" in lowered or "a770" in lowered or "a750" in lowered:
        return "acm"
    return "intel-gpu"


def cpu_info() -> DeviceInfo:
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return DeviceInfo(
        vendor="cpu", type="cpu", index=0, name=platform.processor() or platform.machine(),
        arch=platform.machine(), family=platform.machine(), warp_size=1, memory_bytes=mem,
        compute_units=torch.get_num_threads(), versions=_versions(),
    )


@functools.lru_cache(maxsize=64)
def device_info(device: torch.device | str) -> DeviceInfo:
    """Describe ``device`` (cached; a plugin's detector wins for device types core doesn't know)."""
    dev = torch.device(device)
    index = dev.index if dev.index is not None else 0
    if dev.type == "cpu":
        return cpu_info()
    if dev.type == "cuda":
        return _cuda_like(index if dev.index is not None else torch.cuda.current_device())
    if dev.type == "xpu":
        return _xpu(index)
    from slipstream.plugins import plugin_device_info

    found = plugin_device_info(dev)
    if found is not None:
        return found
    if dev.type == "mps":
        return DeviceInfo(vendor="apple", type="mps", name="Apple GPU", arch="mps", warp_size=32,
                          versions=_versions())
    return DeviceInfo(vendor="other", type=dev.type, index=index, name=dev.type, versions=_versions())


def available_devices() -> list[DeviceInfo]:
    """Every device this process can use: accelerators first, then the CPU."""
    found: list[DeviceInfo] = []
    if torch.cuda.is_available():
        found += [device_info(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += [device_info(torch.device("xpu", i)) for i in range(xpu.device_count())]
    from slipstream.plugins import plugin_detected_devices

    found += plugin_detected_devices()
    return [*found, cpu_info()]


def default_device() -> torch.device:
    """The first accelerator if there is one, else the CPU."""
    return available_devices()[0].torch_device
