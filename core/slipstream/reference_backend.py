"""The reference backend, built into core: every op's reference, and a ``torch.compile``d copy.

The plain reference runs anywhere and is the fallback. The compiled copy is a second candidate
on devices where Inductor generates code (GPUs with Triton; the CPU only with
``SLIPSTREAM_COMPILE_CPU=1``, since compiling costs more there than small CPU runs gain).
"""

from __future__ import annotations

import functools
import os
import shutil

import torch

from slipstream.device import DeviceInfo
from slipstream.ops import SPECS
from slipstream.plugins import hookimpl
from slipstream.registry import Registry


def compile_works(info: DeviceInfo) -> bool:
    if info.type in ("cuda", "xpu"):
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    if info.type == "cpu":
        wanted = os.environ.get("SLIPSTREAM_COMPILE_CPU", "").lower() in ("1", "true", "yes", "on")
        return wanted and any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    return False


def compiled(reference):
    """``torch.compile(reference)``, compiled on first use, with the reference's signature."""
    holder = {}

    @functools.wraps(reference)
    def run(*args, **kwargs):
        fn = holder.get("fn")
        if fn is None:
            fn = holder["fn"] = torch.compile(reference, dynamic=True)
        return fn(*args, **kwargs)

    return run


@hookimpl
def slipstream_register_kernels(registry: Registry) -> None:
    for name, spec in SPECS.items():
        registry.add(name, f"reference.{name}", spec.reference, kind="reference",
                     description="plain PyTorch: the op's meaning")
        registry.add(name, f"reference.{name}.compiled", compiled(spec.reference), kind="reference",
                     priority=-1, devices=compile_works, description="the reference through torch.compile")
