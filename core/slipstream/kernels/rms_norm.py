"""Triton RMSNorm: ``(offset + w) * x / sqrt(mean(x^2) + eps)`` over the last dim, forward and backward.

Layout: ``x`` (..., H) is viewed as (N, H) rows (a copy only when the rows can't be described by one
row stride with unit column stride); ``weight`` is (H,). All math is fp32; outputs are cast to the
input's dtype.

Forward: one pass. Each program normalises a (ROWS, BLOCK_H) tile (whole rows; BLOCK_H = next power
of two of H), reads ``x`` and ``w`` once, writes ``y`` and the per-row ``rstd`` (fp32, N floats) that
backward reuses, so backward never recomputes the row reduction over ``w``. ROWS > 1 only for small
H (e.g. Qwen3's per-head q/k norm, H = 128), so a program always moves a few KiB.

Backward: ``xhat = x * rstd``, ``g = dy * (w + offset)``,
``dx = rstd * (g - xhat * mean(g * xhat))``, ``dw = sum_rows(dy * xhat)``. A persistent grid of
about ``compute_units * k`` programs strides over row tiles, writes ``dx`` and accumulates its share
of ``dw`` in fp32 registers; the (programs, H) fp32 partials are summed by torch afterwards (a few
MB, against hundreds of MB of activations), so there are no atomics and the result is deterministic.
When ``weight`` is frozen (LoRA) no partials are kept and the grid is one program per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._aot import AotUnit, ptr
from slipstream.kernels._catalog import PortableKernel, launch_options

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_H = 32768
"""Largest hidden size handled: one row lives in registers (32768 fp32 = 64 per thread at 16 warps
of 32; beyond that the tile would spill, so larger H is left to other candidates)."""

CONFIGS: list[dict] = [
    {"num_warps": 8, "block": 4096},
    {"num_warps": 4, "block": 2048},
    {"num_warps": 16, "block": 8192},
    {"num_warps": 4, "block": 4096},
]
"""Tuning space. ``block``: target elements per program tile; rows per tile =
``max(1, block // next_pow2(H))`` (so it only matters for H < block). ``num_warps`` is a power of two
valid on 32-wide warps and 64-wide wavefronts (16 x 64 = 1024 threads, the AMD workgroup limit)."""


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _rms_norm_fwd(
    X,  # *in (N, H), row stride stride_x, unit column stride
    W,  # *w (H,)
    Y,  # *in (N, H), row stride stride_y
    RSTD,  # *fp32 (N,): 1 / sqrt(mean(x^2) + eps), saved for backward
    n_rows,
    n_cols,
    stride_x,
    stride_y,
    eps,  # fp32
    offset,  # fp32: 0 (Llama) or 1 (Gemma's 1 + w)
    ROWS: tl.constexpr,  # rows per program (power of two)
    BLOCK_H: tl.constexpr,  # next power of two of H
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (ROWS,)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd(
    DY,  # *in (N, H), row stride stride_dy
    X,  # *in (N, H), row stride stride_x
    W,  # *w (H,)
    RSTD,  # *fp32 (N,)
    DX,  # *in (N, H), row stride stride_dx (unused unless COMPUTE_DX)
    DW_PARTIAL,  # *fp32 (programs, H): this program's share of dw (unused unless COMPUTE_DW)
    n_rows,
    n_cols,
    stride_dy,
    stride_x,
    stride_dx,
    offset,  # fp32
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * ROWS
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < n_cols
    acc = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)  # dw partial, reduced over rows once at the end
    for start in range(pid * ROWS, n_rows, step):
        rows = start + tl.arange(0, ROWS).to(tl.int64)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        if COMPUTE_DW:
            acc += dy * xhat
        if COMPUTE_DX:
            # w reloaded per tile (an L1/L2 hit) instead of pinned in registers next to acc.
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
            g = dy * w[None, :]
            c = tl.sum(g * xhat, axis=1) / n_cols  # (ROWS,)
            dx = (g - xhat * c[:, None]) * rstd[:, None]
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, tl.sum(acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------- launch geometry
def _tile(n_cols: int, n_rows: int, config: dict) -> tuple[int, int]:
    """(ROWS, BLOCK_H) for a (n_rows, n_cols) input under ``config``."""
    block_h = triton.next_power_of_2(max(1, n_cols))
    rows = max(1, int(config.get("block", 4096)) // block_h)
    rows = min(rows, triton.next_power_of_2(max(1, n_rows)))
    return rows, block_h


def _bwd_programs(device: torch.device, n_tiles: int, num_warps: int, weight_grad: bool) -> int:
    """Backward grid: one program per tile, or (for dw partials) a persistent grid of a few programs
    per compute unit, ~32 warps resident per SM/CU, so the partials stay small."""
    if not weight_grad:
        return n_tiles
    from slipstream.device import device_info

    units = max(1, device_info(device).compute_units)
    per_unit = min(8, max(2, 32 // num_warps))
    return max(1, min(n_tiles, units * per_unit))


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``t`` as (N, n_cols) with unit column stride (a view when possible, else a copy)."""
    t2 = t.reshape(-1, n_cols)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, config: dict):
        n_cols = x.shape[-1]
        x2 = _as_rows(x, n_cols)
        w = weight.contiguous()
        n_rows = x2.shape[0]
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rows, block_h = _tile(n_cols, n_rows, config)
        if n_rows:
            _rms_norm_fwd[(triton.cdiv(n_rows, rows),)](
                x2, w, y, rstd, n_rows, n_cols, x2.stride(0), y.stride(0), float(eps), float(offset),
                ROWS=rows, BLOCK_H=block_h, num_warps=config["num_warps"], **launch_options(config),
            )
        ctx.save_for_backward(x2, w, rstd)
        ctx.offset = float(offset)
        ctx.config = config
        ctx.x_shape = x.shape
        ctx.weight_dtype = weight.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w, rstd = ctx.saved_tensors
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_rows, n_cols = x2.shape
        dx = dw = None
        if not n_rows:
            if want_dx:
                dx = torch.zeros(ctx.x_shape, dtype=x2.dtype, device=x2.device)
            if want_dw:
                dw = torch.zeros(n_cols, dtype=ctx.weight_dtype, device=x2.device)
            return dx, dw, None, None, None
        config = ctx.config
        dy2 = _as_rows(dy, n_cols)
        rows, block_h = _tile(n_cols, n_rows, config)
        n_tiles = triton.cdiv(n_rows, rows)
        programs = _bwd_programs(x2.device, n_tiles, config["num_warps"], want_dw)
        dx2 = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device) if want_dx else dy2
        partial = (torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device) if want_dw
                   else rstd)
        _rms_norm_bwd[(programs,)](
            dy2, x2, w, rstd, dx2, partial, n_rows, n_cols, dy2.stride(0), x2.stride(0), dx2.stride(0),
            ctx.offset, ROWS=rows, BLOCK_H=block_h, COMPUTE_DX=want_dx, COMPUTE_DW=want_dw,
            num_warps=config["num_warps"], **launch_options(config),
        )
        if want_dx:
            dx = dx2.view(ctx.x_shape)
        if want_dw:
            dw = partial.sum(0).to(ctx.weight_dtype)
        return dx, dw, None, None, None


