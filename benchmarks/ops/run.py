#!/usr/bin/env python3
"""Op benchmark: slipstream's dispatched choice against every candidate, torch eager, torch.compile,
Liger-Kernel and peft, at Llama-3.1-8B shapes, in one process, with the device's ceilings.

    python benchmarks/ops/run.py --out DIR [--ops a,b] [--dtype bf16] [--size real] [--quick]
                                 [--device cuda|cpu] [--compile all|headline|none] [--no-graph]

For each op and case (the op's "real" samples plus the headline shapes, headline first) every
system is, in order: checked for correctness, called once at full size (tunes / compiles; wall
time kept as ``first_call_s``), measured for peak extra memory, then timed forward+backward and
forward only (median ms), then forward+backward again replayed from a CUDA graph (``graph_ms``:
GPU time without the host's overhead; CUDA only, ``--no-graph`` turns it off). Systems:

* ``slipstream``: the dispatcher with tuning on (fresh decision cache unless ``--keep-cache``):
  the label it chose and the seconds its tuning took.
* every candidate (each config of each implementation whose device and input predicates accept
  the case); ``reference.<op>`` is the same function as ``eager`` and is not repeated.
* ``eager`` (the op's reference), ``compile`` (``torch.compile(reference, dynamic=False)``),
  ``liger`` (where Liger-Kernel has the op), ``peft`` and ``base_gemm`` for lora_linear,
  ``sdpa`` (torch's default SDPA) for attention.

Correctness guard: each system is judged by :class:`slipstream.dispatch.verify.Oracle` (float64
reference on bounded fresh inputs, the op's tolerance) and its full-size output and gradients are
compared with eager's (twice the tolerance). A system failing either is ``WRONG`` and not ranked.
``compile`` gets only the full-size check (a bounded check would cost another compile);
``slipstream`` inherits the bounded verdict of the candidate it chose.

Timing: forward+backward is ``verify.run`` (forward, then ``autograd.grad`` of fixed output
gradients; ones for scalar losses, as ``loss.backward()``) exactly as the dispatcher times its
candidates; forward-only is the forward with autograd recording (what a training step pays).
Both are CUDA-event timings around each call, so where the host is slower than the GPU (small ops:
Python, autograd, launches) they measure the host. ``graph_ms`` (:func:`ceilings.graph_ms`) captures
back-to-back forward+backward calls into one CUDA graph and times its replays: the GPU's own time
(no L2 flush between the calls inside the graph). A system whose call can't be captured (host
syncs, the legacy stream) gets ``graph_ms`` None and ``graph_reason``.
Work per op (bytes or FLOPs) is documented in :data:`WORK`; see README.md for every column.

Outputs in ``--out``: results.json (everything), results.md (a table per case), results.png
(log-scale bars per case, when matplotlib is installed); a compact table is printed last.
One failing system or case (exception, OOM) is recorded and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402

from benchmarks.ops import ceilings, peers, report  # noqa: E402
from slipstream.dispatch.graph_timing import GRAPH_MAX_ITERS, graph_iters  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}

# Which differentiable arguments require grad in the benchmark: a LoRA training step.
GRADS: dict[str, tuple[str, ...]] = {
    "rms_norm": ("x", "weight"),
    "rope": ("q", "k"),
    "swiglu": ("gate", "up"),
    "geglu": ("gate", "up"),
    "cross_entropy": ("logits",),
    "linear_cross_entropy": ("hidden",),  # frozen lm_head: the weight gets no gradient
    "lora_linear": ("x", "lora_a", "lora_b"),  # frozen base weight
    "lora_linear_group": ("x", "lora_a0", "lora_b0", "lora_a1", "lora_b1", "lora_a2", "lora_b2"),
    "attention": ("q", "k", "v"),
}

TIMING = {"default": {"warmup_ms": 10.0, "rep_ms": 50.0}, "quick": {"warmup_ms": 5.0, "rep_ms": 20.0}}
TIME_LIMIT_S = {"default": 390.0, "quick": 200.0}
# CUDA-graph timing: ``replays`` timed replays of one graph of up to GRAPH_MAX_ITERS fwd+bwd calls,
# as many calls as fit ``budget_ms`` of replay in all (judged by the event-timed fwd+bwd, an upper
# bound on the GPU time)
GRAPH = {"default": {"budget_ms": 100.0, "replays": 10}, "quick": {"budget_ms": 50.0, "replays": 5}}
COMPILE_BUDGET_S = {"default": 150.0, "quick": 90.0}


# ============================================================================= work per op
def nbytes(t: object) -> int:
    """Bytes of a tensor (packed codes + scales for a 4-bit weight; 0 for anything else)."""
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if hasattr(t, "packed") and hasattr(t, "absmax"):
        return nbytes(t.packed) + nbytes(t.absmax)
    return 0


def _rg(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def work_rms_norm(args: tuple) -> dict:
    x, w = args[0], args[1]
    X, W = nbytes(x), nbytes(w)
    fwd = X + W + X  # read x, w; write y
    bwd = X + X + W + (X if _rg(x) else 0) + (W if _rg(w) else 0)  # read dy, x, w; write dx, dw
    return {"metric": "GB/s", "fwd": fwd, "fwd_bwd": fwd + bwd,
            "formula": "fwd: read x,w + write y; bwd: read dy,x,w + write dx,dw"}


def work_rope(args: tuple) -> dict:
    q, k, cos, sin, pos = args
    Q, K, T = nbytes(q), nbytes(k), nbytes(cos) + nbytes(sin) + nbytes(pos)
    fwd = Q + K + T + Q + K  # read q, k, cos, sin (+ position ids); write q', k'
    bwd = Q + K + T + Q + K  # read dq', dk', cos, sin (+ position ids); write dq, dk
    return {"metric": "GB/s", "fwd": fwd, "fwd_bwd": fwd + bwd,
            "formula": "fwd: read q,k,cos,sin(,pos) + write q',k'; bwd: read dq',dk',cos,sin(,pos) + write dq,dk"}


def work_gated(args: tuple) -> dict:
    gate, up = args[0], args[1]
    G = nbytes(gate)
    fwd = 3 * G  # read gate, up; write out
    bwd = 3 * G + (G if _rg(gate) else 0) + (G if _rg(up) else 0)  # read dout, gate, up; write dgate, dup
    return {"metric": "GB/s", "fwd": fwd, "fwd_bwd": fwd + bwd,
            "formula": "fwd: read gate,up + write out; bwd: read dout,gate,up + write dgate,dup"}


def work_cross_entropy(args: tuple) -> dict:
    logits, labels, _, reduction = args[0], args[1], args[2], args[3]
    L, Y = nbytes(logits), nbytes(labels)
    out = 4 * (logits.shape[0] if reduction == "none" else 1)
    fwd = L + Y + out
    # the minimum for a training step: logits read once, the gradient written once (a kernel that
    # computes the gradient in the forward pass reaches it); an unfused one reads logits twice
    fwd_bwd = L + Y + out + (L if _rg(logits) else 0)
    return {"metric": "GB/s", "fwd": fwd, "fwd_bwd": fwd_bwd,
            "formula": "fwd: read logits,labels + write loss; fwd+bwd minimum: read logits once + write dlogits once"}


def work_linear_cross_entropy(args: tuple) -> dict:
    hidden, weight = args[0], args[1]
    n, h = hidden.shape
    v = weight.shape[0]
    gemm = 2 * n * h * v
    gemms = 1 + int(_rg(hidden)) + int(_rg(weight))
    return {"metric": "TFLOP/s", "fwd": gemm, "fwd_bwd": gemms * gemm,
            "formula": f"2*N*H*V per GEMM: logits, + grad_hidden, + grad_W if trainable ({gemms} GEMMs here)"}


def work_lora_linear(args: tuple) -> dict:
    x, weight, a, b = args[0], args[1], args[2], args[3]
    n, k = weight.shape
    r = a.shape[0]
    m = x.numel() // k
    fwd = 2 * m * n * k + 2 * m * r * (k + n)  # x W^T; (x A^T) B^T
    bwd = 0
    if _rg(x):
        bwd += 2 * m * n * k + 2 * m * r * k  # dX = dY W + dU A
    if _rg(x) or _rg(a):
        bwd += 2 * m * n * r  # dU = s dY B
    if _rg(a):
        bwd += 2 * m * r * k  # dA = dU^T x
    if _rg(b):
        bwd += 2 * m * r * n  # dB = s (x A^T)^T dY
    if _rg(weight):
        bwd += 2 * m * n * k
    return {"metric": "TFLOP/s", "fwd": fwd, "fwd_bwd": fwd + bwd,
            "formula": "fwd 2MNK + 2Mr(K+N); bwd dX 2MNK + 2MrK, dU 2MNr, dA 2MrK, dB 2MrN (W frozen)"}


def work_lora_group(args: tuple) -> dict:
    """The sum of the group's projections (the fused call does the same FLOPs, in fewer passes over x)."""
    from slipstream.ops.lora_linear_group import projections

    parts = [work_lora_linear((args[0], *p)) for p in projections(args)]
    return {"metric": "TFLOP/s", "fwd": sum(p["fwd"] for p in parts), "fwd_bwd": sum(p["fwd_bwd"] for p in parts),
            "formula": "sum over the projections of lora_linear's: " + parts[0]["formula"]}


