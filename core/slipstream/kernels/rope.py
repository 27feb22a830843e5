"""Triton rotary position embedding (HF ``rotate_half`` convention) for q and k in one launch.

For each token, with ``x1 = x[..., :D/2]``, ``x2 = x[..., D/2:]`` and the token's ``cos``/``sin`` rows
split the same way into ``c1, c2`` and ``s1, s2``::

    forward:   o1 = x1 * c1 - x2 * s1        o2 = x2 * c2 + x1 * s2
    backward:  d1 = g1 * c1 + g2 * s2        d2 = g2 * c2 - g1 * s1

Backward is the exact transpose of the forward map, which for HF's tables (``c1 == c2``,
``s1 == s2``) is the rotation by ``-angle``; it is the same kernel with ``BACKWARD`` set.

Grid: one program per (batch, position) token. It loads that token's cos/sin row once (from a
gathered (B, S, D) / (1, S, D) / (S, D) tensor, or from a (P, D) table at ``position_ids[b, s]`` for
packed sequences), then rotates every q head and then every k head of the token in tiles of
(BLOCK_H heads, D/2), so GQA (Hk != Hq) costs nothing extra and cos/sin are read once per token
instead of once per head. q/k may be strided views (HF's ``view(B, S, H, D).transpose(1, 2)``: the
heads of one token are then contiguous); only the head dim must be unit-stride. Outputs are new
tensors (inputs are never written), laid out like the inputs where possible. Math is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._aot import AotUnit, ptr
from slipstream.kernels._catalog import PortableKernel, launch_options

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 1024
MAX_HEADS = 1024

CONFIGS: list[dict] = [
    {"num_warps": 4, "block_heads": 16},
    {"num_warps": 8, "block_heads": 32},
    {"num_warps": 2, "block_heads": 8},
    {"num_warps": 4, "block_heads": 32},
]
"""Tuning space. ``block_heads``: heads rotated per tile (capped at the next power of two of the
head count); a token's heads are processed in a loop of such tiles. ``num_warps`` is a power of two
valid for 32-wide warps and 64-wide wavefronts."""


@triton.jit
def _rotate_heads(
    X, O, x_base, o_base, n_heads, stride_xh, stride_oh, half,
    c1, c2, s1, s2,  # (1, BLOCK_HALF) fp32 rows of this token
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
):
    """Rotate heads [0, n_heads) of one token: X + x_base + h * stride_xh + d -> O likewise."""
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    for h0 in range(0, n_heads, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask = (h < n_heads)[:, None] & d_mask[None, :]
        x_ptr = X + x_base + h[:, None] * stride_xh + d[None, :]
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        o_ptr = O + o_base + h[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, o1.to(O.dtype.element_ty), mask=mask)
        tl.store(o_ptr + half, o2.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K,  # *in (B, Hq, S, D), (B, Hk, S, D); head dim unit-stride
    QO, KO,  # *out, same shapes
    COS, SIN,  # *cs: rows indexed by (b, r) through stride_*b (0 when shared over the batch) and stride_*s
    POS,  # *int (B or 1, S) positions (read only when HAS_POS)
    seq_len, n_q_heads, n_k_heads, half,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_qob, stride_qoh, stride_qos,
    stride_kob, stride_koh, stride_kos,
    stride_cb, stride_cs, stride_sb, stride_ss,
    stride_pb, stride_ps,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    HAS_POS: tl.constexpr, BACKWARD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    if HAS_POS:
        r = tl.load(POS + b * stride_pb + s * stride_ps).to(tl.int64)
    else:
        r = s
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    c_ptr = COS + b * stride_cb + r * stride_cs + d
    s_ptr = SIN + b * stride_sb + r * stride_ss + d
    c1 = tl.load(c_ptr, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_ptr + half, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_ptr, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_ptr + half, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q, QO, b * stride_qb + s * stride_qs, b * stride_qob + s * stride_qos, n_q_heads,
                  stride_qh, stride_qoh, half, c1, c2, s1, s2, BLOCK_HQ, BLOCK_HALF, BACKWARD)
    _rotate_heads(K, KO, b * stride_kb + s * stride_ks, b * stride_kob + s * stride_kos, n_k_heads,
                  stride_kh, stride_koh, half, c1, c2, s1, s2, BLOCK_HK, BLOCK_HALF, BACKWARD)


# ----------------------------------------------------------------------------- launcher
def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _table_strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch stride, row stride) of a cos/sin tensor; batch stride 0 when shared by the batch."""
    if t.dim() == 2:  # (S, D), or a (P, D) table read through position_ids
        return 0, t.stride(0)
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1)


def _block_heads(n_heads: int, config: dict) -> int:
    return min(int(config.get("block_heads", 16)), triton.next_power_of_2(max(1, n_heads)))


