"""What an op *is*: its reference, its tolerances, its inputs.

An :class:`OpSpec` is the contract every implementation of an op is held to. The dispatcher,
the conformance command, the tests and the benchmarks all read the same spec, so "correct"
and "realistic shape" mean one thing everywhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

Args = tuple  # positional arguments in the op's canonical order


@dataclass(frozen=True)
class Tolerance:
    """How far an implementation may be from the float64 reference.

    ``rel`` bounds the norm-wise error ``||out - ref|| / ||ref||``; ``peak`` bounds the worst
    element ``max|out - ref| / max|ref|`` so that one wrong row in a large tensor is still
    caught. Either bound is widened to twice the error of the reference itself evaluated in
    the call's dtype: an implementation is never asked to beat the op's own meaning.
    """

    rel: float
    peak: float
    why: str


# Shared per-dtype tolerances for elementwise / row-reduction ops. One ulp of bf16 is 2^-8
# (3.9e-3) and of fp16 2^-11 (4.9e-4) relative; a couple of roundings of the output plus
# fp32 accumulation order gives these bounds. fp32 ops differ only in summation order.
ELEMENTWISE_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(1e-5, 1e-4, "fp32 math; only summation order differs"),
    torch.bfloat16: Tolerance(1e-2, 4e-2, "bf16 output rounding (2^-8) plus fp32 accumulation order"),
    torch.float16: Tolerance(2e-3, 8e-3, "fp16 output rounding (2^-11) plus fp32 accumulation order"),
    torch.float64: Tolerance(1e-10, 1e-9, "fp64 math"),
}

# Matmul-bearing ops: fp32 may run on tensor cores as tf32 (10-bit mantissa, ~5e-4 per
# product, partly averaging out over K), low precision accumulates long dot products.
MATMUL_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(2e-3, 1e-2, "fp32 inputs may use tf32 tensor cores (2^-11 mantissa)"),
    torch.bfloat16: Tolerance(1.6e-2, 6e-2, "bf16 operands (2^-8) and bf16 output rounding"),
    torch.float16: Tolerance(3e-3, 1.2e-2, "fp16 operands (2^-11) and fp16 output rounding"),
    torch.float64: Tolerance(1e-9, 1e-8, "fp64 math"),
}


@dataclass(frozen=True)
class Sample:
    """One named input set for an op: ``args`` in canonical order."""

    label: str
    args: Args

    def __repr__(self) -> str:
        return f"Sample({self.label})"


@dataclass(frozen=True)
class OpSpec:
    """Contract of one op.

    Attributes:
        name: the op's registry name, e.g. ``"rms_norm"``.
        reference: plain-PyTorch implementation; the op's meaning and last-resort fallback.
            Its parameter names are the op's signature: every implementation must accept the
            same positional parameters in the same order.
        tolerances: per input dtype, how close an implementation must be to float64.
        check: validates a call's ``args`` (raises ``ValueError``/``TypeError`` naming the bad
            argument) and returns its dispatch key: a hashable that groups calls which share one
            decision (device, dtypes, exact feature dims, bucketed row counts, flags).
        fresh: ``fresh(args, max_elements)`` returns new random inputs shaped like ``args``
            (same dtypes, devices and requires_grad), with the row-like dimension shrunk so the
            largest tensor holds at most ``max_elements`` (``None``: keep the call's size).
        samples: ``samples(device, dtype, size)`` yields realistic and odd :class:`Sample` s;
            ``size`` is ``"small"`` (CPU / interpreter) or ``"real"`` (Llama-3.1-8B shapes).
        differentiable: names of tensor arguments that may require grad.
        dtype_of: which dtype picks the tolerance (usually the first tensor's).
    """

    name: str
    reference: Callable
    tolerances: dict[torch.dtype, Tolerance]
    check: Callable[[Args], Hashable]
    fresh: Callable[[Args, int | None], Args]
    samples: Callable[[torch.device, torch.dtype, str], Sequence[Sample]]
    differentiable: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    dtype_of: Callable[[Args], torch.dtype] = field(default=lambda args: args[0].dtype)

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(inspect.signature(self.reference).parameters)

    def tolerance(self, dtype: torch.dtype) -> Tolerance:
        try:
            return self.tolerances[dtype]
        except KeyError:
            raise TypeError(
                f"{self.name}: dtype {dtype} is not supported; use one of "
                f"{', '.join(str(d) for d in self.tolerances)}"
            ) from None


# ----------------------------------------------------------------------------- helpers
def bucket(n: int) -> int:
    """Round a row count up to a power of two (0 stays 0) so nearby shapes share a decision."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def require_tensor(name: str, value: object, *, op: str, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{op}: `{name}` must be a floating-point tensor, got {value.dtype}")
    return value


def require_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """The one device all given tensors live on (``None`` entries ignored); raises naming the odd one."""
    first = None
    for t in tensors.values():
        if t is None:
            continue
        dev = t.device
        if first is None:
            first = dev
        elif dev != first:
            listing = ", ".join(f"`{n}` on {v.device}" for n, v in tensors.items() if v is not None)
            raise ValueError(f"{op}: all tensors must be on one device, got {listing}; move them to one device")
    return first


def require_dtype(op: str, name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: `{name}` has dtype {t.dtype}; supported: {allowed}")


def like(t: torch.Tensor, shape: Sequence[int], *, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """Fresh normal random tensor with ``t``'s dtype, device and requires_grad."""
    out = torch.randn(tuple(shape), device=t.device, dtype=torch.float32) * scale + offset
    return out.to(t.dtype).requires_grad_(t.requires_grad)


def rows_within(rows: int, row_elements: int, max_elements: int | None) -> int:
    """How many rows of ``row_elements`` fit in ``max_elements`` (at least 1, at most ``rows``)."""
    if max_elements is None or rows == 0:
        return rows
    return max(1, min(rows, max_elements // max(1, row_elements)))


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
