"""``rope``: HF ``rotate_half`` rotary position embedding applied to q and k together."""

from __future__ import annotations

import torch

from slipstream.dispatch import call
from slipstream.ops._spec import (
    ELEMENTWISE_TOLERANCES,
    FLOAT_DTYPES,
    OpSpec,
    Sample,
    bucket,
    like,
    require_dtype,
    require_same_device,
    require_tensor,
)

OP = "rope"


def _gather(table: torch.Tensor, q: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """cos/sin as (B, 1, S, D) in fp32, whichever of the accepted layouts they came in."""
    if position_ids is not None:
        table = table[position_ids]  # (P, D) -> (B, S, D)
    if table.dim() == 2:
        table = table.unsqueeze(0)
    return table.float().unsqueeze(1)


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``t * cos + rotate_half(t) * sin`` for t in (q, k), in fp32, cast back.

    Shapes: ``q`` (B, Hq, S, D), ``k`` (B, Hk, S, D) (GQA: Hk may differ from Hq). ``cos``/``sin``
    are either already gathered per token, (B, S, D) or (S, D), as HF's rotary embedding returns
    them, or a table (P, D) indexed by ``position_ids`` (B, S) (packed sequences restart at 0).
    """
    c = _gather(cos, q, position_ids)
    s = _gather(sin, q, position_ids)
    qf, kf = q.float(), k.float()
    q_out = qf * c + _rotate_half(qf) * s
    k_out = kf * c + _rotate_half(kf) * s
    return q_out.to(q.dtype), k_out.to(k.dtype)


def check(args: tuple) -> tuple:
    q, k, cos, sin, position_ids = args
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        require_tensor(name, t, op=OP)
        require_dtype(OP, name, t, FLOAT_DTYPES)
    device = require_same_device(OP, q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{OP}: `q` and `k` must be (B, H, S, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    b, hq, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"{OP}: `k` {tuple(k.shape)} must match `q` {tuple(q.shape)} in B, S and D")
    if d % 2:
        raise ValueError(f"{OP}: head dim D must be even, got {d}")
    if cos.shape != sin.shape:
        raise ValueError(f"{OP}: `cos` {tuple(cos.shape)} and `sin` {tuple(sin.shape)} must have one shape")
    if position_ids is not None:
        require_tensor("position_ids", position_ids, op=OP, floating=False)
        if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
            raise TypeError(f"{OP}: `position_ids` must be an integer tensor, got {position_ids.dtype}")
        if cos.dim() != 2 or cos.shape[-1] != d:
            raise ValueError(f"{OP}: with `position_ids`, `cos`/`sin` must be a (P, {d}) table, "
                             f"got {tuple(cos.shape)}")
        if tuple(position_ids.shape) not in ((b, s), (1, s)):
            raise ValueError(f"{OP}: `position_ids` must be ({b}, {s}), got {tuple(position_ids.shape)}")
    elif cos.shape not in ((b, s, d), (1, s, d), (s, d)):
        raise ValueError(f"{OP}: `cos`/`sin` must be ({b}, {s}, {d}) or ({s}, {d}), got {tuple(cos.shape)}")
    return (
        OP, device, q.dtype, k.dtype, cos.dtype, hq, k.shape[1], d, bucket(b * s),
        q.requires_grad, k.requires_grad, position_ids is not None, cos.dim(),
    )


def fresh(args: tuple, max_elements: int | None) -> tuple:
    q, k, cos, sin, position_ids = args
    b, hq, s, d = q.shape
    if max_elements is not None and b * hq * s * d > max_elements:
        b = 1
        s = max(1, min(s, max_elements // max(1, hq * d)))
    hk = k.shape[1]
    angles = torch.rand(s, d // 2, device=q.device) * 6.283
    table = torch.cat((angles, angles), dim=-1)
    if position_ids is not None:
        p = cos.shape[0]
        pos = torch.randint(0, p, (b, s), device=q.device)
        big = torch.rand(p, d // 2, device=q.device) * 6.283
        big = torch.cat((big, big), dim=-1)
        return (like(q, (b, hq, s, d)), like(k, (b, hk, s, d)), big.cos().to(cos.dtype),
                big.sin().to(sin.dtype), pos.to(position_ids.dtype))
    shape = (s, d) if cos.dim() == 2 else (cos.shape[0] if cos.shape[0] == 1 else b, s, d)
    c, sn = table.cos().expand(shape).contiguous(), table.sin().expand(shape).contiguous()
    return like(q, (b, hq, s, d)), like(k, (b, hk, s, d)), c.to(cos.dtype), sn.to(sin.dtype), None


def _tables(b: int, s: int, d: int, device: torch.device, dtype: torch.dtype) -> tuple:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    pos = torch.arange(s, device=device, dtype=torch.float32)
    ang = torch.outer(pos, inv)
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(dtype).expand(b, s, d).contiguous(), emb.sin().to(dtype).expand(b, s, d).contiguous()


def samples(device: torch.device, dtype: torch.dtype, size: str = "small") -> list[Sample]:
    def make(label: str, b: int, hq: int, hk: int, s: int, d: int) -> Sample:
        q = torch.randn(b, hq, s, d, device=device, dtype=dtype)
        k = torch.randn(b, hk, s, d, device=device, dtype=dtype)
        cos, sin = _tables(b, s, d, device, dtype)
        return Sample(label, (q, k, cos, sin, None))

    def packed(label: str, hq: int, hk: int, lengths: list[int], d: int) -> Sample:
        s = sum(lengths)
        pos = torch.cat([torch.arange(n, device=device) for n in lengths]).unsqueeze(0)
        cos, sin = _tables(1, max(lengths), d, device, dtype)
        q = torch.randn(1, hq, s, d, device=device, dtype=dtype)
        k = torch.randn(1, hk, s, d, device=device, dtype=dtype)
        return Sample(label, (q, k, cos[0].contiguous(), sin[0].contiguous(), pos))

    if size == "real":
        return [make("llama8b B2 S4096", 2, 32, 8, 4096, 128),
                packed("packed 3 seqs", 32, 8, [1500, 2000, 596], 128)]
    return [make("B2 H4/2 S8 D16", 2, 4, 2, 8, 16), make("1 token", 1, 3, 1, 1, 8),
            make("odd S13 D6", 1, 5, 5, 13, 6), packed("packed", 4, 2, [3, 7, 1], 16)]


SPEC = OpSpec(
    name=OP,
    reference=reference,
    tolerances=ELEMENTWISE_TOLERANCES,
    check=check,
    fresh=fresh,
    samples=samples,
    differentiable=("q", "k"),
)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q`` (B, Hq, S, D) and ``k`` (B, Hk, S, D); see :func:`reference`."""
    return call(SPEC, (q, k, cos, sin, position_ids))
