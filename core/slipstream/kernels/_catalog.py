"""The catalogue of portable kernels, discovered from this package's modules."""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from slipstream.kernels._aot import AotUnit


def _always(*_: object) -> bool:
    return True


@dataclass(frozen=True)
class PortableKernel:
    """A Triton implementation of one op, ready for a backend to register.

    Attributes:
        op: the op it implements.
        name: short name; a backend registers it as ``"<backend>.<name>"``.
        fn: the op's signature plus ``config: dict | None = None`` (``None``: ``configs[0]``).
        configs: default tuning space (block sizes, num_warps, ...); backends may substitute
            their own per device.
        accepts: ``accepts(*args) -> bool``: inputs the kernel handles.
        aot: ``aot(config) -> [AotUnit]``: every Triton kernel this config launches, with its
            signature, for ahead-of-time compilation in CI.
        description: one line for ``doctor``.
    """

    op: str
    name: str
    fn: Callable
    configs: Sequence[dict]
    accepts: Callable[..., bool] = _always
    aot: Callable[[dict], list[AotUnit]] | None = None
    description: str = ""
    tags: tuple[str, ...] = field(default=())


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_on() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def catalog() -> list[PortableKernel]:
    """Every portable kernel, from each module of this package that exports ``KERNELS``.

    Returns an empty list where Triton is not installed (macOS, Windows): those platforms use
    the reference and vendor-library candidates.
    """
    if not triton_available():
        return []
    import slipstream.kernels as pkg

    found: list[PortableKernel] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"slipstream.kernels.{info.name}")
        found += list(getattr(module, "KERNELS", []))
    return found


# Compile options some vendors' Triton backends take at launch (AMD: occupancy hint, MFMA shape,
# operand packing; Intel: register-file mode). Backends put them in their configs; NVIDIA configs
# never carry them (NVIDIA's Triton would reject unknown launch options).
VENDOR_LAUNCH_OPTIONS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack", "grf_mode")


# Intel's sub-group size: slipstream configs say ``warp_size``; intel-xpu-backend-for-triton's
# XPUOptions field is ``warp_size`` in current releases and ``threads_per_warp`` in older ones.
INTEL_WARP_FIELDS = ("warp_size", "threads_per_warp")


def intel_warp_option(option_fields: Iterable[str] | None) -> str | None:
    """The launch option carrying the sub-group size, given the Intel backend's option field names
    (``None``: no Intel backend installed, so the size is not forwarded)."""
    fields = set(option_fields or ())
    return next((f for f in INTEL_WARP_FIELDS if f in fields), None)


@functools.cache
def _installed_intel_option_fields() -> tuple[str, ...] | None:
    try:
        import dataclasses
        import sys

        from triton.backends import backends

        backend = backends.get("intel") or backends.get("xpu")
        if backend is None:
            return None
        module = sys.modules[backend.compiler.__module__]
        options = next(getattr(module, n) for n in dir(module) if n.endswith("Options"))
        return tuple(f.name for f in dataclasses.fields(options))
    except Exception:  # no Intel backend, or one laid out differently: forward nothing
        return None


def launch_options(config: dict | None) -> dict:
    """The vendor-specific launch options present in ``config``, to spread into a kernel launch."""
    if not config:
        return {}
    out = {key: config[key] for key in VENDOR_LAUNCH_OPTIONS if key in config}
    if "warp_size" in config:
        name = intel_warp_option(_installed_intel_option_fields())
        if name is not None:
            out[name] = config["warp_size"]
    return out
