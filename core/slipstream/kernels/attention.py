"""FlashAttention-2-style Triton kernels for the ``attention`` op: forward and backward.

Shapes: ``q`` (B, Hq, S, D); ``k``, ``v`` (B, Hk, S, D), Hq a multiple of Hk (GQA: query head ``h``
reads kv head ``h // (Hq // Hk)``; K/V are never expanded in memory). Output (B, Hq, S, D) in q's
dtype. See :func:`slipstream.ops.attention.reference` for the meaning of every flag.

Forward (:func:`_attn_fwd`): one program per (query block, batch x query head). It keeps the query
tile, an fp32 output accumulator and the running row max / row sum in registers and streams key /
value tiles through ``tl.dot`` (online softmax). Scores are pre-scaled by ``scale * log2(e)`` so
the softmax uses ``exp2``; the per-row log-sum-exp it saves for the backward is in those base-2
units (``lse2 = m + log2(l)``, fp32, (B, Hq, S)).

Each program visits only the key tiles some row of its block may see ([lo, hi): nothing above the
causal diagonal, below the sliding window or outside its packed sequence). Inside that range the
tiles every row sees fully ([full_lo, full_hi)) skip the mask arithmetic through a uniform scalar
branch; only tiles at the window edge, the diagonal and the sequence end build the mask. One
pipelined loop with a branch (rather than one loop per range) keeps the dK/dV kernel within the
register file on sm_90 (measured with ptxas: 230 registers, no spills, vs spills with 3 loops).

Backward: (1) :func:`_attn_bwd_delta` computes ``delta = rowsum(dO * O)`` (fp32, (B, Hq, S));
(2) :func:`_attn_bwd_dkdv` gives one program per (key block, batch x kv head): K/V stay resident,
and it loops over the query heads of the GQA group and over the query blocks that see the key block,
accumulating dK and dV in fp32 registers -- no atomics, deterministic; (3) :func:`_attn_bwd_dq`
gives one program per (query block, batch x query head), streaming key/value tiles like the forward.
Splitting dQ from dK/dV recomputes ``q @ k.T`` and ``dO @ v.T`` once more (7 instead of 5 matmuls)
but avoids fp32 atomics on dQ, which cost more than the recompute at long S and are nondeterministic.

Packed sequences (``cu_seqlens``, B == 1): programs map to (sequence, block) through a small table
built on the device with torch ops (no host synchronisation); each program sees only its own
sequence, so tiles that straddle two sequences are never computed.

Block sizes come from the config; :func:`plan` adapts them to the head dim and dtype (documented
there) so one config is valid for D = 1..256, fp16/bf16/fp32, NVIDIA and AMD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from slipstream.kernels._aot import AotUnit, ptr
from slipstream.kernels._catalog import PortableKernel, interpreter_on

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
AMD_OPTIONS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")


# Triton's CPU interpreter multiplies bf16 tiles as their raw uint16 bits (triton 3.9); there the
# operands are widened to fp32 first, which is exact and gives what the GPU's fp32-accumulating
# dot gives. Compiled kernels (this is False) use the operands as they are.
_WIDEN_DOT_OPERANDS = tl.constexpr(interpreter_on())


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _mm(a, b):
    """``a @ b`` with an fp32 result (tensor cores for 16-bit operands; full-precision fp32 for fp32,
    since tf32 products missed the fp32 tolerance on the H100 where softmax gradients cancel)."""
    if _WIDEN_DOT_OPERANDS:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float32:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _mma(a, b, acc):
    """``acc + a @ b`` into the fp32 accumulator ``acc``."""
    if _WIDEN_DOT_OPERANDS:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _tanh(x):
    """tanh from exp2 (portable: no libdevice); saturates to +-1 for large |x| without NaN."""
    e = tl.exp2(x * 2.8853900817779268)  # exp(2x)
    return 1.0 - tl.fdiv(2.0 + tl.zeros_like(e), e + 1.0)  # non-IEEE division: a few ulp, cheaper


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a (rows, cols) tile, zero-filling rows >= n_rows / cols >= n_cols where asked to check."""
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    if CHECK_ROWS and CHECK_COLS:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
    elif CHECK_ROWS:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    elif CHECK_COLS:
        tl.store(ptrs, x, mask=cols[None, :] < n_cols)
    else:
        tl.store(ptrs, x)


