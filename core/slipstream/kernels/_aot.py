"""Ahead-of-time compilation of Triton kernels for GPUs this machine doesn't have.

``triton.compile(ASTSource(...), target=GPUTarget(...))`` runs the whole compiler (to cubin or
hsaco) on a CPU-only machine; the compile matrix uses it to prove every kernel x config builds
for every target a backend claims, and fits its shared memory (LDS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
                 torch.int32: "i32", torch.uint8: "u8"}


def ptr(dtype: torch.dtype) -> str:
    """Triton signature string of a pointer to ``dtype``, e.g. ``"*bf16"``."""
    return "*" + TRITON_DTYPES[dtype]


@dataclass(frozen=True)
class AotUnit:
    """One Triton kernel launch to compile: the jit function, its argument types, its constants.

    ``signature`` maps every parameter (constexprs included, typed ``"constexpr"``) to a Triton
    type string (``"*bf16"``, ``"i32"``, ``"fp32"``); ``constexprs`` gives the constants' values.
    ``options`` are compile options (``num_warps``, ``num_stages``, and backend-specific ones such
    as ``waves_per_eu`` or ``matrix_instr_nonkdim`` on AMD).
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AotResult:
    unit: str
    target: str
    ok: bool
    shared_bytes: int = 0
    registers: int = 0
    spills: int = 0
    error: str = ""


def compile_unit(unit: AotUnit, target: Any, extra_options: dict[str, Any] | None = None) -> AotResult:
    """Compile ``unit`` for ``target`` (a ``triton.backends.compiler.GPUTarget``)."""
    import triton
    from triton.compiler import ASTSource

    label = f"{target.backend}:{target.arch}"
    options = {**unit.options, **(extra_options or {})}
    try:
        src = ASTSource(fn=unit.fn, signature=dict(unit.signature), constexprs=dict(unit.constexprs))
        kernel = triton.compile(src, target=target, options=options)
        meta = kernel.metadata
        return AotResult(unit.name, label, True, int(getattr(meta, "shared", 0) or 0),
                         int(getattr(kernel, "n_regs", 0) or 0), int(getattr(kernel, "n_spills", 0) or 0))
    except Exception as exc:  # the matrix reports every failure, it doesn't stop at the first
        first = str(exc).strip().splitlines()
        return AotResult(unit.name, label, False, error=f"{type(exc).__name__}: {first[-1] if first else ''}"[:300])