# ----------------------------------------------------------------------------- public API
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, config: dict | None = None
) -> torch.Tensor:
    """RMS-normalise ``x`` (..., H) over H and scale by ``offset + weight`` (H,); same shape/dtype as ``x``.

    ``config``: one of :data:`CONFIGS` (``None``: the first). Differentiable in ``x`` and ``weight``.
    """
    return _RMSNorm.apply(x, weight, eps, offset, config or CONFIGS[0])


def accepts(x: object, weight: object, eps: float = 1e-6, offset: float = 0.0) -> bool:
    """Floating tensors of the supported dtypes, 1 <= H <= :data:`MAX_H`, ``weight`` (H,)."""
    return (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
            and x.dtype in DTYPES and weight.dtype in DTYPES and x.dim() >= 1 and weight.dim() == 1
            and 1 <= x.shape[-1] <= MAX_H and weight.shape[0] == x.shape[-1])


AOT_HIDDEN = (128, 4096, 16384)
"""Hidden sizes compiled ahead of time: per-head q/k norm, Llama-8B, Llama-405B (the widest tile)."""


def aot(config: dict, dtype: torch.dtype = torch.bfloat16) -> list[AotUnit]:
    """Every kernel ``config`` launches, for ``dtype`` activations and weight at :data:`AOT_HIDDEN`:
    forward, backward with dx and dw, backward with dx only (frozen weight, the LoRA case)."""
    p = ptr(dtype)
    options = {"num_warps": config["num_warps"]}
    units = []
    for hidden in AOT_HIDDEN:
        rows, block_h = _tile(hidden, 1 << 20, config)
        tile = {"ROWS": rows, "BLOCK_H": block_h}
        fwd = {"X": p, "W": p, "Y": p, "RSTD": "*fp32", "n_rows": "i32", "n_cols": "i32",
               "stride_x": "i32", "stride_y": "i32", "eps": "fp32", "offset": "fp32",
               "ROWS": "constexpr", "BLOCK_H": "constexpr"}
        units.append(AotUnit(f"rms_norm_fwd[H={hidden}]", _rms_norm_fwd, fwd, tile, options))
        bwd = {"DY": p, "X": p, "W": p, "RSTD": "*fp32", "DX": p, "DW_PARTIAL": "*fp32", "n_rows": "i32",
               "n_cols": "i32", "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32", "offset": "fp32",
               "ROWS": "constexpr", "BLOCK_H": "constexpr",
               "COMPUTE_DX": "constexpr", "COMPUTE_DW": "constexpr"}
        for want_dw in (True, False):
            units.append(AotUnit(f"rms_norm_bwd[H={hidden},dw={int(want_dw)}]", _rms_norm_bwd, bwd,
                                 {**tile, "COMPUTE_DX": True, "COMPUTE_DW": want_dw}, options))
    return units


KERNELS = [
    PortableKernel(
        op="rms_norm", name="rms_norm", fn=rms_norm, configs=CONFIGS, accepts=accepts, aot=aot,
        description="Triton RMSNorm: one-pass forward saving rstd, fused dx + partial-sum dw backward",
    )
]