@triton.jit
def _allowed(i, j, seq_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """May query ``i`` see key ``j`` (broadcast 2-D position tensors, relative to the sequence)."""
    ok = (i < seq_len) & (j < seq_len)
    if CAUSAL:
        ok = ok & (j <= i)
    if HAS_WINDOW:
        ok = ok & (i - j < window)
        if not CAUSAL:
            ok = ok & (j - i < window)
    return ok


@triton.jit
def _locate(pid, CU, TABLE, n_programs, seqlen, BLOCK: tl.constexpr, VARLEN: tl.constexpr):
    """(first row of the sequence, its length, first row of this program's block within it)."""
    if VARLEN:
        seq = tl.load(TABLE + pid)
        blk = tl.load(TABLE + n_programs + pid)
        valid = seq >= 0
        seq = tl.maximum(seq, 0)
        start = tl.load(CU + seq)
        length = tl.where(valid, tl.load(CU + seq + 1) - start, 0)
    else:
        blk = pid
        start = pid * 0
        length = seqlen + pid * 0
    return start, length, blk * BLOCK


@triton.jit
def _key_ranges(m0, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr):
    """Key tiles for query rows [m0, m0 + BLOCK_M): visit [lo, hi), no mask needed in [a, b).

    A tile is unmasked when every (row, key) pair in it is allowed and inside the sequence; tiles
    outside [lo, hi) are invisible to every row of the block and are skipped.
    """
    hi = seq_len
    full_hi = (seq_len // BLOCK_N) * BLOCK_N
    lo = seq_len * 0
    full_lo = seq_len * 0
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M)
        full_hi = tl.minimum(full_hi, ((m0 + 1) // BLOCK_N) * BLOCK_N)  # last key <= first row
    if HAS_WINDOW:
        lo = (tl.maximum(m0 - window + 1, 0) // BLOCK_N) * BLOCK_N  # key > row - W for the first row
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N  # ... for the last row
        if not CAUSAL:
            hi = tl.minimum(hi, m0 + BLOCK_M - 1 + window)
            full_hi = tl.minimum(full_hi, ((m0 + window) // BLOCK_N) * BLOCK_N)
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.minimum(tl.maximum(full_hi, a), hi)
    return lo, a, b, hi


@triton.jit
def _query_ranges(n0, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_WINDOW: tl.constexpr):
    """Query tiles that see keys [n0, n0 + BLOCK_N): visit [lo, hi), no mask needed in [a, b)."""
    hi = seq_len
    full_hi = (seq_len // BLOCK_M) * BLOCK_M
    lo = seq_len * 0
    full_lo = seq_len * 0
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M  # rows >= first key
        full_lo = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M  # first row >= last key
    if HAS_WINDOW:
        hi = tl.minimum(hi, n0 + BLOCK_N - 1 + window)  # row - key < W for the last key
        full_hi = tl.minimum(full_hi, ((n0 + window) // BLOCK_M) * BLOCK_M)  # ... for the first key
        if not CAUSAL:
            lo = (tl.maximum(n0 - window + 1, 0) // BLOCK_M) * BLOCK_M
            full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - window, 0), BLOCK_M) * BLOCK_M
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.minimum(tl.maximum(full_hi, a), hi)
    return lo, a, b, hi


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, stride_ks, stride_vs, rows, offs_n, offs_d, lo, full_lo, full_hi, hi,
               seq_len, head_dim, window, qk_scale, cap_in, cap_out,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with key tiles [lo, hi).

    Tiles in [full_lo, full_hi) are fully visible to every row and skip the mask arithmetic.
    """
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K + cols[:, None] * stride_ks + offs_d[None, :], cols, seq_len, offs_d, head_dim,
                       not EVEN_N, not EVEN_D)
        s = _mm(q, tl.trans(k))
        if HAS_SOFTCAP:
            s = cap_out * _tanh(s * cap_in)
        else:
            s = s * qk_scale
        if (start_n < full_lo) | (start_n >= full_hi):
            s = tl.where(_allowed(rows[:, None], cols[None, :], seq_len, window, CAUSAL, HAS_WINDOW), s,
                         float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V + cols[:, None] * stride_vs + offs_d[None, :], cols, seq_len, offs_d, head_dim,
                       not EVEN_N, not EVEN_D)
        acc = acc * alpha[:, None]
        acc = _mma(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seqlen", "window"])
def _attn_fwd(
    Q, K, V, O, LSE, CU, TABLE,
    qk_scale, cap_in, cap_out,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    n_heads, group, seqlen, head_dim, window, n_programs,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (n_programs, B * Hq). Writes O (B, Hq, S, D) and LSE (B, Hq, S) fp32 in log2 units."""
    pid = tl.program_id(0)
    if CAUSAL:
        pid = n_programs - 1 - pid  # the longest rows first: better tail balance
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // group
    seq_start, seq_len, m0 = _locate(pid, CU, TABLE, n_programs, seqlen, BLOCK_M, VARLEN)
    b64 = b.to(tl.int64)
    start64 = seq_start.to(tl.int64)
    Q += b64 * stride_qb + h.to(tl.int64) * stride_qh + start64 * stride_qs
    K += b64 * stride_kb + kvh.to(tl.int64) * stride_kh + start64 * stride_ks
    V += b64 * stride_vb + kvh.to(tl.int64) * stride_vh + start64 * stride_vs
    O += b64 * stride_ob + h.to(tl.int64) * stride_oh + start64 * stride_os
    LSE += bh.to(tl.int64) * seqlen + start64

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + rows[:, None] * stride_qs + offs_d[None, :], rows, seq_len, offs_d, head_dim,
                   not EVEN_M, not EVEN_D)
    # Finite start for the running max: a row that sees no key in a masked tile keeps p = exp2(-inf) = 0.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m0, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, stride_ks, stride_vs, rows, offs_n, offs_d, lo,
                               full_lo, full_hi, hi, seq_len, head_dim, window, qk_scale, cap_in, cap_out,
                               CAUSAL, HAS_WINDOW, HAS_SOFTCAP, EVEN_N, EVEN_D, BLOCK_N)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past the sequence end only; never stored
    inv = 1.0 / l_i
    out = acc * inv[:, None]
    _store_tile(O + rows[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty), rows, seq_len,
                offs_d, head_dim, not EVEN_M, not EVEN_D)
    lse = m_i + tl.log2(l_i)
    if EVEN_M:
        tl.store(LSE + rows, lse)
    else:
        tl.store(LSE + rows, lse, mask=rows < seq_len)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_os, stride_dob, stride_doh, stride_dos,
    n_heads, seqlen, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_M), B * Hq): DELTA (B, Hq, S) fp32 = rowsum(dO * O)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < seqlen) & (offs_d[None, :] < head_dim)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :], mask=mask,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seqlen + rows, delta, mask=rows < seqlen)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_dos, keys, offs_m, offs_d, lo, full_lo,
                full_hi, hi, seq_len, head_dim, window, qk_scale, cap_in, cap_out,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK, dV (BLOCK_N, BLOCK_D) fp32 over query tiles [lo, hi) of one query head.

    Works on transposed score tiles (keys x queries) so the key-block results need no transpose.
    Query rows past the sequence end load as zeros and are masked: they contribute nothing.
    """
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(Q + rows[:, None] * stride_qs + offs_d[None, :], rows, seq_len, offs_d, head_dim,
                       not EVEN_M, not EVEN_D)
        if EVEN_M:
            lse = tl.load(LSE + rows)
        else:
            lse = tl.load(LSE + rows, mask=rows < seq_len, other=0.0)
        s_t = _mm(k, tl.trans(q))
        if HAS_SOFTCAP:
            t = _tanh(s_t * cap_in)
            s_t = cap_out * t
        else:
            s_t = s_t * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        if (start_m < full_lo) | (start_m >= full_hi):
            ok = _allowed(rows[None, :], keys[:, None], seq_len, window, CAUSAL, HAS_WINDOW)
            p_t = tl.where(ok, p_t, 0.0)
        do = _load_tile(DO + rows[:, None] * stride_dos + offs_d[None, :], rows, seq_len, offs_d, head_dim,
                        not EVEN_M, not EVEN_D)
        dv = _mma(p_t.to(do.dtype), do, dv)
        if EVEN_M:
            delta = tl.load(DELTA + rows)
        else:
            delta = tl.load(DELTA + rows, mask=rows < seq_len, other=0.0)
        dp_t = _mm(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - t * t)
        dk = _mma(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit(do_not_specialize=["seqlen", "window"])
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, TABLE,
    qk_scale, cap_in, cap_out, sm_scale,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
    n_heads, n_kv_heads, group, seqlen, head_dim, window, n_programs,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (n_programs, B * Hk): dK, dV (B, Hk, S, D) of one key block, summed over its GQA group."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_kv_heads
    kvh = bh % n_kv_heads
    seq_start, seq_len, n0 = _locate(pid, CU, TABLE, n_programs, seqlen, BLOCK_N, VARLEN)
    b64 = b.to(tl.int64)
    start64 = seq_start.to(tl.int64)
    K += b64 * stride_kb + kvh.to(tl.int64) * stride_kh + start64 * stride_ks
    V += b64 * stride_vb + kvh.to(tl.int64) * stride_vh + start64 * stride_vs
    DK += b64 * stride_dkb + kvh.to(tl.int64) * stride_dkh + start64 * stride_dks
    DV += b64 * stride_dvb + kvh.to(tl.int64) * stride_dvh + start64 * stride_dvs

    keys = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + keys[:, None] * stride_ks + offs_d[None, :], keys, seq_len, offs_d, head_dim,
                   not EVEN_N, not EVEN_D)
    v = _load_tile(V + keys[:, None] * stride_vs + offs_d[None, :], keys, seq_len, offs_d, head_dim,
                   not EVEN_N, not EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_ranges(n0, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for g in range(0, group):  # the query heads reading this kv head: no atomics across programs
        h = kvh * group + g
        bh_q = (b * n_heads + h).to(tl.int64)
        Qh = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + start64 * stride_qs
        DOh = DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + start64 * stride_dos
        LSEh = LSE + bh_q * seqlen + start64
        DELTAh = DELTA + bh_q * seqlen + start64
        dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qs, stride_dos, keys, offs_m, offs_d,
                             lo, full_lo, full_hi, hi, seq_len, head_dim, window, qk_scale, cap_in, cap_out,
                             CAUSAL, HAS_WINDOW, HAS_SOFTCAP, EVEN_M, EVEN_D, BLOCK_M)
    dk = dk * sm_scale
    _store_tile(DK + keys[:, None] * stride_dks + offs_d[None, :], dk.to(DK.dtype.element_ty), keys, seq_len,
                offs_d, head_dim, not EVEN_N, not EVEN_D)
    _store_tile(DV + keys[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), keys, seq_len,
                offs_d, head_dim, not EVEN_N, not EVEN_D)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, stride_ks, stride_vs, rows, offs_n, offs_d, lo, full_lo, full_hi,
              hi, seq_len, head_dim, window, qk_scale, cap_in, cap_out,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_N: tl.constexpr,
              EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ (BLOCK_M, BLOCK_D) fp32 over key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K + cols[:, None] * stride_ks + offs_d[None, :], cols, seq_len, offs_d, head_dim,
                       not EVEN_N, not EVEN_D)
        v = _load_tile(V + cols[:, None] * stride_vs + offs_d[None, :], cols, seq_len, offs_d, head_dim,
                       not EVEN_N, not EVEN_D)
        s = _mm(q, tl.trans(k))
        if HAS_SOFTCAP:
            t = _tanh(s * cap_in)
            s = cap_out * t
        else:
            s = s * qk_scale
        p = tl.exp2(s - lse[:, None])
        if (start_n < full_lo) | (start_n >= full_hi):
            p = tl.where(_allowed(rows[:, None], cols[None, :], seq_len, window, CAUSAL, HAS_WINDOW), p, 0.0)
        dp = _mm(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _mma(ds.to(k.dtype), k, dq)
    return dq


@triton.jit(do_not_specialize=["seqlen", "window"])
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU, TABLE,
    qk_scale, cap_in, cap_out, sm_scale,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    n_heads, group, seqlen, head_dim, window, n_programs,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (n_programs, B * Hq): dQ (B, Hq, S, D) of one query block."""
    pid = tl.program_id(0)
    if CAUSAL:
        pid = n_programs - 1 - pid
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // group
    seq_start, seq_len, m0 = _locate(pid, CU, TABLE, n_programs, seqlen, BLOCK_M, VARLEN)
    b64 = b.to(tl.int64)
    start64 = seq_start.to(tl.int64)
    Q += b64 * stride_qb + h.to(tl.int64) * stride_qh + start64 * stride_qs
    DO += b64 * stride_dob + h.to(tl.int64) * stride_doh + start64 * stride_dos
    DQ += b64 * stride_dqb + h.to(tl.int64) * stride_dqh + start64 * stride_dqs
    K += b64 * stride_kb + kvh.to(tl.int64) * stride_kh + start64 * stride_ks
    V += b64 * stride_vb + kvh.to(tl.int64) * stride_vh + start64 * stride_vs
    LSE += bh.to(tl.int64) * seqlen + start64
    DELTA += bh.to(tl.int64) * seqlen + start64

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + rows[:, None] * stride_qs + offs_d[None, :], rows, seq_len, offs_d, head_dim,
                   not EVEN_M, not EVEN_D)
    do = _load_tile(DO + rows[:, None] * stride_dos + offs_d[None, :], rows, seq_len, offs_d, head_dim,
                    not EVEN_M, not EVEN_D)
    if EVEN_M:
        lse = tl.load(LSE + rows)
        delta = tl.load(DELTA + rows)
    else:
        lse = tl.load(LSE + rows, mask=rows < seq_len, other=0.0)
        delta = tl.load(DELTA + rows, mask=rows < seq_len, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m0, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, stride_ks, stride_vs, rows, offs_n, offs_d, lo, full_lo,
                   full_hi, hi, seq_len, head_dim, window, qk_scale, cap_in, cap_out, CAUSAL, HAS_WINDOW,
                   HAS_SOFTCAP, EVEN_N, EVEN_D, BLOCK_N)
    dq = dq * sm_scale
    _store_tile(DQ + rows[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty), rows, seq_len,
                offs_d, head_dim, not EVEN_M, not EVEN_D)


