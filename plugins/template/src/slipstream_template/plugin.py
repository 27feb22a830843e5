"""The template's hooks: one real implementation, registered the way a vendor would.

``template.swiglu`` is a memory-saving SwiGLU: the forward saves only its inputs and the backward
recomputes ``silu(gate)``, so no (rows, I) activation is kept for autograd. It is plain PyTorch
and runs on every device, which makes it a good first candidate to adapt: replace the body with
your kernel, narrow ``devices`` to your hardware, and run ``slipstream conformance slipstream-template``.
"""

from __future__ import annotations

import torch

from slipstream import hookimpl
from slipstream.device import DeviceInfo
from slipstream.registry import Registry

VENDOR = "template"


class _RecomputedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        g = gate.float()
        return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        g, u, dy = gate.float(), up.float(), grad.float()
        sig = torch.sigmoid(g)
        silu = g * sig
        d_gate = dy * u * sig * (1 + g * (1 - sig))
        return d_gate.to(gate.dtype), (dy * silu).to(up.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU recomputing silu(gate) in backward (saves one activation of memory)."""
    return _RecomputedSwiGLU.apply(gate, up)


def any_device(info: DeviceInfo) -> bool:
    # A vendor narrows this: `return info.vendor == "acme"`.
    return True


def accepts(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return gate.dtype in (torch.float32, torch.bfloat16, torch.float16)


@hookimpl
def slipstream_register_kernels(registry: Registry) -> None:
    registry.add("swiglu", f"{VENDOR}.swiglu", swiglu, devices=any_device, accepts=accepts, kind="portable",
                 description="SwiGLU with recompute-in-backward (template)")
