"""Triton gated MLP activations: ``swiglu = silu(gate) * up`` and ``geglu = gelu(gate) * up``.

Both are one elementwise kernel pair, specialised on the activation (``ACT``: 0 silu, 1 exact erf
GELU, 2 tanh GELU). Forward reads ``gate`` and ``up`` once and writes only the product: the
activation is never stored. Backward saves only the inputs and recomputes the activation and its
derivative in registers::

    d_gate = d_out * up * act'(gate)        d_up = d_out * act(gate)

so it reads 3 and writes 2 tensors, the minimum for an out-of-place backward. All math is fp32.

Layout: (..., I) tensors are processed as rows of I columns with one row stride each (so the
halves of a fused ``gate_up`` projection, ``gate_up[..., :I]`` / ``gate_up[..., I:]``, are read in
place), or as one flat row when every operand is contiguous. The 1-D grid covers
(row, column block) pairs; each program handles ``BLOCK`` contiguous elements (16-byte vector
loads at 4 warps / 1024 elements in bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._aot import AotUnit, ptr
from slipstream.kernels._catalog import PortableKernel, launch_options
from slipstream.ops.hints import inputs_may_be_overwritten

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SILU, GELU_ERF, GELU_TANH = 0, 1, 2
ACTS = {"none": GELU_ERF, "tanh": GELU_TANH}

CONFIGS: list[dict] = [
    {"num_warps": 4, "block": 1024},
    {"num_warps": 8, "block": 2048},
    {"num_warps": 4, "block": 2048},
    {"num_warps": 8, "block": 4096},
]
"""Tuning space. ``block``: elements per program (capped at the next power of two of the row
length); ``num_warps`` a power of two valid for 32-wide warps and 64-wide wavefronts."""


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _tanh(z):
    """tanh through the sigmoid (``tl`` has no portable tanh): 2 * sigmoid(2z) - 1, no overflow."""
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _act(g, ACT: tl.constexpr):
    """act(g) in fp32."""
    if ACT == 0:
        a = g * tl.sigmoid(g)
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:
        a = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    return a


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # Phi(g) + g * phi(g)
    else:
        k = 0.7978845608028654  # sqrt(2 / pi)
        t = _tanh(k * (g + 0.044715 * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * g * g)
    return a, da


@triton.jit
def _glu_fwd(
    G, U,  # *in (rows, n_cols), row strides stride_g / stride_u, unit column stride
    O,  # *in (rows, n_cols) contiguous
    n_cols, n_col_blocks, stride_g, stride_u,
    ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_col_blocks
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + row * n_cols + cols, (_act(g, ACT) * u).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd(
    DO, G, U,  # *in (rows, n_cols), row strides stride_do / stride_g / stride_u
    DG, DU,  # *in (rows, n_cols) contiguous (each written only if its COMPUTE_* is set)
    n_cols, n_col_blocks, stride_do, stride_g, stride_u,
    ACT: tl.constexpr, BLOCK: tl.constexpr, COMPUTE_DG: tl.constexpr, COMPUTE_DU: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_col_blocks
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    do = tl.load(DO + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    out = row * n_cols + cols
    if COMPUTE_DG:
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, ACT)
        tl.store(DG + out, (do * u * da).to(DG.dtype.element_ty), mask=mask)
    else:
        a = _act(g, ACT)
    if COMPUTE_DU:
        tl.store(DU + out, (do * a).to(DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launcher
def _rows(tensors: list[torch.Tensor], n_cols: int) -> tuple[list[torch.Tensor], int]:
    """The operands as (rows, cols) with unit column stride, and cols: one flat row when all are
    contiguous, else (N, n_cols) views (copies only where a view can't be made)."""
    numel = tensors[0].numel()
    if all(t.is_contiguous() for t in tensors):
        return [t.view(1, numel) for t in tensors], numel
    out = []
    for t in tensors:
        t2 = t.reshape(-1, n_cols)
        out.append(t2 if t2.stride(-1) == 1 or n_cols == 1 else t2.contiguous())
    return out, n_cols


def _grid(n_rows: int, n_cols: int, config: dict) -> tuple[int, int]:
    """(BLOCK, column blocks per row)."""
    block = min(int(config.get("block", 1024)), triton.next_power_of_2(max(1, n_cols)))
    return block, triton.cdiv(n_cols, block)


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: int, config: dict):
        n_cols = gate.shape[-1] if gate.dim() else 1
        (g2, u2), cols = _rows([gate, up], n_cols)
        n_rows = g2.shape[0]
        out = torch.empty((n_rows, cols), dtype=gate.dtype, device=gate.device)
        if gate.numel():
            block, n_blocks = _grid(n_rows, cols, config)
            _glu_fwd[(n_rows * n_blocks,)](
                g2, u2, out, cols, n_blocks, g2.stride(0), u2.stride(0), ACT=act, BLOCK=block,
                num_warps=config["num_warps"], **launch_options(config),
            )
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.config = act, config
        # d(gate), d(up) over gate and up (ops.hints): element-wise, each program reads its block before
        # writing it. Only into contiguous, separate buffers that an op produced (never a user's leaf).
        ctx.overwrite = (inputs_may_be_overwritten() and gate.grad_fn is not None and up.grad_fn is not None
                         and gate.is_contiguous() and up.is_contiguous()
                         and gate.untyped_storage().data_ptr() != up.untyped_storage().data_ptr())
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        want_g, want_u = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.overwrite:
            dg, du = (gate.detach() if want_g else None), (up.detach() if want_u else None)
        else:
            dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if want_g else None
            du = torch.empty(up.shape, dtype=up.dtype, device=up.device) if want_u else None
        if gate.numel() and (want_g or want_u):
            n_cols = gate.shape[-1] if gate.dim() else 1
            (do2, g2, u2), cols = _rows([dout, gate, up], n_cols)
            n_rows = g2.shape[0]
            block, n_blocks = _grid(n_rows, cols, ctx.config)
            dg_arg = dg if want_g else du
            du_arg = du if want_u else dg
            _glu_bwd[(n_rows * n_blocks,)](
                do2, g2, u2, dg_arg, du_arg, cols, n_blocks, do2.stride(0), g2.stride(0), u2.stride(0),
                ACT=ctx.act, BLOCK=block, COMPUTE_DG=want_g, COMPUTE_DU=want_u,
                num_warps=ctx.config["num_warps"], **launch_options(ctx.config),
            )
        if ctx.overwrite:  # a later reader of the saved gate / up (retain_graph) fails instead of reading gradients
            for t in (dg, du):
                if t is not None:
                    torch.autograd.graph.increment_version(t)
        return dg, du, None, None


