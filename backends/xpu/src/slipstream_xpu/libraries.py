"""Intel library candidates: PyTorch SDPA on XPU, and intel-extension-for-pytorch's fused ops if present.

* SDPA on XPU: ``torch.nn.functional.scaled_dot_product_attention`` restricted to its fused
  backends (oneDNN's via ``OVERRIDEABLE``, and flash / efficient where this PyTorch has them for
  XPU), never the math fallback. No softcap, sliding window or packing.
* intel-extension-for-pytorch (IPEX) reached end of life (announced October 2025; 2.8 is the last
  release) and is never required. If an IPEX that matches the installed PyTorch imports, its
  ``ipex.llm.functional`` fused ops become extra candidates on Intel GPUs and Intel CPUs:
  ``rms_norm``, ``silu_mul`` (swiglu), ``gelu_mul`` (geglu), ``rotary_embedding`` (rope) and
  ``varlen_attention``. They are forward-only (no autograd), so they accept only calls where no
  input requires grad (evaluation, generation, frozen layers); the dispatcher keys decisions on
  ``requires_grad``, so training calls never see them. Each is verified against the reference on
  the user's device before it can be chosen, which also catches layout conventions we could
  not check without the hardware.

An IPEX built for another PyTorch is not imported at all (IPEX exits the process on a version
mismatch), and any exception or ``SystemExit`` from importing it only disables these candidates.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import importlib.util
import os

import torch
import torch.nn.functional as F

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
HALF = (torch.float16, torch.bfloat16)
FUSED_SDPA = ("OVERRIDEABLE", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")


# --------------------------------------------------------------------------- SDPA
def fused_sdpa_backends() -> list:
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, n) for n in FUSED_SDPA if hasattr(SDPBackend, n)]


def sdpa(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None, cu_seqlens=None):
    """torch SDPA on XPU, fused backends only (oneDNN / flash / efficient; never math)."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(fused_sdpa_backends()):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])


def sdpa_accepts(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None,
                 cu_seqlens=None) -> bool:
    return (softcap is None and sliding_window is None and cu_seqlens is None and q.dtype in FLOATS
            and q.shape[-1] <= 256)


# --------------------------------------------------------------------------- IPEX
IPEX_DIST = "intel-extension-for-pytorch"


def _major_minor(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def ipex_status() -> str:
    """``"absent"``, ``"mismatch: ..."``, ``"disabled"`` or ``"ok <version>"`` (without importing IPEX)."""
    if os.environ.get("SLIPSTREAM_NO_IPEX", "").strip().lower() in ("1", "true", "yes", "on"):
        return "disabled (SLIPSTREAM_NO_IPEX)"
    try:
        if importlib.util.find_spec("intel_extension_for_pytorch") is None:
            return "absent"
    except (ImportError, ValueError):
        return "absent"
    try:
        version = md.version(IPEX_DIST)
    except md.PackageNotFoundError:
        version = ""
    if version and _major_minor(version) != _major_minor(torch.__version__):
        built_for = ".".join(map(str, _major_minor(version)))
        return f"mismatch: IPEX {version} is for PyTorch {built_for}.x, this is {torch.__version__}"
    return f"ok {version or '?'}"


@functools.lru_cache(maxsize=1)
def ipex_functional():
    """``intel_extension_for_pytorch.llm.functional``, or ``None`` if it can't be imported safely."""
    if not ipex_status().startswith("ok"):
        return None
    try:
        import intel_extension_for_pytorch.llm.functional as fn
    except (Exception, SystemExit):  # IPEX may sys.exit() on an incompatible PyTorch
        return None
    return fn


def _no_grad_inputs(*tensors) -> bool:
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _ipex_device(*tensors) -> bool:
    return all(t.device.type in ("xpu", "cpu") for t in tensors if isinstance(t, torch.Tensor))


def ipex_rms_norm(x, weight, eps=1e-6, offset=0.0):
    """IPEX fused RMSNorm (forward only)."""
    return ipex_functional().rms_norm(x.contiguous(), weight.contiguous(), eps)


def ipex_rms_norm_accepts(x, weight, eps=1e-6, offset=0.0) -> bool:
    return (offset == 0.0 and x.dtype in FLOATS and weight.dtype == x.dtype and _no_grad_inputs(x, weight)
            and _ipex_device(x, weight))


def ipex_swiglu(gate, up):
    """IPEX fused silu(gate) * up (forward only)."""
    return ipex_functional().silu_mul(gate.contiguous(), up.contiguous())


def ipex_geglu(gate, up, approximate="none"):
    """IPEX fused gelu(gate) * up (forward only)."""
    return ipex_functional().gelu_mul(gate.contiguous(), up.contiguous(), approximate=approximate)


def ipex_gated_accepts(gate, up, *rest) -> bool:
    return gate.dtype in FLOATS and _no_grad_inputs(gate, up) and _ipex_device(gate, up)


def ipex_rope(q, k, cos, sin, position_ids=None):
    """IPEX fused rotary embedding, HF rotate-half convention (forward only)."""
    b, _, s, d = q.shape
    c, sn = cos.expand(b, s, d), sin.expand(b, s, d)  # (S, D) or (B, S, D) -> (B, S, D)
    qs = q.transpose(1, 2).contiguous()
    ks = k.transpose(1, 2).contiguous()
    q_out, k_out = ipex_functional().rotary_embedding(qs, ks, sn.reshape(b * s, d).contiguous(),
                                                       c.reshape(b * s, d).contiguous(), d, True)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def ipex_rope_accepts(q, k, cos, sin, position_ids=None) -> bool:
    return (position_ids is None and cos.dim() in (2, 3) and q.dtype in FLOATS and cos.dtype == q.dtype
            and _no_grad_inputs(q, k, cos, sin) and _ipex_device(q, k, cos, sin))


def ipex_attention(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None, cu_seqlens=None):
    """IPEX varlen attention (packed or dense, forward only)."""
    b, h, s, d = q.shape
    if cu_seqlens is None:
        cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
        longest = s
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
    qt, kt, vt = (t.transpose(1, 2).reshape(b * s, h, d).contiguous() for t in (q, k, v))
    out = torch.empty_like(qt)
    ipex_functional().varlen_attention(qt, kt, vt, out, cu, cu, longest, longest, 0.0,
                                       d ** -0.5 if scale is None else scale, False, causal, False, None)
    return out.view(b, s, h, d).transpose(1, 2)


def ipex_attention_accepts(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None,
                           cu_seqlens=None) -> bool:
    return (softcap is None and sliding_window is None and q.dtype in HALF and k.shape[1] == q.shape[1]
            and _no_grad_inputs(q, k, v) and _ipex_device(q, k, v))


IPEX_OPS = (
    ("rms_norm", "ipex_rms_norm", ipex_rms_norm, ipex_rms_norm_accepts),
    ("swiglu", "ipex_swiglu", ipex_swiglu, ipex_gated_accepts),
    ("geglu", "ipex_geglu", ipex_geglu, ipex_gated_accepts),
    ("rope", "ipex_rope", ipex_rope, ipex_rope_accepts),
    ("attention", "ipex_varlen_attention", ipex_attention, ipex_attention_accepts),
)
"""(op, implementation suffix, function, accepts) for every IPEX candidate."""


@functools.lru_cache(maxsize=1)
def host_cpu_is_intel() -> bool:
    """Is this machine's CPU an Intel one (``GenuineIntel`` in /proc/cpuinfo, or the platform name)?"""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    import platform

    return "intel" in platform.processor().lower()
