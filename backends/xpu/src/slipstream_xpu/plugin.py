"""Registers the portable Triton kernels for Intel GPUs (Data Center Max, Arc) through upstream
``torch.xpu`` and Triton's XPU backend, with Intel tuning spaces per family; SDPA on XPU; and, only
if a matching intel-extension-for-pytorch imports, its fused ops (Intel GPUs and Intel CPUs).
"""

from __future__ import annotations

from collections.abc import Sequence

from slipstream import hookimpl
from slipstream.device import DeviceInfo
from slipstream.kernels import PortableKernel, catalog
from slipstream.registry import Registry
from slipstream_xpu import libraries
from slipstream_xpu.spaces import configs_for

PREFIX = "xpu"


def is_mine(info: DeviceInfo) -> bool:
    return info.vendor == "intel"


def intel_gpu_or_cpu(info: DeviceInfo) -> bool:
    """Intel GPUs, and this machine's CPU when it is an Intel one (IPEX's CPU kernels)."""
    return info.vendor == "intel" or (info.type == "cpu" and libraries.host_cpu_is_intel())


def register_kernels(registry: Registry, kernels: Sequence[PortableKernel], prefix: str = PREFIX) -> None:
    """Register ``kernels`` as ``"<prefix>.<name>"`` for Intel GPUs with Intel tuning spaces."""
    for kernel in kernels:
        registry.add(kernel.op, f"{prefix}.{kernel.name}", kernel.fn, devices=is_mine, accepts=kernel.accepts,
                     configs=configs_for(kernel), kind="vendor",
                     description=kernel.description or f"Triton {kernel.name} (Intel tuning space)")


@hookimpl
def slipstream_register_kernels(registry: Registry) -> None:
    register_kernels(registry, catalog())
    registry.add("attention", f"{PREFIX}.sdpa", libraries.sdpa, devices=is_mine,
                 accepts=libraries.sdpa_accepts, kind="vendor",
                 description="torch SDPA on XPU (fused backends only)")
    if libraries.ipex_functional() is not None:
        for op, suffix, fn, accepts in libraries.IPEX_OPS:
            what = suffix.removeprefix("ipex_")
            registry.add(op, f"{PREFIX}.{suffix}", fn, devices=intel_gpu_or_cpu, accepts=accepts,
                         kind="vendor", description=f"intel-extension-for-pytorch {what} (forward only)")


@hookimpl
def slipstream_devices() -> Sequence[DeviceInfo]:
    """Nothing extra: core already lists ``torch.xpu`` devices itself (returning them would list
    each twice). ``doctor_status()`` says what is visible."""
    return []


@hookimpl
def slipstream_status() -> str:
    return doctor_status()


def doctor_status() -> str:
    """One line for ``slipstream doctor``: which Intel GPUs this plugin serves, or why none."""
    import torch

    ipex = libraries.ipex_status()
    ipex_note = {"absent": ""}.get(ipex, f"; IPEX {ipex}")
    xpu = getattr(torch, "xpu", None)
    if xpu is None:
        return (f"installed; no Intel GPU visible (this PyTorch {torch.__version__} has no torch.xpu)"
                f"{ipex_note}")
    try:
        available = xpu.is_available()
        count = xpu.device_count() if available else 0
    except Exception as exc:  # a broken driver must not break doctor
        return f"installed; querying Intel GPUs failed: {type(exc).__name__}: {exc}{ipex_note}"
    if not count:
        built = getattr(torch.version, "xpu", None)
        why = ("torch.version.xpu is None: this PyTorch is not an XPU build" if not built else
               f"XPU build {built}, but torch.xpu.is_available() is False: check the Intel GPU driver "
               "(level-zero), render-group permissions, ZE_AFFINITY_MASK")
        return f"installed; no Intel GPU visible ({why}){ipex_note}"
    from slipstream.device import device_info
    from slipstream_xpu.families import FAMILIES

    seen = []
    for i in range(count):
        info = device_info(f"xpu:{i}")
        known = "" if info.family in FAMILIES else " (not in slipstream-xpu's table: generic space)"
        seen.append(f"xpu:{i} {info.name} {info.arch} sub-group {info.warp_size}{known}")
    try:
        import triton.backends as tb

        triton_xpu = "intel" in tb.backends
    except Exception:
        triton_xpu = False
    note = "" if triton_xpu else " (Triton has no XPU backend: install pytorch-triton-xpu; SDPA/IPEX only)"
    return f"installed; {count} Intel GPU(s){note}{ipex_note}: " + "; ".join(seen)
