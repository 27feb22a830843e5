"""``swiglu``: the gated MLP activation ``silu(gate) * up`` (Llama, Mistral, Qwen, Phi-3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.dispatch import call
from slipstream.ops._spec import (
    ELEMENTWISE_TOLERANCES,
    FLOAT_DTYPES,
    OpSpec,
    Sample,
    bucket,
    like,
    require_dtype,
    require_same_device,
    require_tensor,
    rows_within,
)

OP = "swiglu"


def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in fp32, cast back. ``gate``, ``up``: (..., I), same shape and dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def check_gated(op: str, gate: torch.Tensor, up: torch.Tensor, *flags: object) -> tuple:
    """Validation and dispatch key shared by the gated activations."""
    require_tensor("gate", gate, op=op)
    require_tensor("up", up, op=op)
    require_dtype(op, "gate", gate, FLOAT_DTYPES)
    device = require_same_device(op, gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"{op}: `gate` {tuple(gate.shape)} and `up` {tuple(up.shape)} must have one shape")
    if gate.dtype != up.dtype:
        raise TypeError(f"{op}: `gate` ({gate.dtype}) and `up` ({up.dtype}) must have one dtype")
    cols = gate.shape[-1] if gate.dim() else 1
    rows = gate.numel() // max(1, cols)
    return (op, device, gate.dtype, cols, bucket(rows), gate.requires_grad, up.requires_grad, *flags)


def fresh_gated(args: tuple, max_elements: int | None) -> tuple:
    gate, up, *rest = args
    cols = gate.shape[-1] if gate.dim() else 1
    rows = rows_within(gate.numel() // max(1, cols), cols, max_elements)
    return (like(gate, (rows, cols), scale=2.0), like(up, (rows, cols)), *rest)


def gated_samples(device: torch.device, dtype: torch.dtype, size: str, *rest: object) -> list[Sample]:
    def make(label: str, shape: tuple[int, ...]) -> Sample:
        gate = torch.randn(shape, device=device, dtype=torch.float32).mul(2).to(dtype)
        return Sample(label, (gate, torch.randn(shape, device=device, dtype=dtype), *rest))

    if size == "real":
        return [make("llama8b 4096x14336", (4096, 14336)), make("odd 1000x11007", (1000, 11007))]
    return [make("2x8x64", (2, 8, 64)), make("1 row x 17", (1, 17)), make("odd 9x1001", (9, 1001)),
            make("0 rows", (0, 16))]


SPEC = OpSpec(
    name=OP,
    reference=reference,
    tolerances=ELEMENTWISE_TOLERANCES,
    check=lambda args: check_gated(OP, *args),
    fresh=fresh_gated,
    samples=gated_samples,
    differentiable=("gate", "up"),
)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for the MLP's gate and up projections (..., I)."""
    return call(SPEC, (gate, up))
