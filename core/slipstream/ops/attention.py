"""``attention``: causal scaled-dot-product attention with GQA, sliding window, softcap, packing."""

from __future__ import annotations

import torch

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
)

OP = "attention"


def allowed_mask(s: int, device: torch.device, causal: bool, sliding_window: int | None,
                 cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """(S, S) bool: may query i attend to key j. HF semantics: with a window W, ``i - j < W``."""
    i = torch.arange(s, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    ok = torch.ones(s, s, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= i
    if sliding_window is not None:
        ok &= (i - j) < sliding_window
        if not causal:
            ok &= (j - i) < sliding_window
    if cu_seqlens is not None:
        seg = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(s, device=device), right=True)
        ok &= seg[:, None] == seg[None, :]
    return ok


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(mask(cap(q @ k.T * scale))) @ v`` in fp32, cast back.

    Shapes: ``q`` (B, Hq, S, D); ``k``, ``v`` (B, Hk, S, D) with Hq a multiple of Hk (GQA: query
    head h reads kv head ``h // (Hq // Hk)``). ``scale`` defaults to ``D ** -0.5``. ``softcap``:
    scores become ``softcap * tanh(scores / softcap)`` before masking (Gemma 2). ``sliding_window``
    W: query i sees keys ``i - W < j <= i``. ``cu_seqlens`` (nseq + 1,) int32 with B == 1: packed
    sequences ``[cu[n], cu[n+1])`` that never attend to each other. Returns (B, Hq, S, D).
    """
    b, hq, s, d = q.shape
    group = hq // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    wide = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(wide) @ kf.to(wide).transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed_mask(s, q.device, causal, sliding_window, cu_seqlens), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vf.to(wide)).to(q.dtype)


def check(args: tuple) -> tuple:
    q, k, v, causal, scale, sliding_window, softcap, cu_seqlens = args
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_tensor(name, t, op=OP)
        require_dtype(OP, name, t, FLOAT_DTYPES)
        if t.dim() != 4:
            raise ValueError(f"{OP}: `{name}` must be (B, H, S, D), got {tuple(t.shape)}")
    device = require_same_device(OP, q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    b, hq, s, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"{OP}: `k` {tuple(k.shape)} and `v` {tuple(v.shape)} must be "
                         f"(B={b}, Hk, S={s}, D={d})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{OP}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    hk = k.shape[1]
    if hk == 0 or hq % hk:
        raise ValueError(f"{OP}: query heads ({hq}) must be a multiple of key/value heads ({hk})")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{OP}: `sliding_window` must be >= 1 or None, got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{OP}: `softcap` must be > 0 or None, got {softcap}")
    if cu_seqlens is not None:
        require_tensor("cu_seqlens", cu_seqlens, op=OP, floating=False)
        if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
            raise TypeError(f"{OP}: `cu_seqlens` must be an integer tensor, got {cu_seqlens.dtype}")
        if b != 1 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"{OP}: packed sequences need B == 1 and `cu_seqlens` (nseq + 1,); got B={b}, "
                             f"cu_seqlens {tuple(cu_seqlens.shape)}")
    return (OP, device, q.dtype, hq, hk, d, b, bucket(s), causal, scale, sliding_window, softcap,
            cu_seqlens is not None, q.requires_grad, k.requires_grad, v.requires_grad)


def random_cu_seqlens(s: int, like_t: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Cut S tokens into up to 4 random segments; (nseq + 1,) int32 boundaries starting at 0."""
    cuts = sorted(set(torch.randint(1, max(2, s), (3,)).tolist())) if s > 1 else []
    bounds = [0, *[c for c in cuts if 0 < c < s], s]
    return torch.tensor(bounds, dtype=torch.int32 if like_t is None else like_t.dtype, device=device)


def fresh(args: tuple, max_elements: int | None) -> tuple:
    q, k, v, causal, scale, sliding_window, softcap, cu_seqlens = args
    b, hq, s, d = q.shape
    hk = k.shape[1]
    if max_elements is not None and b * hq * s * s > max_elements:  # the score matrix is what grows
        b = 1 if cu_seqlens is not None else max(1, min(b, 2))
        s = max(1, min(s, int((max_elements // max(1, b * hq)) ** 0.5)))
    cu = None if cu_seqlens is None else random_cu_seqlens(s, cu_seqlens, q.device)
    return (like(q, (b, hq, s, d)), like(k, (b, hk, s, d)), like(v, (b, hk, s, d)), causal, scale,
            sliding_window, softcap, cu)


def samples(device: torch.device, dtype: torch.dtype, size: str = "small") -> list[Sample]:
    def make(label: str, b: int, hq: int, hk: int, s: int, d: int, window: int | None = None,
             softcap: float | None = None, packed: list[int] | None = None) -> Sample:
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype) for h in (hq, hk, hk))
        cu = None
        if packed is not None:
            cu = torch.tensor([0, *torch.tensor(packed).cumsum(0).tolist()], dtype=torch.int32, device=device)
        return Sample(label, (q, k, v, True, None, window, softcap, cu))

    if size == "real":
        return [make("llama8b B2 S4096", 2, 32, 8, 4096, 128),
                make("gemma2 window 4096 softcap", 1, 16, 8, 8192, 256, window=4096, softcap=50.0),
                make("packed 3 seqs", 1, 32, 8, 4096, 128, packed=[1000, 2500, 596])]
    return [make("B2 H4/2 S16 D16", 2, 4, 2, 16, 16), make("1 token", 1, 2, 1, 1, 8),
            make("odd S37 D24", 1, 3, 3, 37, 24),
            make("window 5 softcap", 1, 4, 2, 20, 16, window=5, softcap=2.0),
            make("packed", 1, 4, 1, 19, 16, packed=[5, 1, 13])]


SPEC = OpSpec(
    name=OP,
    reference=reference,
    tolerances=MATMUL_TOLERANCES,
    check=check,
    fresh=fresh,
    samples=samples,
    differentiable=("q", "k", "v"),
)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q`` (B, Hq, S, D) over ``k``/``v`` (B, Hk, S, D); see :func:`reference`."""
    return call(SPEC, (q, k, v, causal, scale, sliding_window, softcap, cu_seqlens))
