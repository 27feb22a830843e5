"""``geglu``: the gated MLP activation ``gelu(gate) * up`` (Gemma; exact or tanh GELU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.dispatch import call
from slipstream.ops._spec import ELEMENTWISE_TOLERANCES, OpSpec
from slipstream.ops.swiglu import check_gated, fresh_gated, gated_samples

OP = "geglu"
APPROXIMATIONS = ("none", "tanh")


def reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate) * up`` in fp32, cast back; ``approximate`` is ``"none"`` (erf) or ``"tanh"``.

    Gemma's ``gelu_pytorch_tanh`` is ``approximate="tanh"``.
    """
    return (F.gelu(gate.float(), approximate=approximate) * up.float()).to(gate.dtype)


def check(args: tuple) -> tuple:
    gate, up, approximate = args
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"{OP}: `approximate` must be one of {APPROXIMATIONS}, got {approximate!r}")
    return check_gated(OP, gate, up, approximate)


SPEC = OpSpec(
    name=OP,
    reference=reference,
    tolerances=ELEMENTWISE_TOLERANCES,
    check=check,
    fresh=fresh_gated,
    samples=lambda device, dtype, size="small": (
        gated_samples(device, dtype, size, "none") + gated_samples(device, dtype, size, "tanh")[:2]
    ),
    differentiable=("gate", "up"),
)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` for the MLP's gate and up projections (..., I)."""
    return call(SPEC, (gate, up, approximate))
