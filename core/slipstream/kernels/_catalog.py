"""The catalogue of portable kernels, discovered from this package's modules."""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable, Sequence
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


def launch_options(config: dict | None) -> dict:
    """The vendor-specific launch options present in ``config``, to spread into a kernel launch."""
    if not config:
        return {}
    return {key: config[key] for key in VENDOR_LAUNCH_OPTIONS if key in config}