def _launch(q, k, qo, ko, cos, sin, pos, config: dict, backward: bool) -> None:
    """Rotate ``q`` -> ``qo`` and ``k`` -> ``ko`` (either pair may be None: skipped) in one launch."""
    ref = q if q is not None else k
    b, _, s, d = ref.shape
    if b * s == 0:
        return
    hq = q.shape[1] if q is not None else 0
    hk = k.shape[1] if k is not None else 0
    q_, qo_ = (q, qo) if q is not None else (k, ko)
    k_, ko_ = (k, ko) if k is not None else (q, qo)
    if pos is not None:
        pos_ptr, pb, ps = pos, (0 if pos.shape[0] == 1 else pos.stride(0)), pos.stride(1)
    else:
        pos_ptr, pb, ps = cos, 0, 0
    cb, cs = _table_strides(cos)
    sb, ss = _table_strides(sin)
    _rope_kernel[(b * s,)](
        q_, k_, qo_, ko_, cos, sin, pos_ptr, s, hq, hk, d // 2,
        q_.stride(0), q_.stride(1), q_.stride(2), k_.stride(0), k_.stride(1), k_.stride(2),
        qo_.stride(0), qo_.stride(1), qo_.stride(2), ko_.stride(0), ko_.stride(1), ko_.stride(2),
        cb, cs, sb, ss, pb, ps,
        BLOCK_HQ=_block_heads(hq, config), BLOCK_HK=_block_heads(hk, config),
        BLOCK_HALF=triton.next_power_of_2(max(1, d // 2)), HAS_POS=pos is not None, BACKWARD=backward,
        num_warps=config["num_warps"], **launch_options(config),
    )


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, config: dict):
        q_in, k_in = _unit_last(q), _unit_last(k)
        cos, sin = _unit_last(cos), _unit_last(sin)
        qo, ko = torch.empty_like(q_in), torch.empty_like(k_in)
        _launch(q_in, k_in, qo, ko, cos, sin, position_ids, config, backward=False)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.config = config
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin, position_ids = ctx.saved_tensors
        want_q, want_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dqo = _unit_last(dqo) if want_q else None
        dko = _unit_last(dko) if want_k else None
        dq = torch.empty_like(dqo) if want_q else None
        dk = torch.empty_like(dko) if want_k else None
        if want_q or want_k:
            _launch(dqo, dko, dq, dk, cos, sin, position_ids, ctx.config, backward=True)
        return dq, dk, None, None, None, None


# ----------------------------------------------------------------------------- public API
def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q`` (B, Hq, S, D) and ``k`` (B, Hk, S, D); returns new (q, k).

    ``cos``/``sin``: (B, S, D), (1, S, D) or (S, D) per token, or a (P, D) table indexed by
    ``position_ids`` (B, S) or (1, S). ``config``: one of :data:`CONFIGS` (``None``: the first).
    Differentiable in ``q`` and ``k``.
    """
    return _Rope.apply(q, k, cos, sin, position_ids, config or CONFIGS[0])


def accepts(q: object, k: object, cos: object, sin: object, position_ids: object = None) -> bool:
    """Supported float dtypes (q and k alike), 4-D q/k, even D <= :data:`MAX_HEAD_DIM`, integer positions."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
        return False
    if q.dtype not in DTYPES or k.dtype != q.dtype or cos.dtype not in DTYPES or sin.dtype not in DTYPES:
        return False
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] % 2 or q.shape[-1] > MAX_HEAD_DIM:
        return False
    if max(q.shape[1], k.shape[1]) > MAX_HEADS:
        return False
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
            return False
        if position_ids.dim() != 2 or cos.dim() != 2:
            return False
    return cos.dim() in (2, 3)


AOT_SHAPE = {"n_q_heads": 32, "n_k_heads": 8, "head_dim": 128}
"""Shape compiled ahead of time: Llama-3-8B (32 q heads, 8 kv heads, head dim 128)."""


def aot(config: dict, dtype: torch.dtype = torch.bfloat16) -> list[AotUnit]:
    """Forward and backward, with and without ``position_ids`` (int64), for ``dtype`` q/k/cos/sin."""
    p = ptr(dtype)
    sig = {"Q": p, "K": p, "QO": p, "KO": p, "COS": p, "SIN": p, "POS": "*i64"}
    ints = ["seq_len", "n_q_heads", "n_k_heads", "half",
            "stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks",
            "stride_qob", "stride_qoh", "stride_qos", "stride_kob", "stride_koh", "stride_kos",
            "stride_cb", "stride_cs", "stride_sb", "stride_ss", "stride_pb", "stride_ps"]
    sig.update({name: "i32" for name in ints})
    sig.update({name: "constexpr" for name in ("BLOCK_HQ", "BLOCK_HK", "BLOCK_HALF", "HAS_POS", "BACKWARD")})
    blocks = {"BLOCK_HQ": _block_heads(AOT_SHAPE["n_q_heads"], config),
              "BLOCK_HK": _block_heads(AOT_SHAPE["n_k_heads"], config),
              "BLOCK_HALF": triton.next_power_of_2(AOT_SHAPE["head_dim"] // 2)}
    units = []
    for has_pos in (False, True):
        for backward in (False, True):
            units.append(AotUnit(f"rope[pos={int(has_pos)},bwd={int(backward)}]", _rope_kernel, dict(sig),
                                 {**blocks, "HAS_POS": has_pos, "BACKWARD": backward},
                                 {"num_warps": config["num_warps"]}))
    return units


KERNELS = [
    PortableKernel(
        op="rope", name="rope", fn=rope, configs=CONFIGS, accepts=accepts, aot=aot,
        description="Triton RoPE: q and k heads of a token in one program, cos/sin read once per token",
    )
]
