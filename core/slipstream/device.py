"""What a device is: vendor, architecture and limits, the facts implementations are chosen by.

PyTorch calls both CUDA and ROCm devices ``"cuda"``; :func:`device_info` tells them apart
(``torch.version.hip``, ``gcnArchName``). Plugins describe device kinds core does not know
through the ``slipstream_detect_device`` hook.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
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
        family = f", {self.family}" if self.family else ""
        return (f"{self.type}:{self.index} {self.name or '?'} [{self.vendor}, {self.arch or '?'}{family}, "
                f"warp {self.warp_size}, {self.compute_units} CUs, {mem}]")


NVIDIA_FAMILIES = {7: "volta", 8: "ampere", 9: "hopper", 10: "blackwell", 12: "blackwell"}


def nvidia_family(major: int, minor: int) -> str:
    if major == 8 and minor == 9:
        return "ada"
    if major == 7 and minor == 5:
        return "turing"
    return NVIDIA_FAMILIES.get(major, f"sm_{major}x")


AMD_FAMILIES = {
    "gfx906": "gcn5", "gfx908": "cdna1", "gfx90a": "cdna2", "gfx940": "cdna3", "gfx941": "cdna3",
    "gfx942": "cdna3", "gfx950": "cdna4",
    "gfx1010": "rdna1", "gfx1011": "rdna1", "gfx1012": "rdna1",
    "gfx1030": "rdna2", "gfx1031": "rdna2", "gfx1032": "rdna2", "gfx1034": "rdna2", "gfx1035": "rdna2",
    "gfx1036": "rdna2",
    "gfx1100": "rdna3", "gfx1101": "rdna3", "gfx1102": "rdna3", "gfx1103": "rdna3",
    "gfx1150": "rdna3", "gfx1151": "rdna3", "gfx1152": "rdna3", "gfx1153": "rdna3",
    "gfx1200": "rdna4", "gfx1201": "rdna4",
}
"""gfx target -> family. CDNA (Instinct) runs 64-wide wavefronts, RDNA (Radeon) 32-wide; gfx115x
(RDNA 3.5 APUs) tunes like RDNA3."""


def _gfx_base(arch: str) -> str:
    """``"gfx942:sramecc+:xnack-"`` -> ``"gfx942"`` (feature suffixes dropped, lower case)."""
    return arch.split(":")[0].strip().lower()


def amd_family(arch: str) -> str:
    """Map a gfx target (``"gfx942:sramecc+:xnack-"`` allowed) to its family name."""
    base = _gfx_base(arch)
    if base in AMD_FAMILIES:
        return AMD_FAMILIES[base]
    major = _gfx_major(base)
    if major is not None and major >= 10:
        return f"rdna-gfx{major}"
    return "amd-other"


def _gfx_major(base: str) -> int | None:
    """The gfx major version (``9`` for gfx90a/gfx942, ``11`` for gfx1100), ``None`` if unparsable.

    Same rule as Triton's AMD backend: the last two characters are minor and stepping."""
    digits = base[3:] if base.startswith("gfx") else ""
    if len(digits) < 3:
        return None
    try:
        return int(digits[:-2])
    except ValueError:
        return None


def amd_wavefront(arch: str) -> int:
    """CDNA/GCN (gfx9 and older) run 64-wide wavefronts; RDNA (gfx10+) 32-wide (its wave64 mode aside).

    Decided by the gfx major version, so targets missing from :data:`AMD_FAMILIES` still get the
    right width (Triton's AMD backend uses the same rule)."""
    major = _gfx_major(_gfx_base(arch))
    if major is None:
        return 32 if amd_family(arch).startswith("rdna") else 64
    return 32 if major >= 10 else 64


def amd_device_info(props: object, index: int = 0, hip: str | None = None) -> DeviceInfo:
    """A ROCm device from ``torch.cuda.get_device_properties`` (``gcnArchName``, ``name``, ...).

    ``warp_size`` comes from the properties where PyTorch reports it, else from the arch."""
    arch = getattr(props, "gcnArchName", "") or ""
    base = _gfx_base(arch)
    name = getattr(props, "name", "") or f"AMD GPU {base}".strip()
    warp = getattr(props, "warp_size", None) or amd_wavefront(base)
    return DeviceInfo(
        vendor="amd", type="cuda", index=index, name=name, arch=base, family=amd_family(base),
        warp_size=int(warp), memory_bytes=int(getattr(props, "total_memory", 0) or 0),
        compute_units=int(getattr(props, "multi_processor_count", 0) or 0), versions=_versions(rocm=hip),
    )


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
        return amd_device_info(props, index, hip)
    return DeviceInfo(
        vendor="nvidia", type="cuda", index=index, name=props.name, arch=f"sm_{props.major}{props.minor}",
        family=nvidia_family(props.major, props.minor), warp_size=getattr(props, "warp_size", 32),
        memory_bytes=props.total_memory, compute_units=props.multi_processor_count,
        versions=_versions(cuda=torch.version.cuda),
    )


