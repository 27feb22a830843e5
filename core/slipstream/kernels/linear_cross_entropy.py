"""Chunked fused linear + cross-entropy: CE of ``hidden @ weight.T (+ bias)`` without N x V logits.

For each chunk of ``config["chunk_rows"]`` rows (R below):

1. ``logits = hidden[chunk] @ weight.T (+ bias)`` with torch matmul (cuBLAS / hipBLASLt), into one
   reused R x V buffer in the inputs' dtype -- exactly the logits the reference computes;
2. the row kernel of :mod:`slipstream.kernels.cross_entropy` computes each row's loss and
   overwrites the buffer *in place* with ``dloss/dlogits`` (it is our buffer, nobody else sees it);
3. ``grad_hidden[chunk] = dlogits @ weight``; if ``weight`` is trainable,
   ``grad_weight += dlogits.T @ hidden[chunk]`` into an fp32 V x H accumulator (bias: column sums).

All gradients are finished during forward (mean reduction divides by the non-ignored count,
taken once up front on device), so backward only multiplies them by ``grad_output`` -- a no-op
launch when it is 1.0. Extra memory: R x V in the inputs' dtype, plus the N x H hidden gradient,
plus, only when ``weight`` requires grad, V x H fp32 (and its cast to ``weight.dtype``); a frozen
``weight`` (the LoRA case) allocates no weight-gradient buffer. ``reduction="none"`` cannot fold
a per-row ``grad_output`` into an already-summed weight gradient, so there forward only computes
losses and backward recomputes each chunk's logits with ``grad_output`` folded into the kernel.
"""

from __future__ import annotations

import functools

import torch

from slipstream.kernels._aot import AotUnit
from slipstream.kernels._catalog import PortableKernel
from slipstream.kernels.cross_entropy import (
    FLOAT_DTYPES,
    GSCALE_NONE,
    GSCALE_PER_ROW,
    GSCALE_SCALAR,
    LABEL_DTYPES,
    MAX_VOCAB,
    REDUCTIONS,
    ce_rows_unit,
    check_options,
    launch_ce_rows,
    reduce_rows,
    runs_here,
    scale_,
    scale_units,
    valid_count,
)

SLAB_BYTES = 64 << 20  # temporary per weight-gradient slab when fp32-output GEMMs are unavailable


# ----------------------------------------------------------------------------- matmul helpers
@functools.cache
def _fp32_accumulating_gemm(device: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc32, a16, b16, out_dtype=torch.float32, out=acc32)`` works (and is
    right) on ``device``: cuBLAS does it for fp16/bf16 on CUDA since torch 2.8. Probed once."""
    if device.startswith("cpu"):
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(48, 32, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(32, 40, generator=gen).to(device=device, dtype=dtype)
        acc = torch.randn(48, 40, generator=gen).to(device)
        want = acc + a.float() @ b.float()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
    except Exception:
        return False


def accumulate_weight_grad(acc: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
    """``acc (V, H) fp32 += dlogits.T @ h`` for a (R, V) ``dlogits`` and (R, H) ``h``.

    fp32 inputs use ``addmm_``; fp16/bf16 use one fp32-output GEMM where the library has it, else
    V-slabs of a low-precision GEMM (a bounded ``SLAB_BYTES`` temporary) added into ``acc``.
    """
    if dlogits.dtype == torch.float32:
        acc.addmm_(dlogits.t(), h)
        return
    if _fp32_accumulating_gemm(str(acc.device), dlogits.dtype):
        torch.addmm(acc, dlogits.t(), h, out_dtype=torch.float32, out=acc)
        return
    v, hid = acc.shape
    slab = max(256, SLAB_BYTES // max(1, hid * dlogits.element_size()))
    for v0 in range(0, v, slab):
        acc[v0:v0 + slab] += torch.mm(dlogits[:, v0:v0 + slab].t(), h)


def _logits_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if bias is None:
        torch.mm(h, weight.t(), out=out)
    else:
        torch.addmm(bias, h, weight.t(), out=out)


# ----------------------------------------------------------------------------- the chunk loop
def _chunked_pass(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                  ignore_index: int, softcap: float | None, scale: float, config: dict, loss: torch.Tensor,
                  *, grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None,
                  grad_bias: torch.Tensor | None, gscale: torch.Tensor | None, gscale_mode: int) -> None:
    """Run the chunk loop once: losses into ``loss`` (N,), gradients (if buffers are given) summed
    or written into ``grad_*``, with the row kernel's gradient factor ``gscale``/``gscale_mode``."""
    n = hidden.shape[0]
    v = weight.shape[0]
    if n == 0:
        return
    chunk = max(1, min(int(config["chunk_rows"]), n))
    buf = torch.empty((chunk, v), device=hidden.device, dtype=hidden.dtype)
    want_grad = grad_hidden is not None or grad_weight is not None or grad_bias is not None
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h = hidden[start:end]
        logits = buf[: end - start]
        _logits_into(logits, h, weight, bias)
        row_scale = gscale[start:end] if gscale_mode == GSCALE_PER_ROW else gscale
        launch_ce_rows(logits, labels[start:end], loss[start:end], logits if want_grad else None, row_scale,
                       gscale_mode, ignore_index, softcap, scale, config)
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            accumulate_weight_grad(grad_weight, logits, h)
        if grad_bias is not None:
            grad_bias += torch.sum(logits, dim=0, dtype=torch.float32)


