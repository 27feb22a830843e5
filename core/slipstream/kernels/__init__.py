"""Portable Triton kernels: one module per op, each exporting ``KERNELS`` (a list of
:class:`~slipstream.kernels._catalog.PortableKernel`).

This package registers nothing itself. Vendor backends call :func:`catalog` and register the
kernels with their own device predicates and tuning spaces; ``ci/compile_matrix.py`` compiles
every kernel x config ahead of time for each backend's targets through each kernel's ``aot``.
Shared kernels use only portable ``tl`` operations (no CUDA-only inline asm).
"""

from slipstream.kernels._catalog import PortableKernel, catalog, interpreter_on, triton_available

__all__ = ["PortableKernel", "catalog", "interpreter_on", "triton_available"]