def work_base_gemm(args: tuple) -> dict:
    x, weight = args[0], args[1]
    n, k = weight.shape
    m = x.numel() // k
    return {"metric": "TFLOP/s", "fwd": 2 * m * n * k, "fwd_bwd": 4 * m * n * k,
            "formula": "x W^T 2MNK + dX 2MNK"}


def attended_pairs(s: int, causal: bool, window: int | None, cu_seqlens: torch.Tensor | None) -> int:
    """(query, key) pairs the mask allows per (batch, head): what attention FLOPs scale with."""
    lengths = [s] if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    total = 0
    for length in lengths:
        i = torch.arange(int(length), dtype=torch.int64)
        w = int(length) if window is None else window
        before = torch.clamp(i, max=w - 1)
        after = torch.zeros_like(i) if causal else torch.clamp(int(length) - 1 - i, max=w - 1)
        total += int((before + after + 1).sum())
    return total


def work_attention(args: tuple) -> dict:
    q, k, v, causal, _, window, _, cu = args
    b, hq, s, d = q.shape
    pairs = attended_pairs(s, causal, window, None if cu is None else cu.cpu())
    fwd = 4 * b * hq * d * pairs  # QK^T and PV: 2 * D FLOPs each per allowed pair
    bwd = 10 * b * hq * d * pairs if any(_rg(t) for t in (q, k, v)) else 0  # 2.5x forward (5 GEMMs)
    return {"metric": "TFLOP/s", "fwd": fwd, "fwd_bwd": fwd + bwd,
            "formula": "fwd 4*B*Hq*D*pairs (QK^T, PV); bwd 2.5x fwd (FlashAttention convention); pairs = unmasked"}