# ----------------------------------------------------------------------------- host side
CONFIGS: list[dict[str, int]] = [
    # Forward: BLOCK_M query rows x BLOCK_N key columns. Backward: BWD_BLOCK_OUTER is the resident
    # block (keys for dK/dV, queries for dQ), BWD_BLOCK_INNER the streamed one. Written for D <= 128,
    # 16-bit inputs and NVIDIA; :func:`plan` adapts them to D = 256, fp32 and AMD's 64 KiB LDS.
    # Shared memory at D = 128 bf16 (sm90, fwd / dK-dV): 128 / 96 KiB, 160 / 88 KiB, 112 / 80 KiB.
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3,
     "BWD_BLOCK_OUTER": 128, "BWD_BLOCK_INNER": 32, "bwd_num_warps": 8, "bwd_num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2,
     "BWD_BLOCK_OUTER": 128, "BWD_BLOCK_INNER": 16, "bwd_num_warps": 8, "bwd_num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3,
     "BWD_BLOCK_OUTER": 64, "BWD_BLOCK_INNER": 32, "bwd_num_warps": 4, "bwd_num_stages": 3},
]


@dataclass(frozen=True)
class Plan:
    """Concrete launch parameters of one call: the config adapted to the head dim and dtype.

    Rules (shared memory / registers scale with ``BLOCK_D`` and the element size):

    * ``BLOCK_D`` = next power of two >= max(D, 16); columns past D are masked.
    * D > 128 (BLOCK_D = 256): the query / accumulator tiles double, so the forward caps
      BLOCK_M at 64, BLOCK_N at 32 and num_stages at 2; the backward caps the resident block at 64
      (32 for fp32) and the streamed block at 16, uses 8 warps and num_stages <= 2 (dK and dV
      accumulators of 64 x 256 fp32 need two warpgroups' registers).
    * fp32 inputs (twice the bytes per tile): BLOCK_N and the streamed backward block are halved
      (at least 16) and num_stages is capped at 2.
    * AMD (``vendor="amd"``, 64 KiB LDS on gfx942): BLOCK_N <= 64 (32 for fp32) and num_stages <= 2
      for all kernels (the forward of ``CONFIGS[0]`` then needs 48 KiB instead of 80 KiB), and the
      backward uses at most 4 warps: with 8 a wave gets 256 VGPRs and the dK/dV kernel spills, with
      4 it gets 512 (gfx942, D = 128: 441 VGPRs, no spills).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    bwd_outer: int
    bwd_inner: int
    bwd_warps: int
    bwd_stages: int
    block_d: int
    extra: tuple[tuple[str, Any], ...] = ()  # backend compile options forwarded to every launch

    @property
    def fwd_options(self) -> dict[str, Any]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **dict(self.extra)}

    @property
    def bwd_options(self) -> dict[str, Any]:
        return {"num_warps": self.bwd_warps, "num_stages": self.bwd_stages, **dict(self.extra)}


def plan(config: dict[str, Any], head_dim: int, dtype: torch.dtype, vendor: str | None = None) -> Plan:
    """The launch parameters of ``config`` for head dim ``head_dim``, inputs of ``dtype``, on ``vendor``.

    ``vendor`` ``None``: ``"amd"`` if the config carries AMD compile options (the ROCm backend's
    derived configs always have ``waves_per_eu``), else ``"nvidia"``. Those options
    (:data:`AMD_OPTIONS`) are forwarded to every launch.
    """
    extra = tuple((key, config[key]) for key in AMD_OPTIONS if key in config)
    if vendor is None:
        vendor = "amd" if extra else "nvidia"
    block_d = max(16, triton.next_power_of_2(head_dim))
    bm, bn = int(config["BLOCK_M"]), int(config["BLOCK_N"])
    warps, stages = int(config["num_warps"]), int(config["num_stages"])
    outer, inner = int(config["BWD_BLOCK_OUTER"]), int(config["BWD_BLOCK_INNER"])
    bwarps, bstages = int(config["bwd_num_warps"]), int(config["bwd_num_stages"])
    wide = dtype.itemsize >= 4
    if block_d > 128:
        bm, bn, stages = min(bm, 64), min(bn, 32), min(stages, 2)
        outer, inner, bwarps, bstages = min(outer, 32 if wide else 64), min(inner, 16), 8, min(bstages, 2)
    if wide:
        bn, inner = max(16, bn // 2), max(16, inner // 2)
        stages, bstages = min(stages, 2), min(bstages, 2)
    if vendor == "amd":
        bn, stages, bstages = min(bn, 32 if wide else 64), min(stages, 2), min(bstages, 2)
        bwarps = min(bwarps, 4)
    return Plan(bm, bn, warps, stages, outer, inner, bwarps, bstages, block_d, extra)


def _vendor(t: torch.Tensor, config: dict[str, Any]) -> str:
    on_rocm = t.device.type == "cuda" and torch.version.hip is not None
    return "amd" if on_rocm or any(key in config for key in AMD_OPTIONS) else "nvidia"


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any (b, h, s) strides but need the head dim contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _packed_bounds(cu_seqlens: torch.Tensor, s: int) -> torch.Tensor:
    """Segment boundaries exactly as the reference reads ``cu_seqlens``: (nseg + 1,) int32.

    The reference puts position p in segment ``#{cu[1:] <= p}``: segment 0 starts at 0 whatever
    ``cu[0]`` says, and positions past ``cu[-1]`` form one more segment. Built on the device, no sync.
    """
    cu = cu_seqlens.to(device=cu_seqlens.device, dtype=torch.int32).clamp(0, s)
    edge = cu.new_tensor([0]), cu.new_tensor([s])
    return torch.cat([edge[0], cu[1:], edge[1]])


def _block_table(bounds: torch.Tensor, s: int, block: int) -> tuple[torch.Tensor, int]:
    """Map program ids to (segment, block within segment): (2, n_programs) int32, and n_programs.

    ``n_programs = cdiv(S, block) + nseg`` bounds the true count (each segment adds at most one
    partial block); surplus programs get segment -1 and do nothing. Device-side, no host sync.
    """
    nseg = bounds.numel() - 1
    lengths = (bounds[1:] - bounds[:-1]).long()
    blocks = (lengths + block - 1) // block
    ends = torch.cumsum(blocks, 0)
    n_programs = triton.cdiv(s, block) + nseg
    pid = torch.arange(n_programs, device=bounds.device)
    seg = torch.searchsorted(ends, pid, right=True)
    valid = seg < nseg
    seg_c = seg.clamp(max=nseg - 1)
    blk = pid - (ends[seg_c] - blocks[seg_c])
    table = torch.stack([torch.where(valid, seg_c, -1), torch.where(valid, blk, 0)]).to(torch.int32)
    return table.contiguous(), n_programs


@dataclass
class _Call:
    """Everything both passes need about one call, computed once."""

    causal: bool
    scale: float
    window: int
    has_window: bool
    softcap: float | None
    bounds: torch.Tensor | None  # packed segment boundaries, or None
    plan: Plan

    @property
    def qk_scale(self) -> float:
        return self.scale * LOG2E

    @property
    def cap_in(self) -> float:
        return self.scale / self.softcap if self.softcap else 0.0

    @property
    def cap_out(self) -> float:
        return self.softcap * LOG2E if self.softcap else 0.0


_DUMMIES: dict[torch.device, torch.Tensor] = {}


def _dummy_i32(device: torch.device) -> torch.Tensor:
    """A tiny int32 tensor for the table / cu_seqlens pointers of unpacked calls (never read)."""
    if device not in _DUMMIES:
        _DUMMIES[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return _DUMMIES[device]


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             call: _Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward: returns O (B, Hq, S, D) in q's dtype and LSE (B, Hq, S) fp32 (log2 units)."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    p = call.plan
    out = torch.empty((b, hq, s, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    varlen = call.bounds is not None
    if varlen:
        table, n_programs = _block_table(call.bounds, s, p.block_m)
        cu = call.bounds
    else:
        n_programs = triton.cdiv(s, p.block_m)
        table = cu = _dummy_i32(q.device)
    _attn_fwd[(n_programs, b * hq)](
        q, k, v, out, lse, cu, table,
        call.qk_scale, call.cap_in, call.cap_out,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        hq, hq // hk, s, d, call.window, n_programs,
        CAUSAL=call.causal, HAS_WINDOW=call.has_window, HAS_SOFTCAP=call.softcap is not None, VARLEN=varlen,
        EVEN_M=not varlen and s % p.block_m == 0, EVEN_N=not varlen and s % p.block_n == 0,
        EVEN_D=d == p.block_d,
        BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_D=p.block_d,
        **p.fwd_options,
    )
    return out, lse


def _delta_block(block_d: int) -> int:
    return max(16, min(128, 8192 // block_d))


def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, call: _Call, want_dq: bool, want_dkdv: bool,
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch delta, dK/dV and dQ kernels: returns (dq, dk, dv) shaped like q, k, v (None if unwanted)."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    p = call.plan
    do = _rows_contiguous(do)
    delta = torch.empty_like(lse)
    bd = _delta_block(p.block_d)
    _attn_bwd_delta[(triton.cdiv(s, bd), b * hq)](
        out, do, delta, *_strides(out), *_strides(do), hq, s, d,
        BLOCK_M=bd, BLOCK_D=p.block_d, **{**p.bwd_options, "num_warps": 4, "num_stages": 1},
    )
    varlen = call.bounds is not None
    if varlen:
        table, n_programs = _block_table(call.bounds, s, p.bwd_outer)
        cu = call.bounds
    else:
        n_programs = triton.cdiv(s, p.bwd_outer)
        table = cu = _dummy_i32(q.device)
    flags = dict(CAUSAL=call.causal, HAS_WINDOW=call.has_window, HAS_SOFTCAP=call.softcap is not None,
                 VARLEN=varlen, EVEN_D=d == p.block_d, BLOCK_D=p.block_d, **p.bwd_options)
    even_outer = not varlen and s % p.bwd_outer == 0
    even_inner = not varlen and s % p.bwd_inner == 0
    dq = dk = dv = None
    if want_dkdv:
        dk = torch.empty((b, hk, s, d), dtype=k.dtype, device=k.device)
        dv = torch.empty((b, hk, s, d), dtype=v.dtype, device=v.device)
        _attn_bwd_dkdv[(n_programs, b * hk)](
            q, k, v, do, lse, delta, dk, dv, cu, table,
            call.qk_scale, call.cap_in, call.cap_out, call.scale,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            hq, hk, hq // hk, s, d, call.window, n_programs,
            EVEN_M=even_inner, EVEN_N=even_outer, BLOCK_M=p.bwd_inner, BLOCK_N=p.bwd_outer, **flags,
        )
    if want_dq:
        dq = torch.empty((b, hq, s, d), dtype=q.dtype, device=q.device)
        _attn_bwd_dq[(n_programs, b * hq)](
            q, k, v, do, lse, delta, dq, cu, table,
            call.qk_scale, call.cap_in, call.cap_out, call.scale,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            hq, hq // hk, s, d, call.window, n_programs,
            EVEN_M=even_outer, EVEN_N=even_inner, BLOCK_M=p.bwd_outer, BLOCK_N=p.bwd_inner, **flags,
        )
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    """Forward saves q, k, v, out and the fp32 log2-unit LSE; backward recomputes the scores."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: _Call) -> torch.Tensor:
        out, lse = _forward(q, k, v, call)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        return out

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq, dk, dv = _backward(do, q, k, v, out, lse, ctx.call, want_dq=need[0], want_dkdv=need[1] or need[2])
        return dq, dk, dv, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """FlashAttention of ``q`` (B, Hq, S, D) over ``k``/``v`` (B, Hk, S, D); returns (B, Hq, S, D).

    Same meaning as :func:`slipstream.ops.attention.reference`; differentiable in q, k and v.
    ``config``: one of :data:`CONFIGS` (``None``: the first), adapted by :func:`plan`.
    """
    config = CONFIGS[0] if config is None else config
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    d = q.shape[-1]
    call = _Call(
        causal=bool(causal),
        scale=float(d ** -0.5 if scale is None else scale),
        window=int(sliding_window or 0),
        has_window=sliding_window is not None,
        softcap=None if softcap is None else float(softcap),
        bounds=None if cu_seqlens is None else _packed_bounds(cu_seqlens, q.shape[2]),
        plan=plan(config, d, q.dtype, _vendor(q, config)),
    )
    return _FlashAttention.apply(q, k, v, call)


