"""``lora_linear``: a frozen base projection plus a low-rank LoRA update, one op."""

from __future__ import annotations

import dataclasses

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
from slipstream.quant import QuantizedWeight, quantize_nf4

OP = "lora_linear"


def base_weight(weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The base weight (N, K) in ``dtype``, dequantising a 4-bit one."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize(dtype)
    return weight.to(dtype)


def reference(
    x: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias + scaling * (x @ A.T) @ B.T`` as peft's ``lora.Linear`` computes it.

    Shapes: ``x`` (..., K), ``weight`` (N, K) dense or :class:`~slipstream.quant.QuantizedWeight`
    (NF4/FP4), ``lora_a`` (r, K), ``lora_b`` (N, r), ``bias`` (N,). The base product runs in
    ``x``'s dtype; the LoRA path in the adapter's dtype (peft keeps adapters in fp32 under a
    bf16 base); the two are added in the wider of their dtypes (torch promotion, as peft's
    ``result + lora_B(lora_A(x)) * scaling``) and the sum is cast to ``x``'s dtype. Returns (..., N).
    """
    base = F.linear(x, base_weight(weight, x.dtype), bias)
    xa = x.to(lora_a.dtype)
    update = F.linear(F.linear(xa, lora_a), lora_b) * scaling
    return (base + update).to(x.dtype)


def check_projection(op: str, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, lora_a: torch.Tensor,
                     lora_b: torch.Tensor, bias: torch.Tensor | None, suffix: str = "") -> tuple:
    """Validate one projection of ``x`` (``x`` itself already checked); returns its key part.

    ``suffix`` names the arguments of a projection slot in a grouped op (``weight1``, ``lora_a1``...).
    The key part: ``(device, weight kind, adapter dtype, N, r, requires_grad of W, A, B, bias, has bias)``.
    """
    w_name, a_name, b_name, bias_name = (f"{n}{suffix}" for n in ("weight", "lora_a", "lora_b", "bias"))
    quantized = isinstance(weight, QuantizedWeight)
    if not quantized:
        require_tensor(w_name, weight, op=op)
        if weight.dim() != 2:
            raise ValueError(f"{op}: `{w_name}` must be (N, K), got {tuple(weight.shape)}")
    n, k = weight.shape
    for name, t in ((a_name, lora_a), (b_name, lora_b)):
        require_tensor(name, t, op=op)
        require_dtype(op, name, t, FLOAT_DTYPES)
    if x.shape[-1] != k:
        raise ValueError(f"{op}: `x` has {x.shape[-1]} features but `{w_name}` is ({n}, {k}): K must match")
    r = lora_a.shape[0]
    if lora_a.dim() != 2 or lora_a.shape[1] != k or lora_b.dim() != 2 or lora_b.shape != (n, r):
        raise ValueError(f"{op}: need `{a_name}` (r, {k}) and `{b_name}` ({n}, r); got {tuple(lora_a.shape)} and "
                         f"{tuple(lora_b.shape)}")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"{op}: `{a_name}` ({lora_a.dtype}) and `{b_name}` ({lora_b.dtype}) must share a dtype")
    if bias is not None:
        require_tensor(bias_name, bias, op=op)
        if bias.shape != (n,):
            raise ValueError(f"{op}: `{bias_name}` must be ({n},), got {tuple(bias.shape)}")
    device = require_same_device(op, x=x, **{w_name: weight.packed if quantized else weight, a_name: lora_a,
                                             b_name: lora_b, bias_name: bias})
    wkind = f"q:{weight.quant_type}:{weight.blocksize}:{weight.double_quant}" if quantized else weight.dtype
    return (device, wkind, lora_a.dtype, n, r, (not quantized) and weight.requires_grad, lora_a.requires_grad,
            lora_b.requires_grad, bias is not None and bias.requires_grad, bias is not None)


def check(args: tuple) -> tuple:
    x, weight, lora_a, lora_b, scaling, bias = args
    require_tensor("x", x, op=OP)
    require_dtype(OP, "x", x, FLOAT_DTYPES)
    device, wkind, adtype, n, r, *flags = check_projection(OP, x, weight, lora_a, lora_b, bias)
    k = x.shape[-1]
    rows = x.numel() // max(1, k)
    return (OP, device, x.dtype, wkind, adtype, n, k, r, bucket(rows), x.requires_grad, *flags)


def fresh_quantized(weight: QuantizedWeight) -> QuantizedWeight:
    """Random 4-bit codes and block scales in ``weight``'s exact format: same code book (NF4/FP4),
    block size, double quantisation and dtype, so verification exercises the path the call takes."""
    dev = weight.device
    packed = torch.randint(0, 256, tuple(weight.packed.shape), dtype=torch.uint8, device=dev)
    if weight.double_quant:  # random 8-bit codes into the weight's own nested code book and scales
        absmax = torch.randint(0, 256, tuple(weight.absmax.shape), dtype=weight.absmax.dtype, device=dev)
    else:  # about the absmax of a block of N(0, 1/K) weights
        scale = 2.5 * weight.shape[1] ** -0.5
        absmax = ((torch.rand(tuple(weight.absmax.shape), device=dev) + 0.5) * scale).to(weight.absmax.dtype)
    return dataclasses.replace(weight, packed=packed, absmax=absmax)


def fresh(args: tuple, max_elements: int | None) -> tuple:
    x, weight, lora_a, lora_b, scaling, bias = args
    n, k = weight.shape
    r = lora_a.shape[0]
    rows = rows_within(x.numel() // max(1, k), max(n, k), max_elements)
    if isinstance(weight, QuantizedWeight):
        w = fresh_quantized(weight)
    else:
        w = like(weight, (n, k), scale=k ** -0.5)
    return (like(x, (rows, k)), w, like(lora_a, (r, k), scale=k ** -0.5),
            like(lora_b, (n, r), scale=r ** -0.5), scaling,
            None if bias is None else like(bias, (n,), scale=0.1))


def samples(device: torch.device, dtype: torch.dtype, size: str = "small") -> list[Sample]:
    def make(label: str, rows: int, k: int, n: int, r: int, nf4: bool = False, with_bias: bool = False,
             adapter_dtype: torch.dtype | None = None) -> Sample:
        x = torch.randn(rows, k, device=device, dtype=dtype)
        w = (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)
        if nf4:
            q = quantize_nf4(w)
            w = QuantizedWeight(**{**q.__dict__, "dtype": dtype})
        ad = adapter_dtype or dtype
        a = (torch.randn(r, k, device=device) * k ** -0.5).to(ad).requires_grad_()
        b = (torch.randn(n, r, device=device) * r ** -0.5).to(ad).requires_grad_()
        bias = (torch.randn(n, device=device) * 0.1).to(dtype) if with_bias else None
        return Sample(label, (x.requires_grad_(), w, a, b, 2.0, bias))

    if size == "real":
        return [make("llama8b q_proj 4096 tok", 4096, 4096, 4096, 16),
                make("llama8b k_proj", 4096, 4096, 1024, 16),
                make("llama8b gate_proj", 4096, 4096, 14336, 16),
                make("llama8b down_proj", 4096, 14336, 4096, 16),
                make("llama8b q_proj nf4", 4096, 4096, 4096, 16, nf4=True)]
    return [make("8x32->48 r4", 8, 32, 48, 4), make("1 row", 1, 16, 24, 2),
            make("odd 13x40->27 bias", 13, 40, 27, 3, with_bias=True),
            make("nf4 6x64->32", 6, 64, 32, 4, nf4=True), make("fp32 adapter", 5, 32, 16, 4,
                                                                adapter_dtype=torch.float32)]


SPEC = OpSpec(
    name=OP,
    reference=reference,
    tolerances=MATMUL_TOLERANCES,
    check=check,
    fresh=fresh,
    samples=samples,
    differentiable=("x", "weight", "lora_a", "lora_b", "bias"),
)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias + scaling * (x @ A.T) @ B.T``; ``W`` may be a 4-bit :class:`QuantizedWeight`."""
    return call(SPEC, (x, weight, lora_a, lora_b, scaling, bias))