WORK: dict[str, Callable[[tuple], dict]] = {
    "rms_norm": work_rms_norm,
    "rope": work_rope,
    "swiglu": work_gated,
    "geglu": work_gated,
    "cross_entropy": work_cross_entropy,
    "linear_cross_entropy": work_linear_cross_entropy,
    "lora_linear": work_lora_linear,
    "lora_linear_group": work_lora_group,
    "attention": work_attention,
}
"""op -> ``work(args)``: ``{"metric": "GB/s" | "TFLOP/s", "fwd": n, "fwd_bwd": n, "formula": text}``.

Memory-bound ops count bytes: inputs read once plus outputs written once, forward and backward
each counted explicitly (the backward re-reads what it needs, as a training step must: by the
time the gradient arrives the activations have long left the cache). Matmul-bearing ops count
FLOPs (2 per multiply-add); attention only over the pairs its mask allows."""


# ============================================================================= cases
@dataclass
class Case:
    op: str
    label: str
    args: tuple
    headline: bool = False
    note: str = ""
    layout: Callable[[tuple], tuple] | None = None  # re-strides verification inputs like ``args``


def with_grads(spec, args: tuple, names: tuple[str, ...]) -> tuple:
    """``args`` with exactly the floating-point tensors named in ``names`` requiring grad."""
    out = []
    for name, a in zip(spec.parameters, args, strict=False):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().requires_grad_(name in names and name in spec.differentiable)
        out.append(a)
    return tuple(out)