# ----------------------------------------------------------------------------- public API
def swiglu(gate: torch.Tensor, up: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """``silu(gate) * up`` for (..., I) tensors of one shape and dtype; same shape/dtype out.

    ``config``: one of :data:`CONFIGS` (``None``: the first). Differentiable in ``gate`` and ``up``.
    """
    return _GLU.apply(gate, up, SILU, config or CONFIGS[0])


def geglu(
    gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", config: dict | None = None
) -> torch.Tensor:
    """``gelu(gate, approximate) * up`` (``"none"``: erf, ``"tanh"``: tanh form); see :func:`swiglu`."""
    if approximate not in ACTS:
        raise ValueError(f"geglu: `approximate` must be one of {tuple(ACTS)}, got {approximate!r}")
    return _GLU.apply(gate, up, ACTS[approximate], config or CONFIGS[0])


def _accepts_pair(gate: object, up: object) -> bool:
    return (isinstance(gate, torch.Tensor) and isinstance(up, torch.Tensor) and gate.dtype in DTYPES
            and up.dtype == gate.dtype and gate.shape == up.shape)


def accepts_swiglu(gate: object, up: object) -> bool:
    """Same-shape, same-dtype fp32/bf16/fp16 ``gate`` and ``up``."""
    return _accepts_pair(gate, up)


def accepts_geglu(gate: object, up: object, approximate: str = "none") -> bool:
    """As :func:`accepts_swiglu`, with ``approximate`` in ``("none", "tanh")``."""
    return _accepts_pair(gate, up) and approximate in ACTS


def _aot(acts: tuple[int, ...], config: dict, dtype: torch.dtype) -> list[AotUnit]:
    p = ptr(dtype)
    options = {"num_warps": config["num_warps"]}
    fwd = {"G": p, "U": p, "O": p, "n_cols": "i32", "n_col_blocks": "i32", "stride_g": "i32",
           "stride_u": "i32", "ACT": "constexpr", "BLOCK": "constexpr"}
    bwd = {"DO": p, "G": p, "U": p, "DG": p, "DU": p, "n_cols": "i32", "n_col_blocks": "i32",
           "stride_do": "i32", "stride_g": "i32", "stride_u": "i32", "ACT": "constexpr", "BLOCK": "constexpr",
           "COMPUTE_DG": "constexpr", "COMPUTE_DU": "constexpr"}
    block = int(config["block"])
    units = []
    for act in acts:
        units.append(AotUnit(f"glu_fwd[act={act}]", _glu_fwd, fwd, {"ACT": act, "BLOCK": block}, options))
        both = {"ACT": act, "BLOCK": block, "COMPUTE_DG": True, "COMPUTE_DU": True}
        units.append(AotUnit(f"glu_bwd[act={act}]", _glu_bwd, bwd, both, options))
    return units


def aot_swiglu(config: dict, dtype: torch.dtype = torch.bfloat16) -> list[AotUnit]:
    """Forward and backward (both grads) of silu for ``dtype`` operands."""
    return _aot((SILU,), config, dtype)


def aot_geglu(config: dict, dtype: torch.dtype = torch.bfloat16) -> list[AotUnit]:
    """Forward and backward (both grads) of erf and tanh GELU for ``dtype`` operands."""
    return _aot((GELU_ERF, GELU_TANH), config, dtype)


KERNELS = [
    PortableKernel(
        op="swiglu", name="swiglu", fn=swiglu, configs=CONFIGS, accepts=accepts_swiglu, aot=aot_swiglu,
        description="Triton SwiGLU: output-only forward, backward recomputes silu from gate/up",
    ),
    PortableKernel(
        op="geglu", name="geglu", fn=geglu, configs=CONFIGS, accepts=accepts_geglu, aot=aot_geglu,
        description="Triton GeGLU (erf / tanh): output-only forward, backward recomputes gelu from gate/up",
    ),
]
