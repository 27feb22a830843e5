"""Intel GPU families: the hardware facts an Intel tuning space keys on.

A Triton "warp" on Intel is a sub-group (16 or 32 work-items; option ``warp_size``); a
work-group holds at most 1024 work-items and runs on one Xe-core, whose hardware threads bound
``num_warps``: 64 with the default 128-register GRF, 32 with the large 256-register GRF
(``grf_mode="large"``: twice the registers per thread, half the threads; Data Center Max and Xe2).
``slm_bytes`` is the shared local memory (Triton's shared memory) one work-group may use.
"""

from __future__ import annotations

from dataclasses import dataclass

from slipstream.device import DeviceInfo, intel_arch

KIB = 1024


@dataclass(frozen=True)
class IntelFamily:
    name: str
    sub_groups: tuple[int, ...]
    slm_bytes: int
    large_grf: bool
    dpas: bool
    max_work_items: int = 1024
    max_threads_small_grf: int = 64
    max_threads_large_grf: int = 32
    description: str = ""

    def max_warps(self, grf_mode: str) -> int:
        return self.max_threads_large_grf if grf_mode == "large" else self.max_threads_small_grf


FAMILIES: dict[str, IntelFamily] = {
    "pvc": IntelFamily("pvc", (16, 32), 128 * KIB, large_grf=True, dpas=True,
                       description="Data Center GPU Max (Ponte Vecchio, Xe-HPC)"),
    "bmg": IntelFamily("bmg", (16, 32), 128 * KIB, large_grf=True, dpas=True,
                       description="Arc B-series (Battlemage, Xe2-HPG)"),
    "lnl": IntelFamily("lnl", (16, 32), 128 * KIB, large_grf=True, dpas=True,
                       description="Lunar Lake integrated (Xe2-LPG)"),
    "acm": IntelFamily("acm", (8, 16, 32), 64 * KIB, large_grf=False, dpas=True,
                       description="Arc A-series / Data Center Flex (Alchemist, Xe-HPG)"),
    "mtl": IntelFamily("mtl", (8, 16, 32), 64 * KIB, large_grf=False, dpas=False,
                       description="Meteor / Arrow Lake integrated (Xe-LPG)"),
}
GENERIC = IntelFamily("intel-gpu", (16, 32), 64 * KIB, large_grf=False, dpas=False,
                      description="unrecognised Intel GPU: conservative limits")


def family_of(info: DeviceInfo) -> IntelFamily:
    name = info.family or info.arch or intel_arch(info.name)
    return FAMILIES.get(name, GENERIC)


def _device(name: str, arch: str, cores: int, gib: int, warp: int = 32) -> DeviceInfo:
    return DeviceInfo(vendor="intel", type="xpu", index=0, name=name, arch=arch, family=arch, warp_size=warp,
                      memory_bytes=gib * 2**30, compute_units=cores, versions={"xpu": "simulated"})


REPRESENTATIVE: dict[str, DeviceInfo] = {
    "pvc": _device("Intel(R) Data Center GPU Max 1550", "pvc", 128, 128),
    "bmg": _device("Intel(R) Arc(TM) B580 Graphics", "bmg", 20, 12),
    "acm": _device("Intel(R) Arc(TM) A770 Graphics", "acm", 32, 16),
    "lnl": _device("Intel(R) Arc(TM) 140V GPU (16GB)", "lnl", 8, 16),
}
"""One device per family, as :func:`slipstream.device.device_info` would describe it."""

COMPILE_TARGETS: tuple = ()
"""No ahead-of-time targets: Triton's XPU backend can't be installed from PyPI (README.md)."""
