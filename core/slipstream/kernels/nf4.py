"""Triton dequantisation of 4-bit (NF4 / FP4) bitsandbytes weights.

:func:`dequantize` turns a :class:`~slipstream.quant.QuantizedWeight` into a dense (N, K) tensor
in bf16 / fp16 / fp32, reading the packed nibbles and the per-block absmax (single- or double-
quantised) directly: no bitsandbytes import, so it runs wherever Triton does.

The fused ``lora_linear`` uses it to materialise the base weight into a *temporary* buffer just
before a cuBLAS / hipBLAS GEMM and frees it right after, so a QLoRA layer never keeps a
full-precision copy of its weight alive between forward and backward (that copy is 4x the 4-bit
storage: 117 MB in bf16 for one Llama-8B MLP projection).

Layout (bitsandbytes'): the weight is flattened row-major; element ``2i`` is the high nibble of
byte ``i`` and ``2i+1`` its low nibble; element ``e`` belongs to absmax block ``e // blocksize``
(blocks may straddle rows when K is not a multiple of the blocksize). Each program handles
``BYTES`` consecutive packed bytes, i.e. ``BYTES // (blocksize / 2)`` whole absmax blocks, viewed
as a (blocks, blocksize/2) tile: contiguous 16-byte loads of the nibbles, one absmax (and one
nested lookup) per block row, and contiguous vector stores of the interleaved output.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from slipstream.kernels._aot import AotUnit, ptr
from slipstream.kernels._catalog import interpreter_on
from slipstream.quant import QuantizedWeight

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

DEFAULT_CONFIG = {"bytes": 2048, "num_warps": 4}
"""Per program: 2048 packed bytes = 4096 weights (64 NF4 blocks of 64); 4 warps give each thread
16 contiguous bytes to load (one 16-byte transaction) and 32 outputs to store."""


@triton.jit
def _dequant_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr, n_bytes,
                  n_blocks, nested_offset, pid, HALF_BLOCK: tl.constexpr, BLOCKS: tl.constexpr,
                  NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr,
                  MASKED: tl.constexpr):
    blk = pid * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,) absmax block indices, int64
    byte = blk[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]  # (BLOCKS, HALF_BLOCK) byte offsets
    out = blk[:, None] * (2 * HALF_BLOCK) + tl.arange(0, 2 * HALF_BLOCK)[None, :]
    if MASKED:  # the last program: a partial block and/or fewer than BLOCKS blocks
        q = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0)
        blk_mask = blk < n_blocks
        if DOUBLE_QUANT:
            a = tl.load(absmax_ptr + blk, mask=blk_mask, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + a)
            scale = scale * tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=blk_mask, other=0.0)
        else:
            scale = tl.load(absmax_ptr + blk, mask=blk_mask, other=0.0)
    else:  # whole blocks: no masks, so the nibbles load as 16-byte vectors and the output stores likewise
        q = tl.load(packed_ptr + byte)
        if DOUBLE_QUANT:
            scale = tl.load(nested_code_ptr + tl.load(absmax_ptr + blk).to(tl.int32))
            scale = scale * tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE)
        else:
            scale = tl.load(absmax_ptr + blk)
    if DOUBLE_QUANT:
        scale = scale + nested_offset
    scale = scale.to(tl.float32)
    hi = tl.load(code_ptr + (q >> 4).to(tl.int32)) * scale[:, None]
    lo = tl.load(code_ptr + (q & 15).to(tl.int32)) * scale[:, None]
    w = tl.reshape(tl.join(hi, lo), (BLOCKS, 2 * HALF_BLOCK))  # element 2i = high nibble of byte i
    if BF16_RNE_BY_HAND:
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        w = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    if MASKED:
        tl.store(out_ptr + out, w.to(out_ptr.dtype.element_ty), mask=out < 2 * n_bytes)
    else:
        tl.store(out_ptr + out, w.to(out_ptr.dtype.element_ty))


@triton.jit
def _dequant_kernel(
    packed_ptr,  # *u8 (n_bytes,): two codes per byte, high nibble first
    absmax_ptr,  # *fp32 (n_blocks,) or *u8 codes when DOUBLE_QUANT
    code_ptr,  # *fp32 (16,): value of each 4-bit code
    nested_absmax_ptr,  # *fp32: second-level scales (DOUBLE_QUANT only)
    nested_code_ptr,  # *fp32 (256,): second-level code book (DOUBLE_QUANT only)
    out_ptr,  # *out (2 * n_bytes,): the dense weight, row-major
    n_bytes,
    n_blocks,
    nested_offset,  # fp32, added to every dequantised absmax (DOUBLE_QUANT only)
    HALF_BLOCK: tl.constexpr,  # blocksize // 2: packed bytes per absmax block
    BLOCKS: tl.constexpr,  # absmax blocks per program
    NESTED_BLOCKSIZE: tl.constexpr,  # absmax values per nested scale
    DOUBLE_QUANT: tl.constexpr,
    BF16_RNE_BY_HAND: tl.constexpr,  # the CPU interpreter truncates fp32 -> bf16; GPUs round to nearest even
):
    pid = tl.program_id(0).to(tl.int64)
    if (pid + 1) * (BLOCKS * HALF_BLOCK) <= n_bytes:
        _dequant_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr, n_bytes,
                      n_blocks, nested_offset, pid, HALF_BLOCK, BLOCKS, NESTED_BLOCKSIZE, DOUBLE_QUANT,
                      BF16_RNE_BY_HAND, False)
    else:
        _dequant_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr, n_bytes,
                      n_blocks, nested_offset, pid, HALF_BLOCK, BLOCKS, NESTED_BLOCKSIZE, DOUBLE_QUANT,
                      BF16_RNE_BY_HAND, True)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(qw: QuantizedWeight) -> bool:
    """Whether :func:`dequantize` handles this weight's layout (power-of-two blocksizes, even N*K)."""
    if not isinstance(qw, QuantizedWeight) or qw.blocksize < 2 or not _is_pow2(qw.blocksize):
        return False
    if qw.double_quant and (qw.nested_blocksize is None or not _is_pow2(qw.nested_blocksize)):
        return False
    if qw.double_quant and qw.absmax.dtype != torch.uint8:
        return False
    return qw.packed.is_contiguous() and qw.absmax.is_contiguous()


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None,
               config: dict | None = None) -> torch.Tensor:
    """The dense (N, K) weight of ``qw`` in ``dtype`` (default: ``qw.dtype``).

    Bit-identical to :meth:`QuantizedWeight.dequantize` (``code[nibble] * absmax`` in fp32, one
    rounding to ``dtype``); on GPUs the double-quantised absmax ``nested_code[q] * s + offset``
    may be contracted into an FMA (one fp32 ulp of the scale). ``out``: a contiguous (N, K)
    buffer of ``dtype`` to write into (saves an allocation). ``config``: ``{"bytes": packed
    bytes per program, "num_warps": ...}``.

    A QLoRA step dequantises every projection three times (forward, recompute, backward), so the
    launch arguments are worked out once per weight, dtype and config and reused (:func:`_launch_plan`).
    """
    dtype = dtype or qw.dtype
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    plan = _launch_plan(qw, dtype, int(cfg["bytes"]), int(cfg["num_warps"]))
    n, k = qw.shape
    if out is None:
        out = torch.empty((n, k), device=qw.device, dtype=dtype)
    elif out.shape != (n, k) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"nf4.dequantize: `out` must be a contiguous ({n}, {k}) {dtype} tensor")
    if plan is not None:
        grid, before, after, constexprs = plan
        _dequant_kernel[grid](*before, out, *after, **constexprs)
    return out


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _launch_plan(qw: QuantizedWeight, dtype: torch.dtype, n_bytes_per_program: int, num_warps: int
                 ) -> tuple | None:
    """``(grid, arguments before out, arguments after out, constexprs)`` for dequantising ``qw`` to
    ``dtype``, checked and cached per weight (``None``: an empty weight, nothing to launch)."""
    key = (dtype, n_bytes_per_program, num_warps, interpreter_on())
    plans = _PLANS.get(qw)
    if plans is not None and key in plans:
        return plans[key]
    if dtype not in OUT_DTYPES:
        raise TypeError(f"nf4.dequantize: output dtype must be one of {OUT_DTYPES}, got {dtype}")
    if not supports(qw):
        raise ValueError(f"nf4.dequantize: unsupported layout (blocksize {qw.blocksize}, nested blocksize "
                         f"{qw.nested_blocksize}, contiguous {qw.packed.is_contiguous()}); "
                         "use qw.dequantize()")
    n, k = qw.shape
    n_bytes = n * k // 2
    plan = None
    if n_bytes:
        n_blocks = qw.absmax.numel()
        blocks = max(1, n_bytes_per_program // (qw.blocksize // 2))
        code = qw.code.float()
        if qw.double_quant:
            nested_absmax, nested_code = qw.nested_absmax.float(), qw.nested_code.float()  # no-ops when fp32
            offset, nested_bs = float(qw.nested_offset or 0.0), int(qw.nested_blocksize)
            absmax = qw.absmax
        else:
            absmax = qw.absmax.float()
            nested_absmax, nested_code, offset, nested_bs = absmax, code, 0.0, 1
        grid = (triton.cdiv(n_blocks, blocks),)
        constexprs = dict(HALF_BLOCK=qw.blocksize // 2, BLOCKS=blocks, NESTED_BLOCKSIZE=nested_bs,
                          DOUBLE_QUANT=qw.double_quant,
                          BF16_RNE_BY_HAND=dtype == torch.bfloat16 and interpreter_on(), num_warps=num_warps)
        plan = (grid, (qw.packed, absmax, code, nested_absmax, nested_code), (n_bytes, n_blocks, offset), constexprs)
    _PLANS.setdefault(qw, {})[key] = plan
    return plan


def aot_units(config: dict | None = None, blocksize: int = 64) -> list[AotUnit]:
    """The dequantisation launches a config makes, for ahead-of-time compilation.

    One unit per (output dtype, double quantisation) pair that training meets: bf16 and fp16
    outputs from double-quantised NF4 (bitsandbytes' QLoRA default), plus single-level bf16 and fp32.
    """
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    blocks = max(1, int(cfg["bytes"]) // (blocksize // 2))
    units = []
    for dtype, double in ((torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False),
                          (torch.float32, False)):
        signature = {"packed_ptr": "*u8", "absmax_ptr": "*u8" if double else "*fp32", "code_ptr": "*fp32",
                     "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "out_ptr": ptr(dtype),
                     "n_bytes": "i32", "n_blocks": "i32", "nested_offset": "fp32", "HALF_BLOCK": "constexpr",
                     "BLOCKS": "constexpr", "NESTED_BLOCKSIZE": "constexpr", "DOUBLE_QUANT": "constexpr",
                     "BF16_RNE_BY_HAND": "constexpr"}
        constexprs = {"HALF_BLOCK": blocksize // 2, "BLOCKS": blocks,
                      "NESTED_BLOCKSIZE": 256 if double else 1, "DOUBLE_QUANT": double,
                      "BF16_RNE_BY_HAND": False}
        units.append(AotUnit(f"nf4_dequant[{ptr(dtype)[1:]},{'dq' if double else 'sq'},bs{blocksize},"
                             f"bytes{cfg['bytes']}]", _dequant_kernel, signature, constexprs,
                             {"num_warps": int(cfg["num_warps"])}))
    return units