def _grad_buffers(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  needs: tuple[bool, bool, bool]):
    need_h, need_w, need_b = needs
    gh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else None
    gw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
    gb = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_b else None
    return gh, gw, gb


def _finish(g: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None or like is None else g.to(like.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None, ignore_index: int, reduction: str, softcap: float | None,
                scale: float, config: dict, grad_on: bool) -> torch.Tensor:
        n = hidden.shape[0]
        labels = labels.contiguous()
        wants = [grad_on and w for w in ctx.needs_input_grad]  # forward always runs without grad mode
        needs = (wants[0], wants[1], bias is not None and wants[3])
        loss = torch.empty(n, device=hidden.device, dtype=torch.float32)
        count = valid_count(labels, ignore_index) if reduction == "mean" else None
        ctx.reduction = reduction
        ctx.grads = None
        if reduction == "none" and any(needs):
            # a per-row grad_output can't be applied to a summed weight gradient: recompute in backward
            _chunked_pass(hidden, weight, labels, bias, ignore_index, softcap, scale, config, loss,
                          grad_hidden=None, grad_weight=None, grad_bias=None, gscale=None,
                          gscale_mode=GSCALE_NONE)
            ctx.save_for_backward(hidden, weight, labels, bias)
            ctx.options = (ignore_index, softcap, scale, config, needs)
            return loss
        gh, gw, gb = _grad_buffers(hidden, weight, bias, needs)
        gscale, mode = None, GSCALE_NONE
        if count is not None and any(needs):
            gscale, mode = 1.0 / count.clamp(min=1).to(torch.float32), GSCALE_SCALAR
        _chunked_pass(hidden, weight, labels, bias, ignore_index, softcap, scale, config, loss,
                      grad_hidden=gh, grad_weight=gw, grad_bias=gb, gscale=gscale, gscale_mode=mode)
        gw = _finish(gw, weight)
        gb_out = _finish(gb, bias)
        ctx.grads = (gh, gw, gb_out) if any(needs) else None
        return reduce_rows(loss, reduction, count)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.reduction == "none":
            hidden, weight, labels, bias = ctx.saved_tensors
            ignore_index, softcap, scale, config, needs = ctx.options
            gh, gw, gb = _grad_buffers(hidden, weight, bias, needs)
            g = grad_output.to(torch.float32).contiguous()
            scratch = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
            _chunked_pass(hidden, weight, labels, bias, ignore_index, softcap, scale, config, scratch,
                          grad_hidden=gh, grad_weight=gw, grad_bias=gb, gscale=g, gscale_mode=GSCALE_PER_ROW)
            return gh, _finish(gw, weight), None, _finish(gb, bias), None, None, None, None, None, None
        if ctx.grads is None:
            raise RuntimeError("slipstream linear_cross_entropy: backward ran twice through one forward (the "
                               "gradients are scaled in place); recompute the loss instead of retain_graph")
        gh, gw, gb = ctx.grads
        ctx.grads = None
        for g in (gh, gw, gb):
            if g is not None:
                scale_(g, grad_output)
        return gh, gw, None, gb, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public
# chunk_rows trades GEMM efficiency for memory: the R x V chunk buffer is the extra memory
# (Llama 3, V = 128256, bf16: 1024 rows = 0.24 GiB, 2048 = 0.49, 4096 = 0.98, 8192 = 1.96).
# block / num_warps / prefetch configure the CE row kernel (see slipstream.kernels.cross_entropy).
# The space stops at 1024 rows: the whole point of the op is bounded memory, and the tuner ranks by
# time alone, so chunk sizes whose buffer breaks the ~0.5 GiB budget are not offered.
CONFIGS: list[dict] = [
    {"chunk_rows": 1024, "block": 8192, "num_warps": 8, "prefetch": True},
    {"chunk_rows": 512, "block": 8192, "num_warps": 8, "prefetch": True},
    {"chunk_rows": 1024, "block": 16384, "num_warps": 16, "prefetch": False},
    {"chunk_rows": 1024, "block": 4096, "num_warps": 4, "prefetch": True},
]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    scale: float = 1.0,
    config: dict | None = None,
) -> torch.Tensor:
    """CE of ``hidden (N, H) @ weight (V, H).T + bias (V,)`` against ``labels`` (N,), fp32 result,
    same meaning as the op's reference, never holding more than ``chunk_rows`` x V logits.

    ``config``: ``{"chunk_rows", "block", "num_warps", "prefetch"}`` (``block``/``num_warps`` configure the CE
    row kernel); ``None`` picks ``CONFIGS[0]``. Gradients come back in the inputs' dtypes.
    """
    check_options(reduction, softcap)
    cfg = {**CONFIGS[0], **(config or {})}
    return _LinearCrossEntropy.apply(hidden, weight, labels, bias, int(ignore_index), reduction,
                                     None if softcap is None else float(softcap), float(scale), cfg,
                                     torch.is_grad_enabled())


