"""ROCm library candidates for the ``attention`` op: PyTorch SDPA pinned to each ROCm backend, and
AMD's ``aiter`` flash attention when installed.

* SDPA on ROCm: the ``flash`` backend (AOTriton or Composable Kernel, by PyTorch build) and the
  ``efficient`` backend (AOTriton). ROCm has no cuDNN backend. Covers causal/non-causal, GQA,
  fp16/bf16, head dim <= 256; no softcap, sliding window or packing.
* ``aiter`` (``pip install amd-aiter`` / ROCm/aiter): CK / assembly FMHA kernels with autograd,
  sliding window and varlen (packed sequences); no softcap here.

Matmuls need no candidate of ours: the references and the LoRA path call ``torch.matmul``, which
is hipBLASLt (or rocBLAS) on ROCm PyTorch. Every candidate is still verified against the reference
by the dispatcher on the user's GPU before it can be chosen.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
HALF = (torch.float16, torch.bfloat16)


def sdpa(backend: str):
    """An ``attention`` implementation pinned to one SDPA backend (raises if it can't take the call)."""

    def attention(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None, cu_seqlens=None):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[backend])]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                  enable_gqa=k.shape[1] != q.shape[1])

    attention.__name__ = attention.__qualname__ = f"rocm_sdpa_{backend}"
    attention.__doc__ = f"torch SDPA on ROCm, {backend} backend only"
    return attention


def sdpa_accepts(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None,
                 cu_seqlens=None) -> bool:
    return (softcap is None and sliding_window is None and cu_seqlens is None and q.dtype in HALF
            and q.shape[-1] <= 256)


def aiter_available() -> bool:
    try:
        return importlib.util.find_spec("aiter") is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def _aiter_api():
    """``(flash_attn_func, flash_attn_varlen_func, window_arity)`` from the installed aiter."""
    import aiter

    dense = getattr(aiter, "flash_attn_func", None)
    varlen = getattr(aiter, "flash_attn_varlen_func", None)
    if dense is None or varlen is None:
        from aiter.ops import mha

        dense, varlen = mha.flash_attn_func, mha.flash_attn_varlen_func
    default = inspect.signature(dense).parameters.get("window_size")
    arity = len(default.default) if default is not None and isinstance(default.default, tuple) else 2
    return dense, varlen, arity


def _window(sliding_window: int | None, causal: bool, arity: int) -> tuple:
    """slipstream's window W (query i sees keys with ``|i - j| < W``, only ``j <= i`` when causal)
    as flash-attention's ``(left, right[, sink])``."""
    if sliding_window is None:
        left = right = -1
    else:
        left, right = sliding_window - 1, (0 if causal else sliding_window - 1)
    return (left, right, 0)[:arity] if arity >= 3 else (left, right)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def aiter_attention(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None, cu_seqlens=None):
    """AMD aiter flash attention (CK / asm FMHA), varlen for packed sequences."""
    dense, varlen, arity = _aiter_api()
    window = _window(sliding_window, causal, arity)
    if cu_seqlens is None:
        out = dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0,
                    softmax_scale=scale, causal=causal, window_size=window)
        return _first(out).transpose(1, 2)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    out = varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, longest, longest,
                 dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=window)
    return _first(out).transpose(0, 1).unsqueeze(0)


def aiter_accepts(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None,
                  cu_seqlens=None) -> bool:
    return softcap is None and q.dtype in HALF and q.shape[-1] <= 256 and q.shape[1] % k.shape[1] == 0