def clone_args(args: tuple) -> tuple:
    """Private copies of the floating-point tensors (strides kept, requires_grad kept).

    Every system gets its own, so an implementation that writes into its inputs (Liger's cross
    entropy stores the gradient in the logits) can't change what the next one sees."""
    return tuple(a.detach().clone().requires_grad_(a.requires_grad)
                 if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def signature(args: tuple) -> tuple:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(("T", tuple(a.shape), tuple(a.stride()), a.dtype, a.requires_grad))
        elif hasattr(a, "packed"):
            parts.append(("Q", tuple(a.shape), a.quant_type, a.blocksize, a.double_quant))
        else:
            parts.append(a)
    return tuple(parts)


LORA_DIMS = {"real": dict(tokens=4096, hidden=4096, kv=1024, inter=14336, r=16),
             "small": dict(tokens=16, hidden=64, kv=16, inter=224, r=4)}


def lora_cases(device: torch.device, dtype: torch.dtype, size: str, quick: bool) -> list[Case]:
    """Llama-3.1-8B projections at 4096 tokens, r=16, in ``dtype`` and NF4 (``quantize_nf4``).

    Projections sharing a shape share a case: q/o (4096->4096), k/v (4096->1024), gate/up
    (4096->14336), down (14336->4096). ``size="small"``: the same set scaled down."""
    from slipstream.quant import quantize_nf4

    d = LORA_DIMS["real" if size == "real" else "small"]
    h, kv, inter, r, m = d["hidden"], d["kv"], d["inter"], d["r"], d["tokens"]
    shapes = [("q_proj/o_proj", h, h), ("k_proj/v_proj", h, kv), ("gate_proj/up_proj", h, inter),
              ("down_proj", inter, h)]
    if quick:
        shapes = shapes[:1]
    cases = []
    for name, k, n in shapes:
        for nf4 in (False, True):
            g = torch.Generator(device=device).manual_seed(k * 7 + n)
            x = torch.randn(m, k, device=device, generator=g).to(dtype).requires_grad_()
            w = (torch.randn(n, k, device=device, generator=g) * k ** -0.5).to(dtype)
            weight = quantize_nf4(w) if nf4 else w
            del w
            a = (torch.randn(r, k, device=device, generator=g) * k ** -0.5).to(dtype).requires_grad_()
            b = (torch.randn(n, r, device=device, generator=g) * r ** -0.5).to(dtype).requires_grad_()
            label = f"{name} {m}x{k}->{n} r{r} {'nf4' if nf4 else str(dtype).removeprefix('torch.')}"
            cases.append(Case("lora_linear", label, (x, weight, a, b, 2.0, None), headline=True))
    return cases


def lora_group_cases(device: torch.device, dtype: torch.dtype, size: str, quick: bool) -> list[Case]:
    """Llama-3.1-8B q/k/v (4096 -> 4096, 1024, 1024) and gate/up (4096 -> 14336 x 2) at 4096 tokens,
    r=16, in ``dtype`` and NF4: what training runs as one ``lora_linear_group`` call."""
    from slipstream.ops.lora_linear_group import flat_args
    from slipstream.quant import quantize_nf4

    d = LORA_DIMS["real" if size == "real" else "small"]
    h, kv, inter, r, m = d["hidden"], d["kv"], d["inter"], d["r"], d["tokens"]
    groups = [("q+k+v", (h, kv, kv)), ("gate+up", (inter, inter))]
    if quick:
        groups = groups[:1]
    cases = []
    for name, outs in groups:
        for nf4 in (False, True):
            g = torch.Generator(device=device).manual_seed(sum(outs) + int(nf4))
            x = torch.randn(m, h, device=device, generator=g).to(dtype).requires_grad_()
            ws, a_s, b_s = [], [], []
            for n in outs:
                w = (torch.randn(n, h, device=device, generator=g) * h ** -0.5).to(dtype)
                ws.append(quantize_nf4(w) if nf4 else w)
                a_s.append((torch.randn(r, h, device=device, generator=g) * h ** -0.5).to(dtype).requires_grad_())
                b_s.append((torch.randn(n, r, device=device, generator=g) * r ** -0.5).to(dtype).requires_grad_())
            kind = "nf4" if nf4 else str(dtype).removeprefix("torch.")
            label = f"{name} {m}x{h}->{'+'.join(map(str, outs))} r{r} {kind}"
            cases.append(Case("lora_linear_group", label, flat_args(x, ws, a_s, b_s, [2.0] * len(outs)), headline=True))
    return cases


def separate_projections(args: tuple) -> Callable:
    """What a group call replaces: ``ops.lora_linear`` once per projection (each dispatched on its own)."""
    from slipstream import ops
    from slipstream.ops.lora_linear_group import projections

    def separate(x, *slots):
        return tuple(ops.lora_linear(x, *p) for p in projections((x, *slots)))

    return separate


def group_base_gemms(args: tuple) -> tuple[Callable, dict]:
    """The group's base GEMMs alone (``x @ W_i.T`` + ``dX``; NF4 dequantised once, outside the timing)."""
    from slipstream.ops.lora_linear_group import projections

    gemms = [peers.base_gemm((args[0], *p)) for p in projections(args)]
    work = [work_base_gemm((args[0], *p)) for p in projections(args)]

    def base(x, *slots):
        return tuple(gemm(x, *p) for gemm, p in zip(gemms, projections((x, *slots)), strict=True))

    return base, {"metric": "TFLOP/s", "fwd": sum(w["fwd"] for w in work), "fwd_bwd": sum(w["fwd_bwd"] for w in work),
                  "formula": "sum over the projections of x W^T 2MNK + dX 2MNK"}


def hf_layout(args: tuple) -> tuple:
    """q, k as HF's attention passes them: (B, S, H, D) memory viewed as (B, H, S, D)."""
    q, k, *rest = args

    def view(t: torch.Tensor) -> torch.Tensor:
        return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(t.requires_grad)

    return (view(q), view(k), *rest)


def describe(op: str, label: str, args: tuple) -> str:
    """A sample's label plus what it leaves implicit (frozen lm_head, GELU form)."""
    if op == "linear_cross_entropy" and not _rg(args[1]):
        return f"{label} frozen W"
    if op == "geglu":
        return f"{label} {args[2]}"
    return label


def cases_for(op: str, device: torch.device, dtype: torch.dtype, size: str, quick: bool) -> list[Case]:
    """The op's cases: headline shapes first (the first sample, plus the extras), then the other
    samples (skipped under ``quick``), deduplicated by shapes, strides, dtypes and flags."""
    from slipstream.ops import SPECS

    spec = SPECS[op]
    samples = list(spec.samples(device, dtype, size))
    grads = GRADS.get(op, spec.differentiable)
    cases: list[Case] = []
    if op == "lora_linear":
        cases += lora_cases(device, dtype, size, quick)
    elif op == "lora_linear_group":
        cases += lora_group_cases(device, dtype, size, quick)
    elif samples:
        first = samples[0]
        label = describe(op, first.label, first.args)
        cases.append(Case(op, label, with_grads(spec, first.args, grads), headline=True))
        if op == "rope":
            cases.append(Case(op, f"{first.label} HF layout", hf_layout(cases[0].args), headline=True,
                              note="q, k are (B, S, H, D) memory viewed as (B, H, S, D), as HF passes them",
                              layout=hf_layout))
    seen = {signature(c.args) for c in cases}
    if not quick:
        for s in samples:
            args = with_grads(spec, s.args, grads)
            if signature(args) in seen:
                continue
            seen.add(signature(args))
            cases.append(Case(op, describe(op, s.label, args), args))
    return cases


# ============================================================================= checking
def named(result) -> dict[str, torch.Tensor]:
    items = {f"out{i}" if len(result.outputs) > 1 else "out": o for i, o in enumerate(result.outputs)}
    items.update({f"grad_{n}": g for n, g in result.grads.items()})
    return items


def _finite_errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    from slipstream.dispatch.verify import errors

    finite = torch.isfinite(want)
    return errors(torch.where(finite, got, 0), torch.where(finite, want, 0))


def compare(got, want, tol, factor: float = 2.0) -> dict:
    """``got`` vs ``want`` (``verify.RunResult`` s on the same inputs and output gradients), every
    output and gradient within ``factor`` x the op's tolerance, finite where ``want`` is."""
    mine, theirs = named(got), named(want)
    errs: dict[str, float] = {}
    for name, t in theirs.items():
        m = mine.get(name)
        if m is None:
            return {"ok": False, "reason": f"produced no {name}", "errors": errs}
        if m.shape != t.shape or m.dtype != t.dtype:
            return {"ok": False, "reason": f"{name} is {tuple(m.shape)} {m.dtype}, expected {tuple(t.shape)} "
                                           f"{t.dtype}", "errors": errs}
        bad = ~torch.isfinite(m) & torch.isfinite(t)
        if bool(bad.any()):
            return {"ok": False, "reason": f"{name} has NaN/Inf where eager is finite ({int(bad.sum())})",
                    "errors": errs}
        rel, peak = _finite_errors(m, t)
        errs[name] = rel
        if rel > factor * tol.rel or peak > factor * tol.peak:
            return {"ok": False, "reason": f"{name} off by {rel:.2e} rel / {peak:.2e} peak (allowed "
                                           f"{factor * tol.rel:.1e} / {factor * tol.peak:.1e})", "errors": errs}
    return {"ok": True, "reason": "", "errors": errs}


def judge_result(oracle, result) -> dict:
    """Judge a result computed on ``oracle.args`` with ``oracle.grad_outputs`` exactly as
    ``Oracle.judge`` would (float64 truth, tolerance widened to twice the reference's own error)."""
    truth, own, mine = named(oracle.truth), named(oracle.own), named(result)
    tol = oracle.tolerance
    errs: dict[str, float] = {}
    for name, t in truth.items():
        m = mine.get(name)
        if m is None:
            return {"ok": False, "reason": f"produced no {name}", "errors": errs}
        if m.shape != t.shape or m.dtype != own[name].dtype:
            return {"ok": False, "reason": f"{name} is {tuple(m.shape)} {m.dtype}", "errors": errs}
        bad = ~torch.isfinite(m) & torch.isfinite(t)
        if bool(bad.any()):
            return {"ok": False, "reason": f"{name} has NaN/Inf where the reference is finite", "errors": errs}
        rel, peak = _finite_errors(m, t)
        own_rel, own_peak = _finite_errors(own[name], t)
        errs[name] = rel
        if rel > max(tol.rel, 2 * own_rel) or peak > max(tol.peak, 2 * own_peak):
            return {"ok": False, "reason": f"{name} off by {rel:.2e} rel / {peak:.2e} peak", "errors": errs}
    return {"ok": True, "reason": "", "errors": errs}


def grad_outputs(outputs: object) -> list[torch.Tensor]:
    """Fixed output gradients: ones for a scalar loss (``loss.backward()``), random otherwise."""
    outs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    return [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) if o.is_floating_point()
            else torch.zeros_like(o) for o in outs]


