"""NVIDIA library candidates: PyTorch SDPA with each of its backends, and ``flash-attn`` if installed.

They implement the ``attention`` op for the cases those libraries cover (no softcap; sliding
window and packing only through ``flash-attn``); the dispatcher times them against our Triton kernel.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def sdpa(backend: str):
    """An ``attention`` implementation pinned to one SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, SDPA_BACKENDS[backend])
    native_gqa = backend == "flash"  # cuDNN and mem-efficient refuse enable_gqa: expand K/V for them

    def attention(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None, cu_seqlens=None):
        group = q.shape[1] // k.shape[1]
        if group > 1 and not native_gqa:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        with sdpa_kernel([chosen]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                  enable_gqa=group > 1 and native_gqa)

    attention.__doc__ = f"torch SDPA, {backend} backend only"
    return attention


def sdpa_auto(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None, cu_seqlens=None):
    """torch SDPA choosing its own backend, GQA passed natively (``enable_gqa``), so K/V are never expanded.

    The pinned cuDNN candidate has to expand K/V (cuDNN refuses ``enable_gqa`` when forced); on the
    H100 (torch 2.11, B2 H32/8 S4096 D128) SDPA's own choice ran fwd+bwd in 1.99 ms against 2.17 ms.
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def sdpa_accepts(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None, cu_seqlens=None) -> bool:
    return (softcap is None and sliding_window is None and cu_seqlens is None and q.dtype in
            (torch.float16, torch.bfloat16) and q.shape[-1] <= 256)


def cudnn_accepts(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None, cu_seqlens=None) -> bool:
    """cuDNN's SDPA also refuses a single query/key position and head dims below 16 or not a multiple of 8
    ("No available kernel" on the H100, torch 2.11)."""
    return (sdpa_accepts(q, k, v, causal, scale, sliding_window, softcap, cu_seqlens) and q.shape[-2] > 1
            and q.shape[-1] % 8 == 0 and q.shape[-1] >= 16)


def accepts_for(backend: str):
    """The input predicate for one SDPA backend."""
    return cudnn_accepts if backend == "cudnn" else sdpa_accepts


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_attn(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None, cu_seqlens=None):
    """The ``flash-attn`` package (Tri Dao's FlashAttention 2), varlen when packed."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    cap = 0.0 if softcap is None else softcap
    if cu_seqlens is None:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                              softmax_scale=scale, window_size=window, softcap=cap)
        return out.transpose(1, 2)
    cu = cu_seqlens.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                 longest, longest, causal=causal, softmax_scale=scale, window_size=window,
                                 softcap=cap)
    return out.transpose(0, 1).unsqueeze(0)


def flash_attn_accepts(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None, cu_seqlens=None):
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and causal
