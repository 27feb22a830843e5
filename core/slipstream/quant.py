"""4-bit (NF4 / FP4) base weights in bitsandbytes' storage format, readable without bitsandbytes.

A :class:`QuantizedWeight` is a frozen view of what a bitsandbytes ``Params4bit`` stores: the packed
nibbles, the per-block absmax (optionally itself 8-bit quantised: "double quantisation") and the
16-entry code book. Kernels read these buffers directly; :meth:`QuantizedWeight.dequantize` is the
plain-PyTorch meaning they are checked against. No full-precision copy of the weight is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A (N, K) weight stored as 4-bit codes, blockwise-scaled.

    Attributes:
        packed: uint8, N*K/2 bytes; element ``2i`` in the high nibble, ``2i+1`` in the low one,
            row-major over the (N, K) weight.
        absmax: per block of ``blocksize`` consecutive elements: fp32 (nblocks,), or uint8 codes
            when ``nested_absmax`` is set (double quantisation).
        code: fp32 (16,), the value of each 4-bit code before scaling (NF4 or FP4 levels).
        blocksize: elements per absmax block (64 for bitsandbytes' default).
        shape: the logical (N, K).
        dtype: the dtype the weight dequantises to (bf16 / fp16 / fp32).
        quant_type: ``"nf4"`` or ``"fp4"``.
        nested_absmax, nested_code, nested_blocksize, nested_offset: the second-level
            quantisation of ``absmax`` (``absmax = nested_code[absmax] * nested_absmax[i // nested_blocksize]
            + nested_offset``), all ``None`` without double quantisation.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype
    quant_type: str = "nf4"
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int | None = None
    nested_offset: float | None = None

    def __post_init__(self) -> None:
        n, k = self.shape
        if self.packed.dtype != torch.uint8 or self.packed.numel() * 2 != n * k:
            raise ValueError(
                f"QuantizedWeight: `packed` must be uint8 with N*K/2 = {n * k // 2} bytes, got "
                f"{self.packed.dtype} with {self.packed.numel()}; is this a 4-bit bitsandbytes weight?"
            )
        blocks = -(-n * k // self.blocksize)
        if self.absmax.numel() != blocks:
            raise ValueError(f"QuantizedWeight: expected {blocks} absmax values for blocksize {self.blocksize}, "
                             f"got {self.absmax.numel()}; the quantisation state is corrupt")
        if self.code.numel() != 16:
            raise ValueError(f"QuantizedWeight: `code` must have 16 entries, got {self.code.numel()}")

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def requires_grad(self) -> bool:
        return False

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def block_scales(self) -> torch.Tensor:
        """fp32 (nblocks,) absmax, undoing the double quantisation if there is one."""
        if self.nested_absmax is None:
            return self.absmax.float()
        idx = torch.arange(self.absmax.numel(), device=self.absmax.device) // self.nested_blocksize
        return self.nested_code.float()[self.absmax.long()] * self.nested_absmax.float()[idx] + self.nested_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (N, K) weight in ``dtype`` (default: its own): ``code[nibble] * absmax[block]``."""
        n, k = self.shape
        flat = self.packed.reshape(-1)
        nibbles = torch.stack(((flat >> 4) & 0xF, flat & 0xF), dim=-1).reshape(-1).long()
        values = self.code.float().to(flat.device)[nibbles]
        scales = self.block_scales().repeat_interleave(self.blocksize)[: n * k]
        return (values * scales).reshape(n, k).to(dtype or self.dtype)

    @classmethod
    def from_bnb(cls, param: torch.Tensor, quant_state: object | None = None) -> QuantizedWeight:
        """Wrap a bitsandbytes ``Params4bit`` (or its data plus ``QuantState``) without copying."""
        state = quant_state if quant_state is not None else getattr(param, "quant_state", None)
        if state is None:
            raise ValueError("QuantizedWeight.from_bnb: the tensor has no `quant_state`; quantise it first "
                             "(move the bitsandbytes Params4bit to its device) or pass the QuantState")
        nested = getattr(state, "nested", False)
        state2 = getattr(state, "state2", None) if nested else None
        offset = getattr(state, "offset", None)
        return cls(
            packed=param.data if isinstance(param, torch.nn.Parameter) else param,
            absmax=state.absmax,
            code=state.code,
            blocksize=int(state.blocksize),
            shape=(int(state.shape[0]), int(state.shape[1])),
            dtype=state.dtype,
            quant_type=str(state.quant_type),
            nested_absmax=None if state2 is None else state2.absmax,
            nested_code=None if state2 is None else state2.code,
            nested_blocksize=None if state2 is None else int(state2.blocksize),
            nested_offset=None if state2 is None else float(offset),
        )


NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> QuantizedWeight:
    """Quantise a (N, K) weight to NF4 (single-level absmax) in plain PyTorch.

    For tests and benchmarks on machines without bitsandbytes; round-to-nearest code, the same
    storage layout as bitsandbytes so kernels cannot tell the two apart.
    """
    if weight.dim() != 2 or weight.numel() % 2:
        raise ValueError(f"quantize_nf4: need a 2-D weight with an even element count, got {tuple(weight.shape)}")
    n, k = weight.shape
    code = torch.tensor(NF4_CODE, device=weight.device, dtype=torch.float32)
    flat = weight.float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)
    normed = (blocks / absmax[:, None]).reshape(-1)[: flat.numel()]
    idx = (normed[:, None] - code[None, :]).abs().argmin(dim=1).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    return QuantizedWeight(packed=packed.contiguous(), absmax=absmax, code=code, blocksize=blocksize,
                           shape=(n, k), dtype=weight.dtype, quant_type="nf4")
