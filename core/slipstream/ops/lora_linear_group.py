"""``lora_linear_group``: two or three LoRA projections of one input (q/k/v, gate/up), one op.

Argument layout. The op's canonical arguments are *flat*: ``x`` and then :data:`SLOTS` projection
slots of five arguments each, ``weight<i>, lora_a<i>, lora_b<i>, scaling<i>, bias<i>``; slot 2 is
empty (all ``None``) for a pair such as gate/up. Flat, because everything that handles an op's
arguments generically works on top-level arguments by parameter name: verification upcasts each
floating-point tensor argument to float64 and differentiates with respect to the arguments named
in ``differentiable`` that require grad (``grad_weight1``, ``grad_lora_a2``... each judged on its
own), ``fresh`` / ``describe_args`` / the device lookup read top-level tensors, and registration
checks implementations' positional parameter names. Nested tuples of tensors would hide the
adapters from all of them. Three slots cover q/k/v and gate/up; wider groups are not needed by any
supported architecture.

Outputs: a tuple with one (..., N_i) tensor per filled slot, in slot order, each exactly what
:func:`slipstream.ops.lora_linear` returns for that projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slipstream.dispatch import call
from slipstream.ops import lora_linear as _single
from slipstream.ops._spec import (
    FLOAT_DTYPES,
    MATMUL_TOLERANCES,
    OpSpec,
    Sample,
    bucket,
    like,
    require_dtype,
    require_tensor,
    rows_within,
)
from slipstream.quant import QuantizedWeight, quantize_nf4

OP = "lora_linear_group"
SLOTS = 3
"""Projection slots in the flat argument layout."""
PER_SLOT = 5
"""Arguments per slot: ``weight, lora_a, lora_b, scaling, bias``."""

Projection = tuple  # (weight, lora_a, lora_b, scaling, bias)


def projections(args: Sequence) -> list[Projection]:
    """The filled slots of flat ``args`` (``x`` first) as ``(weight, lora_a, lora_b, scaling, bias)``."""
    return [tuple(args[1 + i * PER_SLOT:1 + (i + 1) * PER_SLOT]) for i in range(SLOTS)
            if args[1 + i * PER_SLOT] is not None]


def flat_args(x: torch.Tensor, weights: Sequence, lora_as: Sequence, lora_bs: Sequence, scalings: Sequence[float],
              biases: Sequence | None = None) -> tuple:
    """``(x, weight0, lora_a0, lora_b0, scaling0, bias0, ...)`` with the unused slots ``None``."""
    g = len(weights)
    biases = [None] * g if biases is None else list(biases)
    if not 2 <= g <= SLOTS or not (len(lora_as) == len(lora_bs) == len(scalings) == len(biases) == g):
        raise ValueError(f"{OP}: need 2 to {SLOTS} projections with one weight, lora_a, lora_b, scaling and "
                         f"bias (or None) each; got {g} weights, {len(lora_as)} lora_a, {len(lora_bs)} lora_b, "
                         f"{len(scalings)} scalings, {len(biases)} biases")
    out: list = [x]
    for i in range(SLOTS):
        out += [weights[i], lora_as[i], lora_bs[i], scalings[i], biases[i]] if i < g else [None] * PER_SLOT
    return tuple(out)


def reference(
    x: torch.Tensor,
    weight0: torch.Tensor | QuantizedWeight, lora_a0: torch.Tensor, lora_b0: torch.Tensor, scaling0: float,
    bias0: torch.Tensor | None,
    weight1: torch.Tensor | QuantizedWeight, lora_a1: torch.Tensor, lora_b1: torch.Tensor, scaling1: float,
    bias1: torch.Tensor | None,
    weight2: torch.Tensor | QuantizedWeight | None = None, lora_a2: torch.Tensor | None = None,
    lora_b2: torch.Tensor | None = None, scaling2: float | None = None, bias2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """``tuple(lora_linear.reference(x, W_i, A_i, B_i, s_i, bias_i) for each filled slot i)``.

    Shapes: ``x`` (..., K); per slot ``W_i`` (N_i, K) dense or 4-bit, ``A_i`` (r_i, K), ``B_i`` (N_i, r_i),
    ``bias_i`` (N_i,). Returns one (..., N_i) tensor per filled slot, in ``x``'s dtype.
    """
    args = (x, weight0, lora_a0, lora_b0, scaling0, bias0, weight1, lora_a1, lora_b1, scaling1, bias1,
            weight2, lora_a2, lora_b2, scaling2, bias2)
    return tuple(_single.reference(x, *p) for p in projections(args))


def check(args: tuple) -> tuple:
    if len(args) != 1 + SLOTS * PER_SLOT:
        raise TypeError(f"{OP}: expected {1 + SLOTS * PER_SLOT} arguments (x and {SLOTS} projection slots), "
                        f"got {len(args)}")
    x = args[0]
    require_tensor("x", x, op=OP)
    require_dtype(OP, "x", x, FLOAT_DTYPES)
    key: list = []
    device = None
    filled = 0
    for i in range(SLOTS):
        weight, lora_a, lora_b, scaling, bias = args[1 + i * PER_SLOT:1 + (i + 1) * PER_SLOT]
        if weight is None:
            if i < 2:
                raise ValueError(f"{OP}: `weight{i}` is None; slots 0 and 1 are required (a group has 2 or "
                                 f"{SLOTS} projections)")
            given = [n for n, v in (("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)) if v is not None]
            if given:
                raise ValueError(f"{OP}: slot {i} has no `weight{i}` but `{given[0]}{i}` is given; "
                                 "fill a slot completely or leave all of it None")
            continue
        if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
            raise TypeError(f"{OP}: `scaling{i}` must be a number, got {type(scaling).__name__}")
        dev, *part = _single.check_projection(OP, x, weight, lora_a, lora_b, bias, suffix=str(i))
        if device is None:
            device = dev
        elif dev != device:
            raise ValueError(f"{OP}: all tensors must be on one device, got `x` on {device} and slot {i} on "
                             f"{dev}; move them to one device")
        key += part
        filled += 1
    k = x.shape[-1]
    rows = x.numel() // max(1, k)
    return (OP, device, x.dtype, k, bucket(rows), x.requires_grad, filled, *key)


def fresh(args: tuple, max_elements: int | None) -> tuple:
    x = args[0]
    k = x.shape[-1]
    slots = projections(args)
    widest = max(max(p[0].shape[0] for p in slots), k)
    rows = rows_within(x.numel() // max(1, k), widest, max_elements)
    out: list = [like(x, (rows, k))]
    for i in range(SLOTS):
        weight, lora_a, lora_b, scaling, bias = args[1 + i * PER_SLOT:1 + (i + 1) * PER_SLOT]
        if weight is None:
            out += [None] * PER_SLOT
            continue
        n, r = weight.shape[0], lora_a.shape[0]
        w = _single.fresh_quantized(weight) if isinstance(weight, QuantizedWeight) else \
            like(weight, (n, k), scale=k ** -0.5)
        out += [w, like(lora_a, (r, k), scale=k ** -0.5), like(lora_b, (n, r), scale=r ** -0.5), scaling,
                None if bias is None else like(bias, (n,), scale=0.1)]
    return tuple(out)


def samples(device: torch.device, dtype: torch.dtype, size: str = "small") -> list[Sample]:
    def make(label: str, rows: int, k: int, outs: Sequence[int], ranks: Sequence[int], nf4: bool = False,
             with_bias: bool = False, adapter_dtype: torch.dtype | None = None) -> Sample:
        x = torch.randn(rows, k, device=device, dtype=dtype).requires_grad_()
        ws, a_s, b_s, biases = [], [], [], []
        ad = adapter_dtype or dtype
        for n, r in zip(outs, ranks, strict=True):
            w = (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)
            if nf4:
                q = quantize_nf4(w)
                w = QuantizedWeight(**{**q.__dict__, "dtype": dtype})
            ws.append(w)
            a_s.append((torch.randn(r, k, device=device) * k ** -0.5).to(ad).requires_grad_())
            b_s.append((torch.randn(n, r, device=device) * r ** -0.5).to(ad).requires_grad_())
            biases.append((torch.randn(n, device=device) * 0.1).to(dtype) if with_bias else None)
        scalings = [2.0, 0.5, 1.0][:len(outs)]
        return Sample(label, flat_args(x, ws, a_s, b_s, scalings, biases))

    if size == "real":
        return [make("llama8b q/k/v 4096 tok", 4096, 4096, (4096, 1024, 1024), (16, 16, 16)),
                make("llama8b gate/up", 4096, 4096, (14336, 14336), (16, 16)),
                make("llama8b q/k/v nf4", 4096, 4096, (4096, 1024, 1024), (16, 16, 16), nf4=True)]
    return [make("q/k/v 8x32->32/16/16 r4", 8, 32, (32, 16, 16), (4, 4, 4)),
            make("gate/up 5x24->40/40 r2", 5, 24, (40, 40), (2, 2)),
            make("1 row q/k/v", 1, 16, (16, 8, 8), (2, 2, 2)),
            make("odd 13x40->27/9/9 bias r3/5/1", 13, 40, (27, 9, 9), (3, 5, 1), with_bias=True),
            make("nf4 6x64->32/16/16", 6, 64, (32, 16, 16), (4, 4, 4), nf4=True),
            make("fp32 adapters gate/up", 5, 32, (16, 16), (4, 4), adapter_dtype=torch.float32)]


SPEC = OpSpec(
    name=OP,
    reference=reference,
    tolerances=MATMUL_TOLERANCES,
    check=check,
    fresh=fresh,
    samples=samples,
    differentiable=("x", *(f"{n}{i}" for i in range(SLOTS) for n in ("weight", "lora_a", "lora_b", "bias"))),
)


def lora_linear_group(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor | QuantizedWeight],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    biases: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """``tuple(ops.lora_linear(x, W_i, A_i, B_i, s_i, bias_i) for i)`` for 2 or 3 projections of one ``x``.

    x (..., K); W_i (N_i, K) dense or 4-bit; A_i (r_i, K); B_i (N_i, r_i); bias_i (N_i,) or None.
    Returns one (..., N_i) tensor per projection. Fused implementations read ``x`` once for every
    LoRA down-projection and sum the projections' input gradients inside one autograd node.
    """
    return call(SPEC, flat_args(x, weights, lora_as, lora_bs, scalings, biases))
