"""Fused LoRA linear: ``y = x @ W.T + bias + scaling * (x @ A.T) @ B.T`` with a hand-derived backward.

Shapes: ``x`` (..., K) flattened to (M, K); base weight ``W`` (N, K), dense or a 4-bit
:class:`~slipstream.quant.QuantizedWeight` (NF4/FP4, bitsandbytes layout); ``A`` (r, K); ``B`` (N, r);
``bias`` (N,). ``r`` is small (8-64), so everything LoRA adds is memory-bound next to the base GEMM;
the whole design is about how few times the big (M, K) and (M, N) tensors are read and written.

Forward (one autograd node instead of peft's five):
  1. ``W`` is materialised in ``x``'s dtype into a *temporary* (a dense weight of that dtype is used
     as is; a 4-bit one is dequantised by :mod:`slipstream.kernels.nf4`), used by one GEMM and
     freed: a QLoRA layer never keeps a full-precision copy of its weight alive between forward and
     backward (for a Llama-8B MLP projection that copy is 117 MB of bf16 per layer).
  2. ``xa = x @ A.T`` (M, r): one read of ``x``.
  3. ``out = bias + scaling * xa @ B.T``: a K = r GEMM that only writes (M, N).
  4. ``out += x @ W.T``: the cuBLAS / hipBLAS base GEMM accumulating onto it (beta = 1). It is
     compute-bound, so reading ``out`` in its epilogue is nearly free; adding the LoRA term after the
     base GEMM instead costs one more memory-bound read and write of (M, N) (H100, gate/up shape:
     1.10x the bare base GEMM this way, 1.21x the other; peft reads/writes (M, N) three more times).
  The ``"triton"`` base (see :data:`CONFIGS`) instead runs steps 3+4 as one Triton GEMM whose epilogue
  adds ``xa @ (scaling * B).T`` and the bias from registers: the (M, N) output is written once.

Under :func:`slipstream.ops.hints.output_values_unused` (a checkpointed layer's recompute, where
the caller never reads this output) steps 1, 3 and 4 are skipped: the output is left uninitialised
and only ``xa``, which ``dB`` needs, is computed.

Saved for backward: ``x`` (needed by ``dA`` and a dense ``dW``), ``xa`` (M, r) and references to ``W``,
``A`` and ``B``; never a dequantised ``W``, never (M, N) activations.

Backward, with ``dY`` (M, N):
  ``dYB = dY @ B`` (M, r)                          one read of ``dY``
  ``dX  = dY @ W + scaling * dYB @ A``             ``W`` re-materialised into a temporary; the LoRA
                                                   term written first, the base GEMM accumulating onto
                                                   it (or both in the Triton epilogue)
  ``dA  = scaling * dYB.T @ x``  (r, K)            one read of ``x``
  ``dB  = scaling * dY.T @ xa``  (N, r)            one read of ``dY``
  ``dW  = dY.T @ x``                               only for a dense ``W`` that requires grad
  ``dbias = sum_rows(dY)``                         only if ``bias`` requires grad
The ``"fused"`` base runs each direction of a projection as one Triton GEMM (``_lora_gemm_kernel``):
the epilogue adds the rank-r product (``xa @ B.T`` forward, ``dYB @ A`` backward) and, backward,
writes per-row-tile partials of ``dYB.T @ x`` from the x tile at the dX tile's position (a small sum
finishes dA). ``xa`` and ``dYB`` come from skinny GEMMs or accumulate in the main loop (config
``xa``/``dyb``, see :data:`CONFIGS`). Under :func:`slipstream.ops.hints.inputs_expire_in_backward` dX
is written over x (each tile reads its x tile before storing there). A 4-bit base cut into row
pieces (below) takes the cuBLAS way.
Each product runs only when its input requires grad. Adapters may be fp32 under a bf16/fp16 ``x``
(peft's default): the (M, ·) products run in ``x``'s dtype on tensor cores with fp32 accumulation
(``A``/``B`` are cast, r x K and N x r elements) and the adapter gradients are returned in the
adapter's dtype.

:func:`lora_linear_group` does the same for projections that share their input (q/k/v, gate/up):
one GEMM ``x @ cat(A_i).T`` for all LoRA down-projections, one ``dX`` LoRA term
``dYB_all @ cat(s_i A_i)`` and one ``dA_all = dYB_all.T @ x``, so ``x`` is read once per pass
instead of once per projection. :func:`lora_linear_group_op` is its entry for the ``lora_linear_group``
op (flat argument slots, see :mod:`slipstream.ops.lora_linear_group`), registered with the same tuning
space, kernels and input predicate (applied to every projection) as ``lora_linear``.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

try:  # host-side tensor descriptors (Triton >= 3.4); without them every launch uses pointer tiles
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

from slipstream.kernels import nf4
from slipstream.kernels._aot import AotUnit, ptr
from slipstream.kernels._casts import ADAPTER_CASTS, TAKE, forward_use
from slipstream.kernels._catalog import PortableKernel, interpreter_on, launch_options
from slipstream.ops.hints import inputs_may_be_overwritten, output_values_are_unused
from slipstream.ops.lora_linear_group import projections
from slipstream.quant import QuantizedWeight

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

CONFIGS: list[dict] = [
    {"base": "cublas", "bytes": 2048, "num_warps": 4},
    {"base": "cublas", "bytes": 4096, "num_warps": 8},
    {"base": "triton", "bytes": 2048, "num_warps": 4, "block_m": 128, "block_n": 128, "block_k": 64,
     "gemm_warps": 8, "stages": 4, "group_m": 8},
    {"base": "fused", "bytes": 4096, "num_warps": 8, "block_m": 128, "block_n": 256, "block_k": 64,
     "gemm_warps": 8, "stages": 4, "group_m": 8, "tma": True, "xa": "mm", "dyb": "mm"},
    {"base": "fused", "bytes": 4096, "num_warps": 8, "block_m": 128, "block_n": 256, "block_k": 64,
     "gemm_warps": 8, "stages": 4, "group_m": 8, "tma": True, "dyb": "mm"},
]
"""Tuning space. ``base``: ``"cublas"`` runs the base GEMM with the vendor BLAS and accumulates the
LoRA term in place (``addmm_``, one extra read+write of the output); ``"triton"`` runs a Triton GEMM
that adds the LoRA term and bias in its epilogue (output written once); ``"fused"`` also takes the
LoRA work into that GEMM: ``x @ A.T`` in its forward main loop from the x tiles it loads (``xa``:
``"loop"``, default) or from a separate skinny GEMM (``"mm"``), the same choice for the backward's
``dY @ B`` (``dyb``: ``"loop"``, default, or ``"mm"``), the rank-r product ``L @ F`` in the epilogue,
and the ``dA`` partials from the x tile at each dX tile's position (dX may overwrite x). H100 (torch
2.11, Triton 3.6, bf16): the Triton GEMM with only the epilogue's rank-r product is 1.05x cuBLAS in
both directions at 4096^3 (``benchmarks/gpu/gemm_tiles.py``), but a rank-r product in the main loop
costs ~26 us forward and ~40 us backward there, more than the skinny GEMM it saves; so the
registered fused configs take ``dY @ B`` by a GEMM, with ``x @ A.T`` by a GEMM or in the loop. Whole
``lora_linear`` fwd+bwd over the base GEMM pair, r=16, 4096 tokens (``lora_fused_probe.py``, each config
timed right after the base): q/o 1.28x against the cuBLAS path's 1.34x, k/v 1.61x against 1.94x,
gate/up 1.14x against 1.13x, down 1.07x against 1.11x; the tuner picks per shape bucket.
``bytes``/``num_warps``: the NF4 dequantisation kernel (packed bytes per program, warps).
``block_*``/``gemm_warps``/``stages``/``group_m``: the Triton GEMM; ``tma``: its A and W tiles fetched
through tensor descriptors (NVIDIA Hopper's copy engine; 16-bit activations only, pointers otherwise);
``db``: ``"mm"`` (default, a separate GEMM) or ``"fused"`` (partials from the dX GEMM's first column
tiles: one read of dY less, but a transposed product in those tiles' main loop; H100: slower)."""


# ----------------------------------------------------------------------------- Triton GEMM + LoRA in one pass
@triton.jit
def _lora_gemm_kernel(
    a_ptr,  # *T (M, R), unit column stride, row stride s_am: x (forward) or dY (backward); TMA: a descriptor
    w_ptr,  # *T base weight read as op(W)[k, n] = w_ptr[k * s_wk + n * s_wn]: W.T (forward), W (backward);
            # TMA: a descriptor of W (N, K), blocks (BLOCK_N, BLOCK_K) forward, (BLOCK_K, BLOCK_N) backward
    c_ptr,  # *T (M, NOUT) output, unit column stride, row stride s_cm
    f1_ptr,  # *T LoRA factor in the main loop, F1[k, r] = f1_ptr[k * s_f1k + r * s_f1r]: A.T / B
    f2_ptr,  # *T LoRA factor in the epilogue, F2[r, n] = f2_ptr[r * s_f2r + n * s_f2n]: B.T / A
    l_ptr,  # *T (M, RANK) L = A @ F1, row stride s_lm: read (L_IN) or written by column-tile 0 (STORE_L)
    e_ptr,  # *T (M, NOUT) unit column stride, row stride s_em: x for dA partials (E_PART)
    pe_ptr,  # *fp32 (cdiv(M, BLOCK_M), RANK, NOUT): per-row-tile L.T @ E (E_PART)
    g_ptr,  # *T (M, RANK) row stride s_gm: xa for dB partials (G_PART)
    pg_ptr,  # *fp32 (cdiv(M, BLOCK_M), R, RANK): per-row-tile A.T @ G (G_PART)
    bias_ptr,  # *T (NOUT,) (HAS_BIAS)
    M, NOUT, R, RANK,
    s_am, s_wk, s_wn, s_cm, s_f1k, s_f1r, s_f2r, s_f2n, s_lm, s_em, s_gm,
    alpha,  # fp32 scale of the LoRA term in C
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    L_IN: tl.constexpr,  # L is given; else computed in the main loop from the A tiles already loaded
    STORE_L: tl.constexpr, E_PART: tl.constexpr, G_PART: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    EVEN_K: tl.constexpr,  # R % BLOCK_K == 0: the main loop needs no masks along K
    EVEN_MN: tl.constexpr,  # M % BLOCK_M == 0 and NOUT % BLOCK_N == 0: no partial output tiles
    TMA: tl.constexpr,  # a_ptr and w_ptr are tensor descriptors (tiles fetched by the copy engine)
    W_KMAJOR: tl.constexpr,  # TMA only: op(W) = W.T (forward); else op(W) = W
    UPCAST: tl.constexpr,  # CPU interpreter only: its tl.dot misreads bf16 operands, so feed it fp32
):
    """``C (+)= A @ op(W) + alpha * L @ F2 (+ bias)`` with ``L = A @ F1`` accumulated in the same main
    loop as the base product (one read of ``A`` for both), fp32 accumulation, C stored once. Optional
    by-products for the LoRA gradients: ``L`` itself, ``L.T @ E`` and ``A.T @ G`` per row tile."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(NOUT, BLOCK_N)
    width = GROUP_M * grid_n  # grouped ordering: GROUP_M row tiles reuse each column tile from L2
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_in = offs_m < M
    n_in = offs_n < NOUT
    r_in = offs_r < RANK
    if EVEN_MN:  # no partial tiles: the offsets keep their contiguity (vector loads in the epilogue)
        rows = offs_m.to(tl.int64)
        cols = offs_n.to(tl.int64)
    else:  # clamped: epilogue loads stay in bounds, stores are masked
        rows = tl.where(m_in, offs_m, 0).to(tl.int64)
        cols = tl.where(n_in, offs_n, 0).to(tl.int64)
    if not TMA:
        # the tile's origin in 64-bit scalars, the (BLOCK, BLOCK_K) offsets in 32 bits from aranges: the
        # compiler keeps their contiguity (16-byte vector loads) and few registers per pointer
        lm = tl.arange(0, BLOCK_M)
        ln = tl.arange(0, BLOCK_N)
        a_ptrs = a_ptr + m0.to(tl.int64) * s_am + (lm[:, None] * s_am + offs_k[None, :])
        b_ptrs = w_ptr + n0.to(tl.int64) * s_wn + (offs_k[:, None] * s_wk + ln[None, :] * s_wn)
        a_rows_ok = (lm < M - m0)[:, None]
        b_cols_ok = (ln < NOUT - n0)[None, :]
    f1_ptrs = f1_ptr + offs_k[:, None] * s_f1k + offs_r[None, :] * s_f1r
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if G_PART:
        g = tl.load(g_ptr + rows[:, None] * s_gm + offs_r[None, :], mask=m_in[:, None] & r_in[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
        pg_tile = pg_ptr + pid_m.to(tl.int64) * R * RANK + offs_k[:, None] * RANK + offs_r[None, :]
    for k in range(0, tl.cdiv(R, BLOCK_K)):
        k_left = R - k * BLOCK_K
        if TMA:  # out-of-bounds rows/columns of a tile arrive as zeros: no masks
            a = a_ptr.load([m0, k * BLOCK_K])
            if W_KMAJOR:  # W (N, K) tile (BLOCK_N, BLOCK_K) -> op(W) = W.T
                b = w_ptr.load([n0, k * BLOCK_K]).T
            else:
                b = w_ptr.load([k * BLOCK_K, n0])
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=a_rows_ok, other=0.0)
            b = tl.load(b_ptrs, mask=b_cols_ok, other=0.0)
        else:
            a = tl.load(a_ptrs, mask=a_rows_ok & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=b_cols_ok & (offs_k[:, None] < k_left), other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        if not L_IN:
            f1 = tl.load(f1_ptrs, mask=r_in[None, :] & (offs_k[:, None] < k_left), other=0.0)
            if UPCAST:
                f1 = f1.to(tl.float32)
            lacc = tl.dot(a, f1, lacc)
            f1_ptrs += BLOCK_K * s_f1k
        if G_PART:
            if pid_n == 0:  # one column tile per row tile writes the (R, RANK) partial
                tl.store(pg_tile, tl.dot(tl.trans(a), g), mask=(offs_k[:, None] < k_left) & r_in[None, :])
            pg_tile += BLOCK_K * RANK
        if not TMA:
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * s_wk

    if L_IN:
        lo = tl.load(l_ptr + rows[:, None] * s_lm + offs_r[None, :], mask=r_in[None, :], other=0.0)
    else:
        lo = lacc.to(l_ptr.dtype.element_ty)  # rounded as a separate GEMM's output would be
        if STORE_L:  # noqa: SIM102 - a constexpr test around a runtime one: Triton folds the outer away
            if pid_n == 0:
                tl.store(l_ptr + rows[:, None] * s_lm + offs_r[None, :], lo, mask=m_in[:, None] & r_in[None, :])
    if UPCAST:
        lo = lo.to(tl.float32)
    ro = tl.load(f2_ptr + offs_r[:, None] * s_f2r + cols[None, :] * s_f2n, mask=r_in[:, None], other=0.0)
    # alpha on the (BLOCK_M, RANK) side and the product accumulated into acc: a second (BLOCK_M, BLOCK_N)
    # fp32 temporary would double the accumulator's registers (spills at 128 x 256)
    if UPCAST:
        ro = ro.to(tl.float32)
    acc = tl.dot((lo.to(tl.float32) * alpha).to(ro.dtype), ro, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rows[:, None] * s_cm + offs_n[None, :]
    mask = m_in[:, None] & n_in[None, :]
    if E_PART:  # read before C is stored: C may be E's own memory (dX written over x)
        e = tl.load(e_ptr + rows[:, None] * s_em + cols[None, :])
        if UPCAST:
            e = e.to(tl.float32)
        part = tl.dot(tl.trans(tl.where(m_in[:, None], lo, 0.0).to(e.dtype)), e)
        tl.store(pe_ptr + pid_m.to(tl.int64) * RANK * NOUT + offs_r[:, None] * NOUT + offs_n[None, :], part,
                 mask=r_in[:, None] & n_in[None, :])
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _gemm_lora(a: torch.Tensor, w: torch.Tensor, left: torch.Tensor, f: torch.Tensor, alpha: float,
               bias: torch.Tensor | None, cfg: dict, *, forward: bool, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Forward: ``a @ w.T + alpha * left @ f.T (+ bias)`` with ``f = B`` (N, r); backward:
    ``a @ w + alpha * left @ f`` with ``f = A`` (r, K); ``+ out`` in place when ``out`` is given.
    Every operand is 2-D row-major (unit column stride) with any leading dimension."""
    a, w, left, f = (_unit_stride(t) for t in (a, w, left, f))
    return _launch(a, w, cfg, forward=forward, lora_f2=f, alpha=alpha, left=left, bias=bias, out=out,
                   accumulate=out is not None).out


@dataclasses.dataclass
class _Fused:
    """What one :func:`_launch` returns: the output and the by-products asked for."""

    out: torch.Tensor
    left: torch.Tensor | None = None  # (M, r) L = a @ F1, when written (``left_out``)
    e_part: torch.Tensor | None = None  # (row tiles, r, NOUT) fp32
    g_part: torch.Tensor | None = None  # (row tiles, R, r) fp32


def _tma_ok(cfg: dict, a: torch.Tensor, w: torch.Tensor, tiles: tuple[int, int, int]) -> bool:
    """The config asks for tensor-descriptor (TMA) tiles and ``a``, ``w`` allow them: 16-bit floats
    (fp32 would be multiplied in TF32), 16-byte aligned bases and row strides, a GPU device (or the
    interpreter), and whole tiles (``tiles``: BLOCK_M for a's rows and the two tile sizes for W's)."""
    if not cfg.get("tma") or TensorDescriptor is None or (a.device.type == "cpu" and not interpreter_on()):
        return False
    if any(size % tile for size, tile in zip((a.shape[0], *w.shape), tiles, strict=True)):
        return False
    return all(t.dtype in (torch.bfloat16, torch.float16) and t.data_ptr() % 16 == 0 and (t.stride(0) * 2) % 16 == 0
               for t in (a, w))


def _launch(a: torch.Tensor, w: torch.Tensor, cfg: dict, *, forward: bool, lora_f2: torch.Tensor, alpha: float,
            left: torch.Tensor | None = None, lora_f1: torch.Tensor | None = None,
            left_out: torch.Tensor | None = None, e: torch.Tensor | None = None, g: torch.Tensor | None = None,
            bias: torch.Tensor | None = None, out: torch.Tensor | None = None, accumulate: bool = False) -> _Fused:
    """One launch of :func:`_lora_gemm_kernel`. ``forward``: ``a`` (M, K) = x, ``w`` = W (N, K),
    ``lora_f1`` = A (r, K), ``lora_f2`` = B (N, r). Backward: ``a`` (M, N) = dY, ``w`` = W (N, K),
    ``lora_f1`` = B (N, r), ``lora_f2`` = A (r, K). Either ``left`` (M, r) is given, or ``lora_f1`` and
    L = a @ F1 is computed in the main loop (written to ``left_out`` (M, r) when given). ``e`` (M, NOUT):
    return the fp32 per-row-tile partials of ``L.T @ e``; ``g`` (M, r): those of ``a.T @ g``. ``out``
    given: written (``accumulate``: added to); it may be ``e``'s own memory. Unit column strides."""
    m, r_dim = a.shape
    nout = w.shape[0] if forward else w.shape[1]
    rank = lora_f2.shape[1] if forward else lora_f2.shape[0]
    if out is None:
        out = torch.empty((m, nout), device=a.device, dtype=a.dtype)
    bm, bn, bk = int(cfg["block_m"]), int(cfg["block_n"]), int(cfg["block_k"])
    if a.element_size() == 4:
        bk //= 2  # fp32 tiles are twice the bytes: keep the pipelined stages inside shared memory
    tiles_m = triton.cdiv(m, bm)
    result = _Fused(out, left_out)
    # l_ptr: the given L, the L to store, or (neither) only a dtype for the kernel's rounding of L
    left = left if left is not None else left_out if left_out is not None else out
    if e is not None:
        result.e_part = torch.empty((tiles_m, rank, nout), device=a.device, dtype=torch.float32)
    if g is not None:
        result.g_part = torch.empty((tiles_m, r_dim, rank), device=a.device, dtype=torch.float32)
    if m == 0 or nout == 0:
        return result
    f1 = lora_f1 if lora_f1 is not None else lora_f2
    if forward:  # op(W) = W.T; F1 = A.T; F2 = B.T
        s_w, s_f1, s_f2 = (1, w.stride(0)), (f1.stride(1), f1.stride(0)), (1, lora_f2.stride(0))
    else:  # op(W) = W; F1 = B (any strides); F2 = A
        s_w, s_f1, s_f2 = (w.stride(0), 1), (f1.stride(0), f1.stride(1)), (lora_f2.stride(0), 1)
    dummy = out
    # whole tiles: M by BLOCK_M, and W (N, K) by (BLOCK_N, BLOCK_K) forward, (BLOCK_K, BLOCK_N) backward
    a_arg, w_arg, tma = a, w, _tma_ok(cfg, a, w, (bm, bn, bk) if forward else (bm, bk, bn))
    if tma:
        a_arg = TensorDescriptor(a, [m, r_dim], [a.stride(0), 1], [bm, bk])
        w_arg = TensorDescriptor(w, list(w.shape), [w.stride(0), 1], [bn, bk] if forward else [bk, bn])
    grid = (tiles_m * triton.cdiv(nout, bn),)
    _lora_gemm_kernel[grid](
        a_arg, w_arg, out, f1, lora_f2, left, dummy if e is None else e,
        dummy if result.e_part is None else result.e_part, dummy if g is None else g,
        dummy if result.g_part is None else result.g_part, dummy if bias is None else bias,
        m, nout, r_dim, rank,
        a.stride(0), *s_w, out.stride(0), *s_f1, *s_f2, left.stride(0),
        0 if e is None else e.stride(0), 0 if g is None else g.stride(0), float(alpha),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=_block_r(rank), GROUP_M=int(cfg["group_m"]),
        L_IN=lora_f1 is None, STORE_L=left_out is not None, E_PART=e is not None,
        G_PART=g is not None, HAS_BIAS=bias is not None, ACCUMULATE=accumulate, EVEN_K=r_dim % bk == 0,
        EVEN_MN=m % bm == 0 and nout % bn == 0, TMA=tma, W_KMAJOR=forward, UPCAST=interpreter_on(),
        num_warps=int(cfg["gemm_warps"]), num_stages=int(cfg["stages"]), **launch_options(cfg))
    return result


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``t * scale`` in place; no kernel at all for the common ``scale == 1`` (lora_alpha == r)."""
    return t if scale == 1.0 else t.mul_(scale)


def _as(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call when nothing changes (each call costs host time)."""
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _adapter_grad(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``(a @ b) * scale`` in ``dtype``: a LoRA factor's gradient (dA from ``(dY @ B).T @ x``, dB from
    ``dY.T @ xa``). For 16-bit operands and an fp32 factor on NVIDIA GPUs, cuBLAS writes its fp32
    accumulator straight out (``torch.mm(..., out_dtype=torch.float32)``) instead of rounding it to 16
    bits for a cast back: the fp32 adapters get gradients without a 16-bit rounding, and one cast
    kernel less per gradient. Verified by conformance on the H100 (165 small, 40 Llama-8B checks); the
    W8B step time did not move beyond its run-to-run spread (13,215 / 13,338 tok/s with it, 13,636 /
    13,107 without, one machine)."""
    if dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda and _MM_FP32_OUT:
        return _scaled(torch.mm(a, b, out_dtype=torch.float32), scale)
    return _as(_scaled(torch.mm(a, b), scale), dtype)


# torch.mm(..., out_dtype=torch.float32) is relied on for NVIDIA GPUs only (this torch has the op; its
# CPU build lacks a kernel for it, ROCm is not verified)
_MM_FP32_OUT = torch.version.hip is None and hasattr(torch.ops.aten.mm, "dtype")


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) with unit column stride (a copy only when it has none)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


# ----------------------------------------------------------------------------- building blocks
DEQUANT_PIECE_BYTES = 64 * 2**20  # a 4-bit base is dequantised in row pieces of at most this many bf16 bytes
_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def row_pieces(qw: QuantizedWeight) -> list[tuple[int, int, QuantizedWeight]]:
    """``qw`` as ``(first row, end row, QuantizedWeight of those rows)`` pieces whose dense bf16 form
    is at most :data:`DEQUANT_PIECE_BYTES` (one piece when it already is, or when the quantisation
    blocks don't allow a cut on a row boundary). Dequantising and multiplying piece by piece bounds
    the dense temporary: a Llama-3.1-8B MLP weight is 112 MiB dense, and it used to be alive at the
    layer backward's memory peak. Pieces are views of ``qw``'s storage, made once per weight."""
    found = _PIECES.get(qw)
    if found is None:
        found = _PIECES[qw] = _cut_rows(qw)
    return found


def _cut_rows(qw: QuantizedWeight) -> list[tuple[int, int, QuantizedWeight]]:
    n, k = qw.shape
    pieces = -(-n * k * 2 // DEQUANT_PIECE_BYTES)
    per_absmax = qw.blocksize * (qw.nested_blocksize or 1)  # elements per nested absmax entry
    step = per_absmax // math.gcd(per_absmax, k)  # rows per cut that keep both block levels whole
    per_piece = -(-n // max(1, pieces))
    rows = -(-per_piece // step) * step
    if pieces <= 1 or rows >= n or (n * k) % qw.blocksize:
        return [(0, n, qw)]
    packed, out = qw.packed.reshape(-1), []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        e0, e1 = r0 * k, r1 * k
        b0, b1 = e0 // qw.blocksize, -(-e1 // qw.blocksize)
        nested = {}
        if qw.double_quant:
            nested = {"nested_absmax": qw.nested_absmax[b0 // qw.nested_blocksize:-(-b1 // qw.nested_blocksize)]}
        piece = dataclasses.replace(qw, packed=packed[e0 // 2:e1 // 2], absmax=qw.absmax[b0:b1], shape=(r1 - r0, k),
                                    **nested)
        out.append((r0, r1, piece))
    return out


def _materialise(weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype, cfg: dict) -> torch.Tensor:
    """The base weight (N, K) in ``dtype``: the tensor itself when it already is, else a temporary
    (dequantised by the Triton kernel, or cast) that the caller drops right after its GEMM."""
    if isinstance(weight, QuantizedWeight):
        return nf4.dequantize(weight, dtype, config=cfg)  # reads its "bytes" and "num_warps"
    return _as(weight, dtype)


def _base_plus_lora(x2: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None,
                    xa: torch.Tensor, b_c: torch.Tensor, scaling: float, cfg: dict) -> torch.Tensor:
    """(M, N) ``x2 @ W.T + bias + scaling * xa @ b_c.T``, everything in ``x2``'s dtype.

    cuBLAS path: the small LoRA product is written first (``bias + scaling * xa @ B.T``, K = r) and
    the base GEMM accumulates onto it (beta = 1). The base GEMM is compute-bound, so reading the
    output in its epilogue is nearly free; adding the LoRA term afterwards instead would cost one
    more memory-bound read and write of the whole (M, N) output."""
    n = weight.shape[0]
    if x2.shape[0] == 0:
        return x2.new_zeros((0, n))
    if cfg["base"] == "triton":
        return _gemm_lora(x2, _materialise(weight, x2.dtype, cfg), xa, b_c, scaling, bias, cfg, forward=True)
    if bias is None:
        out = x2.new_empty((x2.shape[0], n)).addmm_(xa, b_c.t(), beta=0, alpha=scaling)
    else:
        out = torch.addmm(bias, xa, b_c.t(), alpha=scaling)
    for r0, r1, piece in _pieces(weight):
        w = _materialise(piece, x2.dtype, cfg)
        (out if r1 - r0 == n else out[:, r0:r1]).addmm_(x2, w.t())
        del w  # a dequantised temporary goes back to the allocator before the next GEMM
    return out


def _pieces(weight: torch.Tensor | QuantizedWeight) -> list[tuple[int, int, torch.Tensor | QuantizedWeight]]:
    return row_pieces(weight) if isinstance(weight, QuantizedWeight) else [(0, weight.shape[0], weight)]


def _grad_input(dy2: torch.Tensor, weight: torch.Tensor | QuantizedWeight, left: torch.Tensor,
                right: torch.Tensor, alpha: float, cfg: dict,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) ``dy2 @ W + alpha * left @ right`` (``+ out`` in place when given); on the cuBLAS path
    the LoRA term first and the base GEMM accumulating onto it, as in :func:`_base_plus_lora`."""
    if cfg["base"] == "triton":
        return _gemm_lora(dy2, _materialise(weight, dy2.dtype, cfg), left, right, alpha, None, cfg, forward=False,
                          out=out)
    if out is None:
        out = dy2.new_empty((dy2.shape[0], weight.shape[1])).addmm_(left, right, beta=0, alpha=alpha)
    else:
        out.addmm_(left, right, alpha=alpha)
    return _accumulate_base(out, dy2, weight, cfg)


def _fused(cfg: dict, weight: torch.Tensor | QuantizedWeight, rows: int, rank: int) -> bool:
    """The config runs LoRA inside the Triton base GEMM, on whole tiles in both directions (``rows`` by
    ``block_m``; N and K by ``block_n`` and ``block_k``), with a base weight in one piece (a 4-bit weight
    cut into row pieces goes the piecewise cuBLAS way, which bounds its dense temporary). Other calls
    with this config take the cuBLAS way. Whole tiles because that is where the tensor-descriptor
    tiles apply: the pointer tiles a partial one needs were 7-10x slower than cuBLAS on the H100.

    ``"db": "fused"`` also needs a rank that is a multiple of 8: its dB partials read (M, r) ``xa``
    row by row, and on the H100 (Triton 3.6) a 13 x 40 -> 27 rank-3 case hit an illegal address
    there (``benchmarks/gpu/lora_partial_tiles.py``, case ``bwd_g``). The dX main loop's reads of a
    row-major B with such rows (6 bytes apart) gave dX 62 % off; :func:`_fused_backward` passes B
    column-major, which the same script verified right (dX 4.6e-3, dA 1.4e-3 relative in bf16)."""
    if cfg["base"] != "fused" or len(_pieces(weight)) != 1 or (cfg.get("db") == "fused" and rank % 8):
        return False
    n, k = weight.shape
    step = math.lcm(int(cfg["block_n"]), int(cfg["block_k"]))
    return rows % int(cfg["block_m"]) == 0 and n % step == 0 and k % step == 0


def _fused_forward(x2: torch.Tensor, weight: torch.Tensor | QuantizedWeight, a_c: torch.Tensor, b_c: torch.Tensor,
                   scaling: float, bias: torch.Tensor | None, cfg: dict, xa: torch.Tensor) -> torch.Tensor:
    """(M, N) output of one projection from one Triton launch. Config ``"xa": "mm"``: ``xa`` (M, r) was
    computed by the caller and the GEMM only adds ``xa @ B.T`` in its epilogue; otherwise (default,
    ``"loop"``) ``x @ A.T`` accumulates in the main loop from the x tiles it loads and is written to ``xa``."""
    w = _materialise(weight, x2.dtype, cfg)
    if cfg.get("xa") == "mm":
        return _launch(x2, w, cfg, forward=True, left=xa, lora_f2=b_c, alpha=scaling, bias=bias).out
    return _launch(x2, w, cfg, forward=True, lora_f1=a_c, lora_f2=b_c, alpha=scaling, left_out=xa, bias=bias).out


def _fused_backward(dy2: torch.Tensor, weight: torch.Tensor | QuantizedWeight, x2: torch.Tensor,
                    xa: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, s: float, cfg: dict,
                    need_a: bool, need_b: bool, out: torch.Tensor | None = None, accumulate: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dX, dA, dB)`` of one projection from one launch: ``dY @ B`` is accumulated in the dX GEMM's
    main loop (config ``"dyb": "mm"``: computed by a separate GEMM and only added in the epilogue),
    ``dA`` comes from its epilogue (``(dY @ B).T @ x`` per tile, x tile read once) and ``dB`` from a
    separate GEMM (config ``"db": "fused"``: from the first column tiles, ``dY.T @ xa``). ``out``
    given: dX is written there (over ``x2`` when the caller allows), or added (``accumulate``)."""
    dt = dy2.dtype
    with_g = need_b and cfg.get("db") == "fused"
    b_c = ADAPTER_CASTS.get(lora_b, dt, TAKE)
    # the (BLOCK_K, rank) product in the main loop costs more than a separate skinny GEMM on the H100
    # (q/o: base dX alone 0.183 ms, with dY @ B in the loop and the dA partials ~0.22)
    left = dict(left=torch.mm(dy2, b_c)) if cfg.get("dyb") == "mm" else dict(lora_f1=_column_major(b_c))
    res = _launch(dy2, _materialise(weight, dt, cfg), cfg, forward=False,
                  lora_f2=ADAPTER_CASTS.get(lora_a, dt, TAKE), alpha=s,
                  e=x2 if need_a else None, g=xa if with_g else None, out=out, accumulate=accumulate, **left)
    if out is not None and out.data_ptr() == x2.data_ptr():  # x is gone: a retain_graph reader fails loudly
        torch.autograd.graph.increment_version(out)
    da = _as(_scaled(res.e_part.sum(0), s), lora_a.dtype) if need_a else None
    if with_g:
        db = _as(_scaled(res.g_part.sum(0), s), lora_b.dtype)
    else:
        db = _adapter_grad(dy2.t(), xa, s, lora_b.dtype) if need_b else None
    return res.out, da, db


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """(N, r) ``t`` laid out column by column (strides ``(1, N)``): how the dX main loop reads B (see
    :func:`_fused`); a copy of N * r elements unless it already is."""
    return t if t.stride(0) == 1 else t.t().contiguous().t()


def _resolve(config: dict | None) -> dict:
    return {**CONFIGS[0], **(config or {})}


# ----------------------------------------------------------------------------- one projection
class _LoraLinear(torch.autograd.Function):
    """One projection; see the module docstring for the forward/backward passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, lora_a: torch.Tensor,
                lora_b: torch.Tensor, bias: torch.Tensor | None, scaling: float, cfg: dict, use: str) -> torch.Tensor:
        k = x.shape[-1]
        n = weight.shape[0]
        dt = x.dtype
        x2 = _unit_stride(x.reshape(-1, k))
        a_c, b_c = ADAPTER_CASTS.get(lora_a, dt, use), ADAPTER_CASTS.get(lora_b, dt, use)
        bias_c = None if bias is None else _as(bias, dt)
        ctx.fused = _fused(cfg, weight, x2.shape[0], a_c.shape[0])
        if output_values_are_unused():  # a recomputed layer's last projection: only the backward is needed
            xa = torch.mm(x2, a_c.t())  # (M, r)
            out = x2.new_empty((x2.shape[0], n))
        elif ctx.fused:
            xa = torch.mm(x2, a_c.t()) if cfg.get("xa") == "mm" else x2.new_empty((x2.shape[0], a_c.shape[0]))
            out = _fused_forward(x2, weight, a_c, b_c, scaling, bias_c, cfg, xa)
        else:
            xa = torch.mm(x2, a_c.t())  # (M, r)
            out = _base_plus_lora(x2, weight, bias_c, xa, b_c, scaling, cfg)
        dense = weight if isinstance(weight, torch.Tensor) else None
        # dX may be written over x (ops.hints): x is an op's output of this very shape, so each tile
        # of the fused backward reads its x tile (for dA) before it stores the dX tile in its place.
        # x itself is saved then (not the (M, K) view of it), so a later reader trips its version check.
        ctx.overwrite = (ctx.fused and inputs_may_be_overwritten() and x.grad_fn is not None and x.is_contiguous()
                         and x2.data_ptr() == x.data_ptr())
        ctx.save_for_backward(x if ctx.overwrite else x2, xa, dense, lora_a, lora_b)
        ctx.qweight = None if dense is not None else weight
        ctx.scaling, ctx.cfg, ctx.x_shape = scaling, cfg, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_saved, xa, dense, lora_a, lora_b = ctx.saved_tensors
        x2 = x_saved.reshape(-1, x_saved.shape[-1])  # the (M, K) view, or x2 itself
        weight = dense if dense is not None else ctx.qweight
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        s, cfg, dt = ctx.scaling, ctx.cfg, x2.dtype
        n = weight.shape[0]
        dy2 = _unit_stride(_as(grad.reshape(-1, n), dt))
        dx = dw = da = db = dbias = None
        if x2.shape[0] == 0:  # no rows: every gradient is zero, nothing to compute
            dx = torch.zeros(ctx.x_shape, device=x2.device, dtype=dt) if need_x else None
            dw = torch.zeros_like(dense) if need_w else None
            da = torch.zeros_like(lora_a) if need_a else None
            db = torch.zeros_like(lora_b) if need_b else None
            dbias = torch.zeros(n, device=x2.device, dtype=ctx.bias_dtype) if need_bias else None
            return dx, dw, da, db, dbias, None, None, None
        if need_w:
            dw = _as(torch.mm(dy2.t(), x2), dense.dtype)
        if need_bias:
            dbias = _as(dy2.sum(0), ctx.bias_dtype)
        if need_x and ctx.fused:  # x is read once more, by the dX launch (and may be overwritten by it)
            dx, da, db = _fused_backward(dy2, weight, x2, xa, lora_a, lora_b, s, cfg, need_a, need_b,
                                         out=x2.detach() if ctx.overwrite else None)
            return dx.view(ctx.x_shape), dw, da, db, dbias, None, None, None
        dyb = torch.mm(dy2, ADAPTER_CASTS.get(lora_b, dt, TAKE)) if need_x or need_a else None  # (M, r)
        if need_a:
            da = _adapter_grad(dyb.t(), x2, s, lora_a.dtype)
        if need_b:
            db = _adapter_grad(dy2.t(), xa, s, lora_b.dtype)
        # x is done with: when it was recomputed for this backward (lean activations: the down
        # projection's act(gate) * up) this reference is its last, so dX below can take its memory
        del x2, x_saved
        if need_x:
            dx = _grad_input(dy2, weight, dyb, ADAPTER_CASTS.get(lora_a, dt, TAKE), s, cfg).view(ctx.x_shape)
        return dx, dw, da, db, dbias, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias + scaling * (x @ A.T) @ B.T``; x (..., K), W (N, K) dense or 4-bit, A (r, K),
    B (N, r), bias (N,) -> (..., N) in ``x``'s dtype.

    One autograd node with a hand-derived backward; saves only ``x`` and ``xa = x @ A.T`` (M, r).
    Differentiable in ``x``, ``A``, ``B``, ``bias`` and a dense ``W``. ``config``: one of
    :data:`CONFIGS` (``None``: the first).
    """
    use = forward_use(x, weight if isinstance(weight, torch.Tensor) else None, lora_a, lora_b, bias)
    return _LoraLinear.apply(x, weight, lora_a, lora_b, bias, float(scaling), _resolve(config), use)


# ----------------------------------------------------------------------------- projections sharing x
class _LoraGroup(torch.autograd.Function):
    """G projections of one input: ``y_i = x @ W_i.T + b_i + s_i * (x @ A_i.T) @ B_i.T``.

    Inputs after ``(x, plan)``: G weights (dense tensors, or QuantizedWeight objects), G ``A``,
    G ``B``, G biases (``None`` allowed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: tuple, *tensors):
        scalings, cfg, use = plan
        g = len(scalings)
        weights, a_s, b_s, biases = (tensors[i * g:(i + 1) * g] for i in range(4))
        k = x.shape[-1]
        dt = x.dtype
        x2 = _unit_stride(x.reshape(-1, k))
        ranks = [a.shape[0] for a in a_s]
        fused = all(_fused(cfg, w, x2.shape[0], a.shape[0]) for w, a in zip(weights, a_s, strict=True))
        xa_in_loop = fused and cfg.get("xa") != "mm"
        if xa_in_loop:  # each x @ A_i.T in its base GEMM's main loop, into its columns
            xa_all = x2.new_empty((x2.shape[0], sum(ranks)))
        else:
            a_all = ADAPTER_CASTS.cat(tuple(a_s), dt, use)  # (sum r, K)
            xa_all = torch.mm(x2, a_all.t())  # (M, sum r): one read of x for every adapter
        outs, start = [], 0
        for w, a, b, bias, s, r in zip(weights, a_s, b_s, biases, scalings, ranks, strict=True):
            xa = xa_all[:, start:start + r]
            start += r
            b_c = ADAPTER_CASTS.get(b, dt, use)
            bias_c = None if bias is None else _as(bias, dt)
            if fused:
                a_c = ADAPTER_CASTS.get(a, dt, use) if xa_in_loop else a  # (else unused: xa is given)
                out = _fused_forward(x2, w, a_c, b_c, s, bias_c, cfg, xa)
            else:
                out = _base_plus_lora(x2, w, bias_c, xa, b_c, s, cfg)
            outs.append(out.view(*x.shape[:-1], w.shape[0]))
        dense = [w if isinstance(w, torch.Tensor) else None for w in weights]
        ctx.save_for_backward(x2, xa_all, *dense, *a_s, *b_s)
        ctx.qweights = [None if isinstance(w, torch.Tensor) else w for w in weights]
        ctx.plan, ctx.ranks, ctx.x_shape, ctx.fused = plan, ranks, x.shape, fused
        ctx.bias_dtypes = [None if b is None else b.dtype for b in biases]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        scalings, cfg, _ = ctx.plan
        g = len(scalings)
        saved = ctx.saved_tensors
        x2, xa_all = saved[:2]
        dense, a_s, b_s = (saved[2 + i * g:2 + (i + 1) * g] for i in range(3))
        weights = [d if d is not None else q for d, q in zip(dense, ctx.qweights, strict=True)]
        need = ctx.needs_input_grad[2:]
        need_w, need_a, need_b, need_bias = (need[i * g:(i + 1) * g] for i in range(4))
        need_x = ctx.needs_input_grad[0]
        dt, m = x2.dtype, x2.shape[0]
        dys = [None if gr is None else _unit_stride(_as(gr.reshape(-1, w.shape[0]), dt))
               for gr, w in zip(grads, weights, strict=True)]
        dws, das, dbs, dbiases = [None] * g, [None] * g, [None] * g, [None] * g
        dx = None
        live = [i for i in range(g) if dys[i] is not None and m > 0]
        starts = [sum(ctx.ranks[:i]) for i in range(g)]
        if live and need_x and ctx.fused:
            for j, i in enumerate(live):  # one launch per projection, each adding its dX onto the last one's
                xa = xa_all[:, starts[i]:starts[i] + ctx.ranks[i]]
                dx, das[i], dbs[i] = _fused_backward(dys[i], weights[i], x2, xa, a_s[i], b_s[i], scalings[i], cfg,
                                                     need_a[i], need_b[i], out=dx, accumulate=j > 0)
        elif live and (need_x or any(need_a)):
            # dYB_all (M, sum r) = [s_i * dY_i @ B_i]: the LoRA part of dX and every dA in one GEMM each
            parts = [_scaled(torch.mm(dys[i], ADAPTER_CASTS.get(b_s[i], dt, TAKE)), scalings[i]) if i in live
                     else x2.new_zeros((m, ctx.ranks[i])) for i in range(g)]
            dyb_all = torch.cat(parts, dim=1) if g > 1 else parts[0]
            a_all = ADAPTER_CASTS.cat(tuple(a_s), dt, TAKE)
            if need_x:
                for j, i in enumerate(live):  # base products accumulate into one dX; LoRA term on the first
                    dx = _grad_input(dys[i], weights[i], dyb_all, a_all, 1.0, cfg, out=dx) if j == 0 else \
                        _accumulate_base(dx, dys[i], weights[i], cfg)
            if any(need_a):
                # (sum r, K): one read of x for every adapter; in their dtype when they share one (each
                # dA_i is a contiguous row block of it)
                common = a_s[0].dtype if len({a.dtype for a in a_s}) == 1 else None
                da_all = _adapter_grad(dyb_all.t(), x2, 1.0, common) if common else torch.mm(dyb_all.t(), x2)
                for i in range(g):
                    if need_a[i]:
                        das[i] = _as(da_all[starts[i]:starts[i] + ctx.ranks[i]], a_s[i].dtype)
        for i in range(g):
            dy = dys[i]
            if need_b[i] and dbs[i] is None:
                dbs[i] = torch.zeros_like(b_s[i]) if dy is None or m == 0 else _adapter_grad(
                    dy.t(), xa_all[:, starts[i]:starts[i] + ctx.ranks[i]], scalings[i], b_s[i].dtype)
            if need_a[i] and das[i] is None:
                das[i] = torch.zeros_like(a_s[i])
            if need_w[i]:
                dws[i] = torch.zeros_like(dense[i]) if dy is None or m == 0 else _as(torch.mm(dy.t(), x2),
                                                                                     dense[i].dtype)
            if need_bias[i]:
                n = weights[i].shape[0]
                dbiases[i] = torch.zeros(n, device=x2.device, dtype=ctx.bias_dtypes[i]) if dy is None else \
                    _as(dy.sum(0), ctx.bias_dtypes[i])
        if need_x:
            dx = torch.zeros(ctx.x_shape, device=x2.device, dtype=dt) if dx is None else dx.view(ctx.x_shape)
        return (dx, None, *dws, *das, *dbs, *dbiases)


def _accumulate_base(dx: torch.Tensor, dy2: torch.Tensor, weight: torch.Tensor | QuantizedWeight,
                     cfg: dict) -> torch.Tensor:
    """``dx += dy2 @ W`` in place (a 4-bit ``W`` piece by piece, see :func:`row_pieces`)."""
    n = weight.shape[0]
    for r0, r1, piece in _pieces(weight):
        w = _materialise(piece, dy2.dtype, cfg)
        dx.addmm_(dy2 if r1 - r0 == n else dy2[:, r0:r1], w)
        del w
    return dx


def lora_linear_group(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor | QuantizedWeight],
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    biases: Sequence[torch.Tensor | None] | None = None,
    config: dict | None = None,
) -> list[torch.Tensor]:
    """``[lora_linear(x, W_i, A_i, B_i, s_i, bias_i) for i]`` as one autograd node (q/k/v, gate/up).

    x (..., K); W_i (N_i, K); A_i (r_i, K); B_i (N_i, r_i); returns [(..., N_i)]. One GEMM
    ``x @ cat(A_i).T`` serves every adapter; backward reads ``x`` once for every ``dA_i`` and adds
    every LoRA term of ``dX`` with one GEMM; base products stay separate (the weights are separate
    tensors; concatenating them would copy the weights every step).
    """
    g = len(weights)
    if not (len(lora_as) == len(lora_bs) == len(scalings) == g) or g == 0:
        raise ValueError(f"lora_linear_group: need one A, B and scaling per weight; got {g} weights, "
                         f"{len(lora_as)} A, {len(lora_bs)} B, {len(scalings)} scalings")
    biases = list(biases) if biases is not None else [None] * g
    if len(biases) != g:
        raise ValueError(f"lora_linear_group: {len(biases)} biases for {g} weights")
    use = forward_use(x, *(w for w in weights if isinstance(w, torch.Tensor)), *lora_as, *lora_bs,
                      *(b for b in biases if b is not None))
    plan = (tuple(float(s) for s in scalings), _resolve(config), use)
    return list(_LoraGroup.apply(x, plan, *weights, *lora_as, *lora_bs, *biases))


# ----------------------------------------------------------------------------- registration
def accepts(x: object, weight: object, lora_a: object, lora_b: object, scaling: float = 1.0,
            bias: object = None) -> bool:
    """Floating ``x`` of a supported dtype; a dense weight, or a 4-bit one whose layout the Triton
    dequantisation handles (power-of-two blocksizes) on a device Triton runs on."""
    if not (isinstance(x, torch.Tensor) and x.dtype in DTYPES and isinstance(lora_a, torch.Tensor)
            and isinstance(lora_b, torch.Tensor) and lora_a.dtype in DTYPES and lora_b.dtype in DTYPES):
        return False
    if isinstance(weight, QuantizedWeight):
        return nf4.supports(weight) and (weight.device.type != "cpu" or interpreter_on())
    return isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2


def lora_linear_group_op(
    x: torch.Tensor,
    weight0: torch.Tensor | QuantizedWeight, lora_a0: torch.Tensor, lora_b0: torch.Tensor, scaling0: float,
    bias0: torch.Tensor | None,
    weight1: torch.Tensor | QuantizedWeight, lora_a1: torch.Tensor, lora_b1: torch.Tensor, scaling1: float,
    bias1: torch.Tensor | None,
    weight2: torch.Tensor | QuantizedWeight | None = None, lora_a2: torch.Tensor | None = None,
    lora_b2: torch.Tensor | None = None, scaling2: float | None = None, bias2: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, ...]:
    """The ``lora_linear_group`` op (its flat slots, 2 or 3 filled; the registry checks the parameters
    match the reference's) through :func:`lora_linear_group`. Returns one (..., N_i) tensor per filled slot."""
    slots = projections((x, weight0, lora_a0, lora_b0, scaling0, bias0, weight1, lora_a1, lora_b1, scaling1, bias1,
                         weight2, lora_a2, lora_b2, scaling2, bias2))
    weights, a_s, b_s, scalings, biases = (list(c) for c in zip(*slots, strict=True))
    return tuple(lora_linear_group(x, weights, a_s, b_s, scalings, biases, config=config))


def accepts_group(x: object, *slots: object) -> bool:
    """:func:`accepts` holds for every filled projection slot."""
    return all(accepts(x, *p) for p in projections((x, *slots)))


AOT_RANKS = (16,)


def aot(config: dict, dtype: torch.dtype = torch.bfloat16) -> list[AotUnit]:
    """Every Triton kernel ``config`` launches for ``dtype`` activations: the NF4 dequantisation
    (its output dtypes and single/double quantisation), and for a Triton base the GEMM in each form
    its forward (with and without bias) and backward (first and accumulating projection) launch."""
    cfg = _resolve(config)
    units = nf4.aot_units({"bytes": cfg["bytes"], "num_warps": cfg["num_warps"]})
    if cfg["base"] not in ("triton", "fused"):
        return units
    p = ptr(dtype)
    signature = {**dict.fromkeys(("a_ptr", "w_ptr", "c_ptr", "f1_ptr", "f2_ptr", "l_ptr", "e_ptr"), p),
                 "pe_ptr": "*fp32", "g_ptr": p, "pg_ptr": "*fp32", "bias_ptr": p,
                 **dict.fromkeys(("M", "NOUT", "R", "RANK", "s_am", "s_wk", "s_wn", "s_cm", "s_f1k", "s_f1r", "s_f2r",
                                  "s_f2n", "s_lm", "s_em", "s_gm"), "i32"),
                 "alpha": "fp32",
                 **dict.fromkeys(("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "GROUP_M", "L_IN", "STORE_L", "E_PART",
                                  "G_PART", "HAS_BIAS", "ACCUMULATE", "EVEN_K", "EVEN_MN", "TMA", "W_KMAJOR",
                                  "UPCAST"),
                                 "constexpr")}
    options = {"num_warps": int(cfg["gemm_warps"]), "num_stages": int(cfg["stages"])}
    fused = cfg["base"] == "fused"
    with_g = fused and cfg.get("db") == "fused"
    # (forward, bias, accumulate): forward with/without bias; backward writing dX, then accumulating
    forms = ((True, False, False), (True, True, False), (False, False, False), (False, False, True))
    tma = bool(cfg.get("tma"))
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    for rank in AOT_RANKS:
        for forward, has_bias, accumulate in forms:
            given = cfg.get("xa") == "mm" if forward else cfg.get("dyb") == "mm"  # the LoRA left factor
            constexprs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                          "BLOCK_R": _block_r(rank), "GROUP_M": cfg["group_m"], "L_IN": not fused or given,
                          "STORE_L": fused and forward and not given, "E_PART": fused and not forward,
                          "G_PART": with_g and not forward, "HAS_BIAS": has_bias, "ACCUMULATE": accumulate,
                          "EVEN_K": True, "EVEN_MN": True, "TMA": tma, "W_KMAJOR": forward, "UPCAST": False}
            if tma:  # host tensor descriptors: A tiles (BLOCK_M, BLOCK_K), W tiles as the launch builds them
                w_block = (bn, bk) if forward else (bk, bn)
                signature = {**signature, "a_ptr": f"tensordesc<{p[1:]}[{bm},{bk}]>",
                             "w_ptr": f"tensordesc<{p[1:]}[{w_block[0]},{w_block[1]}]>"}
            units.append(AotUnit(f"lora_gemm[{p[1:]},{cfg['base']},{'fwd' if forward else 'bwd'},bias={int(has_bias)},"
                                 f"acc={int(accumulate)},"
                                 f"{cfg['block_m']}x{cfg['block_n']}x{cfg['block_k']}]", _lora_gemm_kernel,
                                 signature, constexprs, options))
    return units


KERNELS = [
    PortableKernel(
        op="lora_linear", name="lora_linear", fn=lora_linear, configs=CONFIGS, accepts=accepts, aot=aot,
        description="fused LoRA linear: one autograd node, NF4 dequantised into a temporary by Triton, "
                    "LoRA term accumulated into the base GEMM output (or its Triton epilogue)",
    ),
    PortableKernel(
        op="lora_linear_group", name="lora_linear_group", fn=lora_linear_group_op, configs=CONFIGS,
        accepts=accepts_group, aot=aot,
        description="fused LoRA projections of one input (q/k/v, gate/up): one x @ cat(A).T, one dX LoRA "
                    "term and one dA GEMM for the group; base GEMMs as in lora_linear",
    ),
]