def step(fn: Callable, spec, args: tuple, grad_outs):
    """One forward+backward, exactly what the dispatcher times (``verify.run``)."""
    from slipstream.dispatch.verify import run

    return run(fn, spec, args, grad_outs)


@contextlib.contextmanager
def strict_dispatch() -> Iterator[None]:
    """``SLIPSTREAM_STRICT=1`` for the block: a chosen implementation that raises (as one that
    can't be captured into a CUDA graph does) raises through the dispatcher instead of being
    replaced by the reference for good, which would silently time the reference as slipstream."""
    old = os.environ.get("SLIPSTREAM_STRICT")
    os.environ["SLIPSTREAM_STRICT"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SLIPSTREAM_STRICT", None)
        else:
            os.environ["SLIPSTREAM_STRICT"] = old


def dispatched(spec) -> Callable:
    """The op as users call it: through the dispatcher."""
    from slipstream.dispatch import dispatcher

    d = dispatcher()

    def op(*args):
        return d.call(spec, args)

    op.__name__ = spec.name
    return op


# ============================================================================= running
@dataclass
class System:
    name: str
    role: str  # slipstream | candidate | eager | compile | peer | ceiling
    fn: Callable | None = None
    reason: str = ""  # why it can't run (n/a) or was skipped
    status: str = ""  # preset status ("n/a", "skipped")
    verify: str = "oracle"  # oracle | chosen | full | none | reference
    kind: str = ""
    plugin: str = ""
    work: dict | None = None  # overrides the case's work (base_gemm)


class Runner:
    def __init__(self, device: torch.device, dtype: torch.dtype, *, quick: bool, compile_mode: str,
                 compile_budget_s: float, time_limit_s: float, timing: dict, log=print, graph: bool = True):
        from slipstream.device import device_info

        self.device, self.dtype, self.quick = device, dtype, quick
        self.graph = graph  # CUDA-graph timing (graph_ms) after the event timings
        self.graph_cfg = GRAPH["quick" if quick else "default"]
        self.info = device_info(device)
        self.compile_mode, self.compile_budget_s, self.time_limit_s = compile_mode, compile_budget_s, time_limit_s
        self.timing = timing
        self.log = log
        self.started = time.perf_counter()
        self.compile_spent = 0.0
        self._static: dict[str, Callable] = {}

    # ------------------------------------------------------------------ helpers
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out_of_time(self) -> bool:
        return self.elapsed() > self.time_limit_s

    def sync(self) -> None:
        from slipstream.dispatch.timing import synchronize

        synchronize(self.device)

    def cleanup(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def bench(self, fn: Callable[[], object]) -> float:
        return ceilings.bench_ms(fn, self.device, **self.timing)

    def graph_time(self, fn: Callable[[], object], estimate_ms: float | None) -> tuple[float | None, str]:
        """``(ms, "")``: :func:`ceilings.graph_ms` of ``fn``; ``(None, why)`` where it is off, not
        possible here or failed. Never raises (but for KeyboardInterrupt and the like)."""
        if not self.graph:
            return None, "off (--no-graph)"
        if self.out_of_time():
            return None, f"time limit ({self.time_limit_s:.0f} s) reached"
        replays = self.graph_cfg["replays"]
        iters = graph_iters(estimate_ms, self.graph_cfg["budget_ms"], replays)
        try:
            with strict_dispatch():
                ms = ceilings.graph_ms(fn, self.device, iters_per_graph=iters, replays=replays)
        except Exception as exc:  # noqa: BLE001 - a graph that fails never costs the row its event timings
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            name = "" if isinstance(exc, ceilings.GraphCaptureError) else f"{type(exc).__name__}: "
            return None, f"{name}{first}" or type(exc).__name__
        if ms is None:
            return None, f"CUDA graphs need a CUDA device (this run: {self.device.type})"
        return ms, ""

    def static_compiled(self, spec) -> Callable:
        fn = self._static.get(spec.name)
        if fn is None:
            fn = self._static[spec.name] = peers.static_compiled(spec.reference)
        return fn

    # ------------------------------------------------------------------ systems of a case
    def systems(self, spec, case: Case, record: dict) -> list[System]:
        from slipstream.dispatch import dispatcher
        from slipstream.dispatch.trace import CandidateReport

        out = [System("eager", "eager", spec.reference, verify="reference", kind="reference")]
        out.append(System("slipstream", "slipstream", dispatched(spec), verify="chosen"))
        reports: list[CandidateReport] = []
        for cand in dispatcher().candidates(spec, self.info, case.args, reports):
            if cand.impl.fn is spec.reference:
                record["aliases"][cand.label] = "eager"
                continue
            out.append(System(cand.label, "candidate", cand.function(), kind=cand.impl.kind, plugin=cand.impl.plugin))
        record["not_candidates"] = [{"label": r.label, "status": r.status, "reason": r.reason} for r in reports]
        gpu = self.device.type != "cpu"
        compile_on = self.compile_mode == "all" or (self.compile_mode == "headline" and case.headline)
        if not compile_on:
            why = ("off on the CPU (inductor's C++ build costs more than these runs; --compile all to force)"
                   if not gpu and self.compile_mode == "none" else f"--compile {self.compile_mode}")
            out.append(System("compile", "compile", status="skipped", reason=why))
        else:
            out.append(System("compile", "compile", None, verify="full", kind="reference"))
        if case.op in peers.LIGER_OPS or case.op in ("lora_linear", "lora_linear_group", "attention"):
            fn = peers.liger(case.op, case.args, self.device)
            out.append(System("liger", "peer", fn if callable(fn) else None, reason="" if callable(fn) else fn,
                              status="" if callable(fn) else "n/a"))
        if case.op == "lora_linear":
            fn = peers.peft_lora(self.device, case.args)
            out.append(System("peft", "peer", fn if callable(fn) else None, reason="" if callable(fn) else fn,
                              status="" if callable(fn) else "n/a"))
            out.append(System("base_gemm", "ceiling", peers.base_gemm(case.args), verify="none",
                              work=work_base_gemm(case.args), reason="x @ W.T + dX only: no LoRA, not ranked"))
        if case.op == "lora_linear_group":
            out.append(System("separate", "peer", separate_projections(case.args), verify="full",
                              reason="ops.lora_linear per projection: the ungrouped path"))
            base, work = group_base_gemms(case.args)
            out.append(System("base_gemm", "ceiling", base, verify="none", work=work,
                              reason="x @ W_i.T + dX for every projection: no LoRA, not ranked"))
        if case.op == "attention":
            fn = peers.sdpa(case.args)
            out.append(System("sdpa", "peer", fn if callable(fn) else None, reason="" if callable(fn) else fn,
                              status="" if callable(fn) else "n/a"))
        return out

    # ------------------------------------------------------------------ one system
    def measure(self, spec, case: Case, system: System, ctx: dict) -> dict:
        row = {"system": system.name, "role": system.role, "kind": system.kind, "plugin": system.plugin,
               "status": system.status or "ok", "reason": system.reason, "verify": None, "full_check": None,
               "first_call_s": None, "peak_mib": None, "fwd_bwd_ms": None, "fwd_ms": None,
               "graph_ms": None, "graph_reason": ""}
        if system.work is not None:
            row["work"] = system.work
        if system.status:
            return row
        if self.out_of_time():
            row.update(status="skipped", reason=f"time limit ({self.time_limit_s:.0f} s) reached")
            return row
        if system.role == "compile":
            if self.compile_spent >= self.compile_budget_s:
                row.update(status="skipped", reason=f"compile budget ({self.compile_budget_s:.0f} s) spent")
                return row
            system.fn = self.static_compiled(spec)
        from slipstream.dispatch import dispatcher

        fn = system.fn
        sargs = clone_args(case.args)
        grad_outs = ctx["grad_outs"]
        try:
            # 1. correctness on bounded fresh inputs (float64 reference)
            if system.verify == "oracle":
                if ctx.get("oracle") is None:
                    row["verify"] = {"ok": False, "reason": f"no oracle: {ctx.get('oracle_error')}", "errors": {}}
                else:
                    with torch.enable_grad():
                        v = ctx["oracle"].judge(fn)
                    row["verify"] = {"ok": v.ok, "reason": v.reason, "errors": v.errors}
            # 2. first call at full size: tunes (slipstream), compiles (compile), warms up
            tuned_before = dispatcher().tuning_seconds
            t0 = time.perf_counter()
            res = step(fn, spec, sargs, grad_outs)
            self.sync()
            row["first_call_s"] = time.perf_counter() - t0
            if system.role == "compile":
                self.compile_spent += row["first_call_s"]
            if system.role == "slipstream":
                ctx["record"]["decision"] = self.decision(spec, sargs, dispatcher().tuning_seconds - tuned_before)
            if system.role == "eager":
                ctx["eager"] = res
            elif system.verify != "none" and ctx.get("eager") is not None:
                row["full_check"] = compare(res, ctx["eager"], ctx["tol"])
            del res
            # 3. peak extra memory of one forward+backward (outputs and gradients included)
            if self.device.type == "cuda":
                self.cleanup()
                self.sync()
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
                res = step(fn, spec, sargs, grad_outs)
                self.sync()
                row["peak_mib"] = (torch.cuda.max_memory_allocated(self.device) - base) / 2 ** 20
                del res
            # 4. timings
            row["fwd_bwd_ms"] = self.bench(lambda: step(fn, spec, sargs, grad_outs))
            with torch.enable_grad():
                row["fwd_ms"] = self.bench(lambda: fn(*sargs))
            # 5. the same fwd+bwd replayed from a CUDA graph: GPU time without host overhead
            row["graph_ms"], row["graph_reason"] = self.graph_time(lambda: step(fn, spec, sargs, grad_outs),
                                                                   row["fwd_bwd_ms"])
        except torch.OutOfMemoryError as exc:
            row.update(status="OOM", reason=str(exc).splitlines()[0][:200])
        except Exception as exc:  # noqa: BLE001 - one failing system never stops the run
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            row.update(status="error", reason=f"{type(exc).__name__}: {first}")
            row["traceback"] = traceback.format_exc()[-2000:]
        finally:
            sargs = None  # noqa: F841 - drop this system's inputs before the next one allocates
            self.cleanup()
        if row["status"] == "ok":
            for check in ("verify", "full_check"):
                if row[check] is not None and not row[check]["ok"]:
                    where = "bounded inputs vs float64" if check == "verify" else "full size vs eager"
                    row.update(status="WRONG", reason=f"{where}: {row[check]['reason']}")
                    break
        return row

    def decision(self, spec, args: tuple, tuned_s: float) -> dict:
        from slipstream.dispatch import dispatcher, explain

        key = dispatcher().key_text(spec.check(args), self.info)
        found = next((d for d in explain(spec.name) if d.key == key), None)
        if found is None:
            return {"chosen": None, "mode": None, "tuning_s": tuned_s, "key": key}
        return {"chosen": found.chosen, "mode": found.mode if tuned_s > 0 else f"{found.mode}, reused",
                "tuning_s": tuned_s, "decision_s": found.seconds, "key": key,
                "candidates": [{"label": c.label, "status": c.status, "reason": c.reason, "time_ms": c.time_ms}
                               for c in found.candidates]}

    # ------------------------------------------------------------------ one case
    def run_case(self, case: Case) -> dict:
        from slipstream.dispatch.dispatcher import VERIFY_ELEMENTS, VERIFY_ELEMENTS_DEFAULT, describe_args
        from slipstream.dispatch.verify import Oracle
        from slipstream.ops import SPECS

        spec = SPECS[case.op]
        record = {"op": case.op, "label": case.label, "headline": case.headline, "note": case.note,
                  "shapes": describe_args(spec, case.args),
                  "grads": [n for n, a in zip(spec.parameters, case.args, strict=False) if _rg(a)],
                  "work": WORK[case.op](case.args), "aliases": {}, "decision": None, "rows": [], "error": None}
        if self.out_of_time():
            record["error"] = f"skipped: time limit ({self.time_limit_s:.0f} s) reached"
            return record
        t0 = time.perf_counter()
        ctx: dict = {"record": record, "tol": spec.tolerance(spec.dtype_of(case.args))}
        try:
            budget = VERIFY_ELEMENTS.get(self.device.type, VERIFY_ELEMENTS_DEFAULT)
            try:
                with torch.enable_grad():
                    vargs = spec.fresh(case.args, budget)
                    if case.layout is not None:
                        vargs = case.layout(vargs)
                    ctx["oracle"] = Oracle(spec, vargs)
            except Exception as exc:  # noqa: BLE001
                ctx["oracle"], ctx["oracle_error"] = None, f"{type(exc).__name__}: {exc}"
            with torch.enable_grad():
                probe = spec.reference(*clone_args(case.args))
                ctx["grad_outs"] = grad_outputs(probe)
                del probe
            for system in self.systems(spec, case, record):
                row = self.measure(spec, case, system, ctx)
                record["rows"].append(row)
                self.log_row(case, row)
            self.settle_slipstream(record)
        except torch.OutOfMemoryError as exc:
            record["error"] = f"OOM: {str(exc).splitlines()[0][:200]}"
        except Exception as exc:  # noqa: BLE001 - one failing case never stops the run
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()[-3000:]
        finally:
            ctx.clear()
            self.cleanup()
        record["seconds"] = time.perf_counter() - t0
        return record

    @staticmethod
    def settle_slipstream(record: dict) -> None:
        """The dispatched op inherits the bounded verdict of the candidate it chose."""
        rows = {r["system"]: r for r in record["rows"]}
        slip = rows.get("slipstream")
        decision = record.get("decision") or {}
        if slip is None:
            return
        chosen = decision.get("chosen")
        slip["chosen"] = chosen
        slip["tuning_s"] = decision.get("tuning_s")
        alias = record["aliases"].get(chosen, chosen)
        twin = rows.get(alias)
        if twin is not None and twin.get("verify") is not None:
            slip["verify"] = dict(twin["verify"], reason=f"as {chosen}: {twin['verify']['reason']}".rstrip(": "))
        elif alias == "eager":
            slip["verify"] = {"ok": True, "reason": "chose the reference", "errors": {}}
        if slip["status"] == "ok" and slip.get("verify") and not slip["verify"]["ok"]:
            slip.update(status="WRONG", reason=f"bounded inputs vs float64: {slip['verify']['reason']}")

    def log_row(self, case: Case, row: dict) -> None:
        def ms(v):
            return f"{v:.4f}" if isinstance(v, float) else "-"

        extra = f" ({row['reason'][:100]})" if row["reason"] and row["status"] != "ok" else ""
        graph = f"  graph {ms(row['graph_ms'])} ms" if self.device.type == "cuda" and self.graph else ""
        if graph and row["graph_ms"] is None and row.get("graph_reason"):
            graph += f" [{row['graph_reason'][:80]}]"
        self.log(f"[{self.elapsed():6.1f}s] {case.op:<20} {case.label[:36]:<36} {row['system'][:48]:<48} "
                 f"{row['status']:<7} fwd+bwd {ms(row['fwd_bwd_ms'])} ms  fwd {ms(row['fwd_ms'])} ms{graph}{extra}")


# ============================================================================= main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--ops", default="", help="comma-separated ops (default: all)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--size", choices=("real", "small"), default=None,
                    help="sample sizes: real = Llama-3.1-8B shapes (default on GPUs), small (default on the CPU)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--quick", action="store_true", help="headline cases only, shorter timing")
    ap.add_argument("--compile", dest="compile_mode", choices=("all", "headline", "none"), default=None,
                    help="which cases time torch.compile (default: all on GPUs within --compile-budget, none on CPU)")
    ap.add_argument("--compile-budget", type=float, default=None, help="seconds of torch.compile (dynamic=False) "
                    "compilation after which further compile rows are skipped")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds after which remaining cases are "
                    "recorded as skipped (the run still writes its outputs)")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay timing (graph_ms, GPU "
                    "time without host overhead) that follows the event timings on CUDA devices")
    ap.add_argument("--warmup-ms", type=float, default=None)
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument("--keep-cache", action="store_true", help="use SLIPSTREAM_CACHE_DIR as set (tuning may be "
                    "read from earlier runs) instead of a fresh decision cache")
    ap.add_argument("--verbose", action="store_true", help="show the dispatcher's tuning progress")
    return ap.parse_args(argv)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def iter_cases(ops: list[str], device, dtype, size: str, quick: bool,
               stop: Callable[[], bool] = lambda: False) -> Iterator[Case | tuple[str, str]]:
    """The first (headline) case of every op, then the other headline cases, then the remaining
    samples (not under ``quick``): if time runs out, what is cut is the least important. Cases are
    built one op at a time (GPU memory); nothing more is built once ``stop()`` says time is up."""
    phases = ("first", "headline") if quick else ("first", "headline", "rest")
    for phase in phases:
        for op in ops:
            if stop():
                return
            try:
                cases = cases_for(op, device, dtype, size, quick)
            except Exception as exc:  # noqa: BLE001
                if phase == "first":
                    yield (op, f"building cases failed: {type(exc).__name__}: {exc}")
                continue
            picked = {"first": cases[:1], "headline": [c for c in cases[1:] if c.headline],
                      "rest": [c for c in cases[1:] if not c.headline]}[phase]
            del cases
            while picked:
                yield picked.pop(0)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.keep_cache:
        os.environ["SLIPSTREAM_CACHE_DIR"] = tempfile.mkdtemp(prefix="slipstream-bench-cache-")
    if not a.verbose:
        os.environ["SLIPSTREAM_QUIET"] = "1"
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type != "cpu"
    size = a.size or ("real" if gpu else "small")
    dtype = DTYPES[a.dtype]
    mode = "quick" if a.quick else "default"
    timing = dict(TIMING[mode])
    if a.warmup_ms is not None:
        timing["warmup_ms"] = a.warmup_ms
    if a.rep_ms is not None:
        timing["rep_ms"] = a.rep_ms
    compile_mode = a.compile_mode or ("all" if gpu else "none")
    compile_budget = a.compile_budget if a.compile_budget is not None else COMPILE_BUDGET_S[mode]
    time_limit = a.time_limit if a.time_limit is not None else TIME_LIMIT_S[mode]

    from slipstream.dispatch import dispatcher, set_tuning
    from slipstream.ops import SPECS

    ops = [o.strip() for o in a.ops.split(",") if o.strip()] or list(SPECS)
    unknown = [o for o in ops if o not in SPECS]
    if unknown:
        raise SystemExit(f"unknown ops {unknown}; known: {', '.join(SPECS)}")
    set_tuning(True)
    import torch._dynamo.config as dynamo_config

    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, max(256, getattr(dynamo_config, knob)))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    runner = Runner(device, dtype, quick=a.quick, compile_mode=compile_mode, compile_budget_s=compile_budget,
                    time_limit_s=time_limit, timing=timing, log=log, graph=not a.no_graph)
    results: dict = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": runner.info.name or device.type, "device_info": runner.info.describe(),
            "host": platform.node(), "python": platform.python_version(), "versions": peers.versions(),
            "argv": sys.argv if argv is None else ["run.py", *argv], "dtype": str(dtype).removeprefix("torch."),
            "size": size, "quick": a.quick, "ops": ops, "compile_mode": compile_mode,
            "compile_budget_s": compile_budget, "time_limit_s": time_limit,
            "timing": dict(timing, method="triton.testing.do_bench median (L2 flushed)" if device.type == "cuda"
                           else "synchronised wall clock median"),
            "graph": dict(GRAPH[mode], max_iters=GRAPH_MAX_ITERS, enabled=not a.no_graph and device.type == "cuda",
                          method="CUDA-graph replay of back-to-back fwd+bwd calls, CUDA events, median over "
                                 "replays (no L2 flush between calls)"),
            "env": {k: os.environ.get(k) for k in ("SLIPSTREAM_CACHE_DIR", "TRITON_INTERPRET", "SLIPSTREAM_FORCE",
                                                     "SLIPSTREAM_PLUGINS", "SLIPSTREAM_DISABLE_PLUGINS")},
        },
        "ceilings": {},
        "cases": [],
    }
    json_path = out / "results.json"
    log(f"slipstream op benchmark on {runner.info.describe()}: {', '.join(ops)}; {results['meta']['dtype']}, "
        f"size {size}{', quick' if a.quick else ''}; compile {compile_mode}")
    try:
        results["ceilings"] = ceilings.measure(device, dtype, quick=a.quick)
    except Exception as exc:  # noqa: BLE001
        results["ceilings"] = {"error": f"{type(exc).__name__}: {exc}"}
    log(f"[{runner.elapsed():6.1f}s] ceilings: {report.ceiling_text(results['ceilings'])}")
    for case in iter_cases(ops, device, dtype, size, a.quick, stop=runner.out_of_time):
        if isinstance(case, tuple):
            results["cases"].append({"op": case[0], "label": "(cases)", "rows": [], "error": case[1]})
            continue
        record = runner.run_case(case)
        del case
        results["cases"].append(record)
        if record.get("error"):
            log(f"[{runner.elapsed():6.1f}s] {record['op']} {record['label']}: {record['error']}")
        results["meta"]["wall_s"] = runner.elapsed()
        report.derive(results)
        write_json(json_path, results)
    results["meta"]["wall_s"] = runner.elapsed()
    results["meta"]["compile_s"] = runner.compile_spent
    results["meta"]["tuning_s"] = dispatcher().tuning_seconds
    report.derive(results)
    write_json(json_path, results)
    written = report.write_all(results, out)
    skipped = sum(1 for c in results["cases"] if str(c.get("error", "")).startswith("skipped"))
    log(f"wrote {', '.join(str(p) for p in [json_path, *written])} in {runner.elapsed():.0f} s"
        + (f"; time limit reached, {skipped} cases skipped" if runner.out_of_time() else ""))
    print(report.compact_table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
