"""Attention outputs kept across a checkpointed layer's recompute, for long sequences.

With offloaded checkpointing every decoder layer runs its forward twice: once without autograd
(only the layer input is kept) and again in backward, to rebuild what backward reads. At long
sequence lengths attention dominates that recompute: causal attention costs ``2 * S^2 * D * H``
FLOP forward (Llama-3.1-8B at 262,144 tokens: 5.6e14 FLOP per layer, about 1.1 s on an H100),
while what its backward needs from that forward is small next to it: the output, ``S * H * D``
elements (2 GiB in bf16), and the per-row log-sum-exp (``S * H`` fp32, 32 MiB).

Where the memory planner finds device memory left over, :class:`~slipstream.train.offload.OffloadedCheckpoint`
gives the first layers of each step a :class:`Slot` (at most ``stash_layers`` slots hold results at
a time). In that layer's first forward (:func:`recording`) :func:`attend` runs attention through a
kernel that returns its log-sum-exp and keeps ``(out, lse)`` in the slot; in the recompute
(:func:`replaying`) it returns the kept output from an autograd node whose backward is the
FlashAttention backward on ``(dout, q, k, v, out, lse)`` - the same inputs FlashAttention's own
backward reads - instead of running attention forward again.

Kernels (:data:`KERNELS`): on CUDA (and ROCm) torch's cuDNN or flash-attention operators
(``aten._scaled_dot_product_{cudnn,flash}_attention`` and their ``_backward``), the first that takes
the inputs. Elsewhere a reference with the same contract in fp32 math (``O(S^2)`` memory: tests and small inputs only;
the planner asks for slots on CUDA devices only). :func:`attend` returns ``None`` (the caller runs
its normal attention) for anything it does not handle: no slot, autograd on in a recording
forward, a sliding window or softcap, packed sequences, or inputs the kernel refuses.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

_slot: contextvars.ContextVar[Slot | None] = contextvars.ContextVar("slipstream_attention_stash", default=None)


@dataclass
class Kept:
    """One attention call's results, kept from the forward for the recompute."""

    out: torch.Tensor  # (B, Hq, S, D)
    lse: torch.Tensor  # (B, Hq, S) fp32
    extras: tuple  # kernel-specific state its backward needs (flash: cumulative lengths, maxima, RNG state)
    kernel: str  # "flash" or "reference"


@dataclass(eq=False)  # identity semantics: slots are tracked in weak sets
class Slot:
    """A checkpointed layer's kept attention results for one step: filled in order by its forward,
    emptied in the same order by its recompute."""

    entries: list[Kept] = field(default_factory=list)
    replay: bool = False


@dataclass
class StashStats:
    """Counters for tests and reports."""

    recorded: int = 0
    replayed: int = 0
    refused: dict = field(default_factory=dict)  # reason -> calls attention ran normally with a slot set

    def reset(self) -> None:
        self.recorded = self.replayed = 0
        self.refused = {}


stats = StashStats()


@contextmanager
def recording(slot: Slot | None) -> Iterator[None]:
    """Around a checkpointed layer's first (no-grad) forward: attention keeps its results in ``slot``."""
    token = _slot.set(slot)
    try:
        yield
    finally:
        _slot.reset(token)


@contextmanager
def replaying(slot: Slot | None) -> Iterator[None]:
    """Around the layer's recompute: attention returns the results ``slot`` kept."""
    if slot is not None:
        slot.replay = True
    token = _slot.set(slot)
    try:
        yield
    finally:
        _slot.reset(token)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor | None:
    """Attention through the current slot; q (B, Hq, S, D), k/v (B, Hk, S, D) -> (B, Hq, S, D), or
    ``None`` where the caller should run its normal attention (see the module docstring)."""
    slot = _slot.get()
    if slot is None:
        return None
    if slot.replay:
        if not slot.entries:
            return _refuse("nothing kept for this call")
        kept = slot.entries.pop(0)
        if kept.out.shape != q.shape:
            raise RuntimeError(f"attention stash: the recompute's query {tuple(q.shape)} does not match the kept "
                               f"output {tuple(kept.out.shape)}; the layer ran differently in its recompute. Turn "
                               f"the stash off (stash_layers=0) and report this")
        stats.replayed += 1
        return _FromKept.apply(q, k, v, kept, bool(causal), scale)
    if torch.is_grad_enabled():
        return _refuse("autograd on: not a checkpointed forward")
    reason = _unsupported(q, k, v)
    if reason:
        return _refuse(reason)
    errors = []
    for kernel in kernels_for(q.device):
        try:
            _check(kernel, q, k, v, bool(causal), scale)
            kept = forward_with(kernel, q, k, v, bool(causal), scale)
        except RuntimeError as exc:  # this kernel refused these inputs: the next one, or the normal path
            errors.append(f"{kernel}: {str(exc).splitlines()[0][:120]}")
            _REFUSING.add(kernel)
            continue
        slot.entries.append(kept)
        stats.recorded += 1
        return kept.out
    return _refuse("; ".join(errors) or "no kernel")


def _refuse(reason: str) -> None:
    stats.refused[reason] = stats.refused.get(reason, 0) + 1
    return None


def _unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    if q.dim() != 4 or k.shape != v.shape or q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2]:
        return "shapes"
    if q.device.type == "cuda" and (q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256
                                    or q.shape[-1] % 8):
        return "dtype or head dim the CUDA kernels do not take"
    return ""