def _xpu(index: int) -> DeviceInfo:
    return intel_device_info(torch.xpu.get_device_properties(index), index)


def intel_device_info(props: object, index: int = 0) -> DeviceInfo:
    """An Intel GPU from ``torch.xpu.get_device_properties`` (name, device_id, sub_group_sizes)."""
    name = getattr(props, "name", "") or "Intel GPU"
    arch = intel_arch(name, getattr(props, "device_id", None))
    sizes = [int(s) for s in (getattr(props, "sub_group_sizes", None) or []) if s] or [16]
    return DeviceInfo(
        vendor="intel", type="xpu", index=index, name=name, arch=arch, family=arch,
        warp_size=max(sizes), memory_bytes=int(getattr(props, "total_memory", 0) or 0),
        compute_units=int(getattr(props, "gpu_subslice_count", 0) or getattr(props, "max_compute_units", 0)
                          or 0),
        versions=_versions(xpu=getattr(torch.version, "xpu", None)),
    )


# PCI device-id prefixes (upper byte + next nibble) of Intel GPU generations.
INTEL_DEVICE_IDS = (
    (0x0BD, "pvc"),   # Data Center GPU Max (Ponte Vecchio, Xe-HPC)
    (0x0B6, "pvc"),
    (0xE20, "bmg"),   # Arc B-series (Battlemage, Xe2-HPG)
    (0xE21, "bmg"),
    (0x64A, "lnl"),   # Lunar Lake iGPU (Xe2-LPG)
    (0x642, "lnl"),
    (0x569, "acm"),   # Arc A-series / Data Center Flex (Alchemist, Xe-HPG)
    (0x56A, "acm"),
    (0x56B, "acm"),
    (0x56C, "acm"),
    (0x7D4, "mtl"),   # Meteor Lake / Arrow Lake iGPU (Xe-LPG)
    (0x7D5, "mtl"),
    (0x7D6, "mtl"),
    (0x7DD, "mtl"),
)


def intel_arch(name: str, device_id: int | None = None) -> str:
    """Coarse Intel GPU arch: ``pvc`` (Data Center Max), ``bmg`` (Arc B), ``acm`` (Arc A, Flex),
    ``lnl`` / ``mtl`` (Xe2 / Xe-LPG integrated), else ``intel-gpu``.

    The PCI ``device_id`` wins when given (names vary with drivers, e.g. ``"Intel(R) Graphics
    [0xe20b]"``); the name decides otherwise."""
    if device_id:
        for prefix, arch in INTEL_DEVICE_IDS:
            if int(device_id) >> 4 == prefix:
                return arch
    lowered = name.lower()
    hexid = re.search(r"0x([0-9a-f]{4})", lowered)
    if hexid and device_id is None:
        found = intel_arch("", int(hexid.group(1), 16))
        if found != "intel-gpu":
            return found
    if "flex" in lowered:  # Data Center GPU Flex 140/170 are Alchemist (Xe-HPG) parts
        return "acm"
    if "max" in lowered or "pvc" in lowered or "ponte vecchio" in lowered or "data center" in lowered:
        return "pvc"
    if ("battlemage" in lowered or re.search(r"\bb(50|60|70|80|570|580)\b", lowered)
            or re.search(r"arc(\(tm\))?\s+(pro\s+)?b\d", lowered)):
        return "bmg"
    if "lunar lake" in lowered or re.search(r"arc(\(tm\))?\s+1[34]0v", lowered):
        return "lnl"
    if "alchemist" in lowered or re.search(r"arc(\(tm\))?\s+(pro\s+)?a\d", lowered) or re.search(
            r"\ba(310|380|570m?|580|730m|750|770m?)\b", lowered):
        return "acm"
    if "meteor lake" in lowered or "arrow lake" in lowered or lowered.strip() == "intel(r) arc(tm) graphics":
        return "mtl"
    if "arc" in lowered:
        return "acm"
    return "intel-gpu"


def cpu_info() -> DeviceInfo:
    mem = 0
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
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