def accepts(hidden: object, weight: object, labels: object, bias: object = None, ignore_index: object = -100,
            reduction: object = "mean", softcap: object = None, scale: object = 1.0) -> bool:
    """Inputs handled: 2-D float hidden/weight of one dtype and device Triton runs on, V >= 1."""
    if not (isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor)
            and isinstance(labels, torch.Tensor)):
        return False
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.dtype == hidden.dtype
                                 and tuple(bias.shape) == (weight.shape[0],)
                                 and bias.device == hidden.device):
        return False
    return (hidden.dim() == 2 and weight.dim() == 2 and hidden.dtype in FLOAT_DTYPES
            and weight.dtype == hidden.dtype and weight.shape[1] == hidden.shape[1]
            and 1 <= weight.shape[0] <= MAX_VOCAB and labels.dtype in LABEL_DTYPES
            and tuple(labels.shape) == (hidden.shape[0],) and weight.device == hidden.device
            and labels.device == hidden.device and runs_here(hidden)
            and isinstance(ignore_index, int) and -2**31 <= ignore_index < 2**31
            and reduction in REDUCTIONS and isinstance(scale, (int, float))
            and (softcap is None or (isinstance(softcap, (int, float)) and softcap > 0)))


def aot(config: dict) -> list[AotUnit]:
    """Kernels a bf16 call with this config launches: the in-place row kernel (mean, sum, softcap,
    forward-only, and per-row for ``"none"``'s backward) and the backward scaling."""
    return [
        ce_rows_unit(config, tag="mean"),
        ce_rows_unit(config, gscale_mode=GSCALE_NONE, tag="sum"),
        ce_rows_unit(config, softcap=True, tag="mean,softcap"),
        ce_rows_unit(config, write_grad=False, tag="forward-only"),
        ce_rows_unit(config, gscale_mode=GSCALE_PER_ROW, tag="none-backward"),
        *scale_units(per_row=False),
    ]


KERNELS = [
    PortableKernel(
        op="linear_cross_entropy",
        name="linear_cross_entropy",
        fn=linear_cross_entropy,
        configs=CONFIGS,
        accepts=accepts,
        aot=aot,
        description="chunked cuBLAS logits + in-place Triton CE; grads finished in forward, no N x V logits",
    )
]