def accepts(q: Any, k: Any, v: Any, causal: bool = True, scale: float | None = None,
            sliding_window: int | None = None, softcap: float | None = None,
            cu_seqlens: torch.Tensor | None = None) -> bool:
    """Inputs this kernel handles: fp16/bf16/fp32, 1 <= D <= 256, non-empty, GQA, packed with B == 1."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return False
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.device.type == "cpu" and not interpreter_on():
        return False
    b, hq, s, d = q.shape
    hk = k.shape[1]
    if min(b, hq, s, d, hk) < 1 or d > MAX_HEAD_DIM or hq % hk or k.shape != v.shape:
        return False
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        return False
    if sliding_window is not None and sliding_window < 1:
        return False
    if softcap is not None and not softcap > 0:
        return False
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.is_floating_point():
            return False
        if b != 1 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.device != q.device:
            return False
    return True


# ----------------------------------------------------------------------------- ahead-of-time units
def _sig(names: str, kind: str) -> dict[str, str]:
    return {n.strip(): kind for n in names.split(",") if n.strip()}


_STRIDES_QKV_DO = ("stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, "
                   "stride_vs, stride_dob, stride_doh, stride_dos")


def aot_units(config: dict[str, Any], head_dim: int = 128, dtype: torch.dtype = torch.bfloat16, *,
              vendor: str | None = None, causal: bool = True, window: bool = False, softcap: bool = False,
              varlen: bool = False, even: bool = True) -> list[AotUnit]:
    """Every kernel one call launches for ``config`` (forward, delta, dK/dV, dQ), with its signature.

    The defaults are the hot path (causal, S a multiple of every block, no window / softcap /
    packing); the flags select the other specialisations for broader compile checks. ``vendor``
    as in :func:`plan`.
    """
    p = plan(config, head_dim, dtype, vendor)
    t = ptr(dtype)
    even = even and not varlen
    shape = {"EVEN_M": even, "EVEN_N": even, "EVEN_D": head_dim == p.block_d, "BLOCK_D": p.block_d}
    feats = {"CAUSAL": causal, "HAS_WINDOW": window, "HAS_SOFTCAP": softcap, "VARLEN": varlen, **shape}
    fwd_sig = {**_sig("Q, K, V, O", t), **_sig("LSE", "*fp32"), **_sig("CU, TABLE", "*i32"),
               **_sig("qk_scale, cap_in, cap_out", "fp32"),
               **_sig("stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, "
                      "stride_vh, stride_vs, stride_ob, stride_oh, stride_os, n_heads, group, seqlen, "
                      "head_dim, window, n_programs", "i32")}
    delta_sig = {**_sig("O, DO", t), **_sig("DELTA", "*fp32"),
                 **_sig("stride_ob, stride_oh, stride_os, stride_dob, stride_doh, stride_dos, n_heads, "
                        "seqlen, head_dim", "i32")}
    dkdv_sig = {**_sig("Q, K, V, DO", t), **_sig("LSE, DELTA", "*fp32"), **_sig("DK, DV", t),
                **_sig("CU, TABLE", "*i32"), **_sig("qk_scale, cap_in, cap_out, sm_scale", "fp32"),
                **_sig(_STRIDES_QKV_DO + ", stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, "
                       "stride_dvs, n_heads, n_kv_heads, group, seqlen, head_dim, window, n_programs", "i32")}
    dq_sig = {**_sig("Q, K, V, DO", t), **_sig("LSE, DELTA", "*fp32"), **_sig("DQ", t),
              **_sig("CU, TABLE", "*i32"), **_sig("qk_scale, cap_in, cap_out, sm_scale", "fp32"),
              **_sig(_STRIDES_QKV_DO + ", stride_dqb, stride_dqh, stride_dqs, n_heads, group, seqlen, "
                     "head_dim, window, n_programs", "i32")}

    def unit(name: str, fn: Any, sig: dict[str, str], const: dict[str, Any], opt: dict[str, Any]) -> AotUnit:
        return AotUnit(name, fn, {**sig, **{c: "constexpr" for c in const}}, const, opt)

    return [
        unit("attention_fwd", _attn_fwd, fwd_sig, {**feats, "BLOCK_M": p.block_m, "BLOCK_N": p.block_n},
             p.fwd_options),
        unit("attention_bwd_delta", _attn_bwd_delta, delta_sig,
             {"BLOCK_M": _delta_block(p.block_d), "BLOCK_D": p.block_d},
             {**p.bwd_options, "num_warps": 4, "num_stages": 1}),
        unit("attention_bwd_dkdv", _attn_bwd_dkdv, dkdv_sig,
             {**feats, "BLOCK_M": p.bwd_inner, "BLOCK_N": p.bwd_outer}, p.bwd_options),
        unit("attention_bwd_dq", _attn_bwd_dq, dq_sig,
             {**feats, "BLOCK_M": p.bwd_outer, "BLOCK_N": p.bwd_inner}, p.bwd_options),
    ]


def aot(config: dict[str, Any]) -> list[AotUnit]:
    """AOT units of ``config`` for the hot path: bf16, D = 128, causal, no window / softcap / packing."""
    return aot_units(config)


KERNELS = [
    PortableKernel(
        op="attention",
        name="flash_attention",
        fn=attention,
        configs=CONFIGS,
        accepts=accepts,
        aot=aot,
        description="Triton FlashAttention-2 fwd+bwd: GQA, causal, sliding window, softcap, packed",
        tags=("dot",),
    )
]
