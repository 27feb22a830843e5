"""Registers the portable Triton kernels for NVIDIA GPUs, and the CUDA library candidates."""

from __future__ import annotations

from slipstream import hookimpl
from slipstream.device import DeviceInfo
from slipstream.kernels import catalog, interpreter_on
from slipstream.registry import Registry
from slipstream_nvidia import libraries
from slipstream_nvidia.spaces import configs_for

PREFIX = "nvidia"


def is_nvidia(info: DeviceInfo) -> bool:
    return info.vendor == "nvidia"


def runs_kernels(info: DeviceInfo) -> bool:
    """NVIDIA GPUs, and the CPU under Triton's interpreter (how CI and vendors test without a GPU)."""
    return is_nvidia(info) or (info.type == "cpu" and interpreter_on())


@hookimpl
def slipstream_register_kernels(registry: Registry) -> None:
    for kernel in catalog():
        registry.add(kernel.op, f"{PREFIX}.{kernel.name}", kernel.fn, devices=runs_kernels, accepts=kernel.accepts,
                     configs=configs_for(kernel.name, kernel.configs), kind="vendor",
                     description=kernel.description or f"Triton {kernel.name}")
    for backend in libraries.SDPA_BACKENDS:
        registry.add("attention", f"{PREFIX}.sdpa_{backend}", libraries.sdpa(backend), devices=is_nvidia,
                     accepts=libraries.accepts_for(backend), kind="vendor", description=f"torch SDPA ({backend})")
    registry.add("attention", f"{PREFIX}.sdpa_auto", libraries.sdpa_auto, devices=is_nvidia,
                 accepts=libraries.sdpa_accepts, kind="vendor",
                 description="torch SDPA (its own backend choice, native GQA)")
    if libraries.flash_attn_available():
        registry.add("attention", f"{PREFIX}.flash_attn", libraries.flash_attn, devices=is_nvidia,
                     accepts=libraries.flash_attn_accepts, kind="vendor", description="flash-attn package")


@hookimpl
def slipstream_status() -> str:
    """One line for ``slipstream doctor``: the NVIDIA GPUs this plugin serves, or why none."""
    import torch

    if getattr(torch.version, "hip", None):
        return "installed; this PyTorch is a ROCm build: install slipstream-rocm for AMD GPUs"
    if torch.version.cuda is None:
        return "installed; no NVIDIA GPU usable (this PyTorch is a CPU-only build: install a CUDA build of torch)"
    if not torch.cuda.is_available():
        return f"installed; no NVIDIA GPU visible (CUDA {torch.version.cuda} build, but no device or driver found)"
    names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    return f"serving {torch.cuda.device_count()} GPU(s): {', '.join(sorted(names))}"
