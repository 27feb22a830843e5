"""``linear_cross_entropy``: CE of ``hidden @ W.T (+ b)`` without materialising the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.dispatch import call
from slipstream.ops._spec import (
    FLOAT_DTYPES,
    MATMUL_TOLERANCES,
    OpSpec,
    Sample,
    bucket,
    like,
    require_dtype,
    require_same_device,
    require_tensor,
    rows_within,
)
from slipstream.ops.cross_entropy import check_loss_args, fresh_labels, loss_from_logits

OP = "linear_cross_entropy"


def reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """CE of logits ``hidden @ weight.T + bias`` as HF computes them: the matmul in the inputs'
    dtype (fp32 accumulate), then the loss in fp32. Shapes: ``hidden`` (N, H), ``weight`` (V, H),
    ``bias`` (V,), ``labels`` (N,). Same loss options as ``cross_entropy``. Materialises (N, V):
    the fast implementations exist to avoid that.
    """
    logits = F.linear(hidden, weight, bias)
    wide = torch.promote_types(logits.dtype, torch.float32)
    return loss_from_logits(logits.to(wide), labels, ignore_index, reduction, softcap, scale)


def check(args: tuple) -> tuple:
    hidden, weight, labels, bias, ignore_index, reduction, softcap, scale = args
    require_tensor("hidden", hidden, op=OP)
    require_tensor("weight", weight, op=OP)
    require_dtype(OP, "hidden", hidden, FLOAT_DTYPES)
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{OP}: need `hidden` (N, H) and `weight` (V, H); got hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{OP}: `weight` ({weight.dtype}) must have `hidden`'s dtype ({hidden.dtype})")
    if bias is not None:
        require_tensor("bias", bias, op=OP)
        if bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype:
            raise ValueError(f"{OP}: `bias` must be ({weight.shape[0]},) {hidden.dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
    check_loss_args(OP, labels, hidden.shape[0], reduction, softcap)
    device = require_same_device(OP, hidden=hidden, weight=weight, labels=labels, bias=bias)
    return (OP, device, hidden.dtype, hidden.shape[1], weight.shape[0], bucket(hidden.shape[0]),
            hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad,
            bias is not None, reduction, softcap is not None, scale != 1.0)


def fresh(args: tuple, max_elements: int | None) -> tuple:
    hidden, weight, labels, bias, ignore_index, reduction, softcap, scale = args
    n, h = hidden.shape
    v = weight.shape[0]
    rows = rows_within(n, v, max_elements)  # the logits chunk is what the budget bounds
    return (like(hidden, (rows, h)), like(weight, (v, h), scale=h ** -0.5),
            fresh_labels(labels, rows, v, ignore_index),
            None if bias is None else like(bias, (v,), scale=0.1), ignore_index, reduction, softcap, scale)


def samples(device: torch.device, dtype: torch.dtype, size: str = "small") -> list[Sample]:
    def make(label: str, n: int, h: int, v: int, with_bias: bool = False, reduction: str = "mean",
             softcap: float | None = None) -> Sample:
        hidden = torch.randn(n, h, device=device, dtype=dtype)
        weight = (torch.randn(v, h, device=device) * h ** -0.5).to(dtype)
        labels = torch.randint(0, v, (n,), device=device)
        labels[::7] = -100
        bias = (torch.randn(v, device=device) * 0.1).to(dtype) if with_bias else None
        return Sample(label, (hidden, weight, labels, bias, -100, reduction, softcap, 1.0))

    if size == "real":
        return [make("llama3 8192x4096->128256", 8192, 4096, 128256)]
    return [make("16x32->100", 16, 32, 100), make("1 row", 1, 16, 33), make("odd 37x48->999 bias", 37, 48, 999,
                                                                             True),
            make("sum softcap", 10, 24, 257, reduction="sum", softcap=10.0)]


SPEC = OpSpec(
    name=OP,
    reference=reference,
    tolerances=MATMUL_TOLERANCES,
    check=check,
    fresh=fresh,
    samples=samples,
    differentiable=("hidden", "weight", "bias"),
)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``; see :func:`reference`."""
    return call(SPEC, (hidden, weight, labels, bias, ignore_index, reduction, softcap, scale))
