"""``rms_norm``: root-mean-square layer norm (Llama, Mistral, Qwen; Gemma's ``1 + w`` variant)."""

from __future__ import annotations

import torch

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

OP = "rms_norm"


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """``(offset + w) * x / sqrt(mean(x^2) + eps)`` over the last dim, computed in fp32.

    Shapes: ``x`` (..., H), ``weight`` (H,); returns ``x``'s shape and dtype. ``offset=1.0`` is
    Gemma's ``(1 + w)`` form. Matches HF's LlamaRMSNorm / GemmaRMSNorm up to their final
    rounding order.
    """
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * (weight.float() + offset)).to(x.dtype)


def check(args: tuple) -> tuple:
    x, weight, eps, offset = args
    require_tensor("x", x, op=OP)
    require_tensor("weight", weight, op=OP)
    require_dtype(OP, "x", x, FLOAT_DTYPES)
    require_dtype(OP, "weight", weight, FLOAT_DTYPES)
    device = require_same_device(OP, x=x, weight=weight)
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{OP}: `weight` must have shape (H,) with H = x.shape[-1]; got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"{OP}: `eps` must be > 0, got {eps}")
    rows = x.numel() // max(1, x.shape[-1])
    return (
        OP, device, x.dtype, weight.dtype, x.shape[-1], bucket(rows),
        x.requires_grad, weight.requires_grad, offset != 0.0,
    )


def fresh(args: tuple, max_elements: int | None) -> tuple:
    x, weight, eps, offset = args
    h = x.shape[-1]
    rows = rows_within(x.numel() // max(1, h), h, max_elements)
    return like(x, (rows, h)), like(weight, (h,), scale=0.5, offset=1.0 - offset), eps, offset


def samples(device: torch.device, dtype: torch.dtype, size: str = "small") -> list[Sample]:
    def make(label: str, rows: int, h: int, offset: float = 0.0) -> Sample:
        x = torch.randn(rows, h, device=device, dtype=dtype)
        w = (torch.randn(h, device=device) * 0.5 + 1.0 - offset).to(dtype)
        return Sample(label, (x, w, 1e-6, offset))

    if size == "real":
        return [make("llama8b 16384x4096", 16384, 4096), make("gemma 4096x3072", 4096, 3072, 1.0),
                make("odd 1000x4095", 1000, 4095)]
    return [make("4x64", 4, 64), make("1 row x 33", 1, 33), make("odd 7x1000", 7, 1000),
            make("gemma 5x96", 5, 96, 1.0), make("0 rows", 0, 32)]


SPEC = OpSpec(
    name=OP,
    reference=reference,
    tolerances=ELEMENTWISE_TOLERANCES,
    check=check,
    fresh=fresh,
    samples=samples,
    differentiable=("x", "weight"),
)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMS-normalise ``x`` (..., H) over its last dim and scale by ``offset + weight`` (H,).

    Dispatched: runs the fastest implementation verified for this device, dtype and shape.
    """
    return call(SPEC, (x, weight, eps, offset))