class _FromKept(torch.autograd.Function):
    """The kept output as the result of ``attention(q, k, v)``; backward from (q, k, v, out, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, kept: Kept, causal: bool, scale: float | None):
        ctx.save_for_backward(q, k, v, kept.out, kept.lse)
        ctx.kept_extras, ctx.kernel, ctx.causal, ctx.scale = kept.extras, kept.kernel, causal, scale
        return kept.out.detach()

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        kept = Kept(out, lse, ctx.kept_extras, ctx.kernel)
        dq, dk, dv = backward_with(ctx.kernel, dout, q, k, v, kept, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


# ----------------------------------------------------------------------------- kernels
KERNELS = ("cudnn", "flash", "reference")
"""Kernels in order of preference on a CUDA device (H100: see ``benchmarks/gpu/attention_backends.py``);
elsewhere only the reference."""
_REFUSING: set[str] = set()  # kernels that raised on this process's inputs: not tried again


_CHECKED: set[tuple] = set()


def _check(kernel: str, q, k, v, causal: bool, scale: float | None) -> None:
    """Before a kernel's first use for this kind of input: its forward and its backward from the kept
    results on 256 positions of these heads, against the fp32 reference (relative error < 2e-2), so
    a kernel whose backward cannot run (or runs wrong) is never used in a step. Raises RuntimeError."""
    if kernel == "reference":
        return
    key = (kernel, q.device, q.dtype, q.shape[1], k.shape[1], q.shape[-1], causal, scale)
    if key in _CHECKED:
        return
    n = min(256, q.shape[2])
    gen = torch.Generator(device=q.device).manual_seed(0)
    small = [torch.randn(1, t.shape[1], n, t.shape[3], device=q.device, dtype=q.dtype, generator=gen)
             for t in (q, k, v)]
    dout = torch.randn(small[0].shape, device=q.device, dtype=q.dtype, generator=gen)
    kept = forward_with(kernel, *small, causal, scale)
    got = (kept.out, *backward_with(kernel, dout, *small, kept, causal, scale))
    ref = _reference_forward(*small, causal, scale)
    want = (ref.out, *_reference_backward(dout, *small, ref.out, ref.lse, (), causal, scale))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        err = float((g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
        if g.shape != w.shape or not err < 2e-2:
            raise RuntimeError(f"self-check failed: {name} relative error {err:.2e} (shape {tuple(g.shape)})")
    _CHECKED.add(key)


def kernels_for(device: torch.device) -> list[str]:
    """The kernels :func:`attend` tries on ``device``, in order."""
    if device.type != "cuda":
        return ["reference"]
    return [k for k in KERNELS[:-1] if k not in _REFUSING]


def forward_with(kernel: str, q, k, v, causal: bool, scale: float | None) -> Kept:
    """Attention forward by ``kernel``, keeping what its backward needs."""
    if kernel == "flash":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return Kept(out, lse, (cum_q, cum_k, max_q, max_k, seed, offset), kernel)
    if kernel == "cudnn":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)
        return Kept(out, lse, (cum_q, cum_k, max_q, max_k, seed, offset), kernel)
    return _reference_forward(q, k, v, causal, scale)


def backward_with(kernel: str, dout, q, k, v, kept: Kept, causal: bool, scale: float | None):
    """``(dq, dk, dv)`` by ``kernel`` from the kept forward results."""
    if kernel == "reference":
        return _reference_backward(dout, q, k, v, kept.out, kept.lse, kept.extras, causal, scale)
    cum_q, cum_k, max_q, max_k, seed, offset = kept.extras
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if kernel == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, kept.out, kept.lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, kept.out, kept.lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal, scale=scale)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or wider when it already is (fp64 tests stay fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _scores(q, k, causal: bool, scale: float | None) -> torch.Tensor:
    """(B, Hq, S, S) scaled scores in fp32 (or wider) with the causal mask applied (-inf above the diagonal)."""
    group = q.shape[1] // k.shape[1]
    kk = _wide(k).repeat_interleave(group, dim=1)
    s = _wide(q) @ kk.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        n = q.shape[2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s


def _reference_forward(q, k, v, causal: bool, scale: float | None) -> Kept:
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    vv = _wide(v).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    out = (torch.exp(s - lse[..., None]) @ vv).to(q.dtype)
    return Kept(out, lse, (), "reference")


def _reference_backward(dout, q, k, v, out, lse, extras: tuple, causal: bool, scale: float | None):
    """FlashAttention's backward in fp32 math: P = exp(S - lse); dV = P.T dO; dS = P * (dO V.T - rowsum(dO * O));
    dQ = scale * dS K; dK = scale * dS.T Q; dK, dV summed over each K/V head's query group."""
    del extras
    group = q.shape[1] // k.shape[1]
    sc = scale if scale is not None else q.shape[-1] ** -0.5
    p = torch.exp(_scores(q, k, causal, scale) - lse[..., None])
    do = _wide(dout)
    vv = _wide(v).repeat_interleave(group, dim=1)
    kk = _wide(k).repeat_interleave(group, dim=1)
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ vv.transpose(-1, -2) - (do * _wide(out)).sum(-1, keepdim=True))
    dq = sc * ds @ kk
    dk = sc * ds.transpose(-1, -2) @ _wide(q)
    b, hk, s, d = k.shape
    dk = dk.view(b, hk, group, s, d).sum(2)
    dv = dv.view(b, hk, group, s, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def kept_bytes_per_layer(tokens: int, heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Device bytes one layer's slot holds: the attention output and its fp32 log-sum-exp."""
    return tokens * heads * (head_dim * dtype_bytes + 4)


__all__ = ["KERNELS", "Kept", "Slot", "StashStats", "attend", "backward_with", "forward_with", "kept_bytes_per_layer",
           "kernels_for", "recording", "replaying", "stats"]
