"""Registers the portable Triton kernels for AMD ROCm GPUs (Instinct CDNA, Radeon RDNA), with AMD
tuning spaces per family, and the ROCm library candidates (SDPA backends, aiter if installed).

ROCm PyTorch calls AMD GPUs ``"cuda"``; core's :func:`slipstream.device.device_info` tells them
apart (``torch.version.hip``, ``gcnArchName``) and reports ``vendor == "amd"``, which is all this
plugin keys on. Nothing here runs on other vendors' devices or on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from slipstream import hookimpl
from slipstream.device import DeviceInfo
from slipstream.kernels import PortableKernel, catalog
from slipstream.registry import Registry
from slipstream_rocm import libraries
from slipstream_rocm.spaces import configs_for

PREFIX = "rocm"


def is_mine(info: DeviceInfo) -> bool:
    return info.vendor == "amd"


def register_kernels(registry: Registry, kernels: Sequence[PortableKernel], prefix: str = PREFIX) -> None:
    """Register ``kernels`` as ``"<prefix>.<name>"`` for AMD devices with AMD tuning spaces."""
    for kernel in kernels:
        registry.add(kernel.op, f"{prefix}.{kernel.name}", kernel.fn, devices=is_mine, accepts=kernel.accepts,
                     configs=configs_for(kernel), kind="vendor",
                     description=kernel.description or f"Triton {kernel.name} (AMD tuning space)")


@hookimpl
def slipstream_register_kernels(registry: Registry) -> None:
    register_kernels(registry, catalog())
    for backend in libraries.SDPA_BACKENDS:
        registry.add("attention", f"{PREFIX}.sdpa_{backend}", libraries.sdpa(backend), devices=is_mine,
                     accepts=libraries.sdpa_accepts, kind="vendor",
                     description=f"torch SDPA on ROCm ({backend})")
    if libraries.aiter_available():
        registry.add("attention", f"{PREFIX}.aiter_flash", libraries.aiter_attention, devices=is_mine,
                     accepts=libraries.aiter_accepts, kind="vendor", description="AMD aiter flash attention")


@hookimpl
def slipstream_devices() -> Sequence[DeviceInfo]:
    """Nothing extra: core already lists ROCm GPUs (torch device type ``"cuda"``) itself, so
    returning them here would list each twice. ``doctor_status()`` says what is visible."""
    return []


@hookimpl
def slipstream_status() -> str:
    return doctor_status()


def doctor_status() -> str:
    """One line for ``slipstream doctor``: which AMD GPUs this plugin serves, or why none."""
    import torch

    hip = getattr(torch.version, "hip", None)
    if not hip:
        return "installed; no AMD GPU visible (torch.version.hip is None: this PyTorch is not a ROCm build)"
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # a broken driver must not break doctor
        return f"installed; ROCm PyTorch (HIP {hip}) but querying GPUs failed: {type(exc).__name__}: {exc}"
    if count == 0:
        return (f"installed; no AMD GPU visible (ROCm PyTorch, HIP {hip}, but torch.cuda.is_available() "
                "is False: "
                "check the amdgpu driver, /dev/kfd and /dev/dri permissions, HIP_VISIBLE_DEVICES)")
    from slipstream.device import device_info
    from slipstream_rocm.families import FAMILIES

    seen = []
    for i in range(count):
        info = device_info(f"cuda:{i}")
        known = "" if info.family in FAMILIES else " (family not in slipstream-rocm's table: generic space)"
        seen.append(f"cuda:{i} {info.name} {info.arch} {info.family} wave{info.warp_size}{known}")
    extras = ", aiter found" if libraries.aiter_available() else ""
    return f"installed; {count} AMD GPU(s), HIP {hip}{extras}: " + "; ".join(seen)
