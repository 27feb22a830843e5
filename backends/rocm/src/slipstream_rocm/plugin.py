"""Registers the portable Triton kernels for AMD ROCm GPUs (Instinct CDNA, Radeon RDNA)."""

from __future__ import annotations

from slipstream import hookimpl
from slipstream.device import DeviceInfo
from slipstream.kernels import catalog
from slipstream.registry import Registry

PREFIX = "rocm"


def is_mine(info: DeviceInfo) -> bool:
    return info.vendor == "amd"


@hookimpl
def slipstream_register_kernels(registry: Registry) -> None:
    for kernel in catalog():
        registry.add(kernel.op, f"{PREFIX}.{kernel.name}", kernel.fn, devices=is_mine, accepts=kernel.accepts,
                     configs=list(kernel.configs), kind="vendor", description=kernel.description)
