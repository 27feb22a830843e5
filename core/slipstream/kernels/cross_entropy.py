"""Triton cross-entropy over a large vocabulary: online logsumexp, gradient computed in forward.

Layout and cost (N rows of V logits, ``b`` bytes per logit):

* ``_ce_rows_kernel``: one program per row. Pass 1 streams the row in ``BLOCK``-wide chunks and
  keeps a running (max, sum of exp) pair in fp32 (online logsumexp), so any V (262144 included)
  fits in registers. Pass 2, only when a gradient is wanted, streams the row again -- in reverse
  block order, so the chunks pass 1 touched last are re-read while still in L2 -- and writes
  ``(softmax - onehot) * dz/dx * gscale`` into a gradient buffer. Traffic: ~2 reads + 1 write of
  ``N * V * b`` bytes, one ``exp`` per element per pass.
* ``_scale_flat_kernel`` / ``_scale_rows_kernel``: backward. Multiply the stored gradient in place
  by ``grad_output`` (a scalar for mean/sum, one value per row for ``"none"``). Each program first
  loads its factor and skips all memory traffic when it is exactly 1.0 -- the usual
  ``loss.backward()`` -- so backward then costs one tiny launch and no host synchronisation.

The gradient goes into a fresh buffer (the user may still need ``logits``), so peak extra memory
is one ``N x V`` tensor in the logits' dtype plus O(N) fp32. For mean reduction the gradient is
already divided by the number of non-ignored labels, counted on device (no host sync); a row
whose label is ``ignore_index`` gets loss 0 and a zero gradient row.

``launch_ce_rows`` and ``scale_`` are shared with :mod:`slipstream.kernels.linear_cross_entropy`,
which runs the same row kernel in place on its own logits chunks.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from slipstream.kernels._aot import AotUnit, ptr
from slipstream.kernels._catalog import PortableKernel, interpreter_on, launch_options

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LABEL_DTYPES = (torch.int64, torch.int32)

# How the gradient of each row is scaled inside the row kernel (``GSCALE_MODE``).
GSCALE_NONE = 0  # times 1
GSCALE_SCALAR = 1  # times gscale[0]          (mean: 1 / number of non-ignored labels)
GSCALE_PER_ROW = 2  # times gscale[row]        (reduction "none" with a known grad_output)

SCALE_BLOCK = 4096  # elements per step of the backward scaling kernel
SCALE_WARPS = 8
MAX_VOCAB = 2**31 - 2**20  # offsets inside a row are int32


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _logits_z(x, mul, softcap, HAS_SOFTCAP: tl.constexpr):
    """Transformed logits ``z`` and ``t = tanh(x * mul)`` (only meaningful with a softcap).

    Without softcap ``mul = scale`` and ``z = x * scale``; with one ``mul = scale / softcap`` and
    ``z = softcap * tanh(x * scale / softcap)``. tanh is built from ``exp`` (portable across
    vendors: ``1 - 2 / (exp(2y) + 1)`` saturates cleanly to +-1, absolute error ~1e-7).
    """
    y = x * mul
    if HAS_SOFTCAP:
        t = 1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0)
        z = softcap * t
    else:
        t = y
        z = y
    return z, t


@triton.jit
def _lse_step(x, mask, m, s, mul, softcap, HAS_SOFTCAP: tl.constexpr):
    """Fold one block into the running (max, sum of exp(z - max)) pair: one exp per element."""
    z, _t = _logits_z(x.to(tl.float32), mul, softcap, HAS_SOFTCAP)
    z = tl.where(mask, z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of only -inf logits: no NaN
    s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref), axis=0)
    return m_new, s


@triton.jit
def _grad_step(x, offs, mask, label, lse, coef, mul, softcap, g_row, HAS_SOFTCAP: tl.constexpr):
    """Write ``(softmax - onehot) * dz/dx * coef`` for one block of a row."""
    z, t = _logits_z(x.to(tl.float32), mul, softcap, HAS_SOFTCAP)
    d = tl.exp(z - lse) - tl.where(offs == label, 1.0, 0.0)
    if HAS_SOFTCAP:
        d = d * (1.0 - t * t)
    tl.store(g_row + offs, (d * coef).to(g_row.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def _ce_rows_kernel(
    logits_ptr,  # (N, V) rows with unit column stride, any row stride
    grad_ptr,  # (N, V) gradient out; may alias logits_ptr (in place); unused without WRITE_GRAD
    labels_ptr,  # (N,) int32/int64
    loss_ptr,  # (N,) fp32 per-row loss (0 for ignored rows)
    gscale_ptr,  # fp32 gradient factor(s), see GSCALE_MODE
    n_cols,  # V
    stride_logits,  # row stride of logits, elements
    stride_grad,  # row stride of grad, elements
    ignore_index,
    mul,  # scale, or scale / softcap with a softcap
    scale,  # d(x * scale)/dx
    softcap,  # cap (unused without HAS_SOFTCAP)
    BLOCK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    GSCALE_MODE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    PREFETCH: tl.constexpr,  # issue the next block's load before reducing the current one
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * stride_logits
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK)
    n_blocks = tl.cdiv(n_cols, BLOCK)
    if label != ignore_index:
        # pass 1: online logsumexp over the row in fp32
        m = float("-inf")
        s = 0.0
        if PREFETCH:
            x_next = tl.load(x_row + cols, mask=cols < n_cols, other=0.0, eviction_policy="evict_last")
            for i in range(0, n_blocks):
                x = x_next
                offs = i * BLOCK + cols
                nxt = offs + BLOCK
                x_next = tl.load(x_row + nxt, mask=nxt < n_cols, other=0.0, eviction_policy="evict_last")
                m, s = _lse_step(x, offs < n_cols, m, s, mul, softcap, HAS_SOFTCAP)
        else:
            for i in range(0, n_blocks):
                offs = i * BLOCK + cols
                mask = offs < n_cols
                x = tl.load(x_row + offs, mask=mask, other=0.0, eviction_policy="evict_last")
                m, s = _lse_step(x, mask, m, s, mul, softcap, HAS_SOFTCAP)
        lse = m + tl.log(s)
        # the label's logit; an out-of-range label gives NaN rather than a wild read
        in_range = (label >= 0) & (label < n_cols)
        x_t = tl.load(x_row + label, mask=in_range, other=float("nan")).to(tl.float32)
        z_t, _tt = _logits_z(x_t, mul, softcap, HAS_SOFTCAP)
        tl.store(loss_ptr + row, lse - z_t)
        if WRITE_GRAD:
            if GSCALE_MODE == 1:
                coef = scale * tl.load(gscale_ptr).to(tl.float32)
            elif GSCALE_MODE == 2:
                coef = scale * tl.load(gscale_ptr + row).to(tl.float32)
            else:
                coef = scale
            g_row = grad_ptr + row * stride_grad
            # pass 2, last block first: the blocks pass 1 read last are still in L2
            if PREFETCH:
                last = (n_blocks - 1) * BLOCK + cols
                x_next = tl.load(x_row + last, mask=last < n_cols, other=0.0, eviction_policy="evict_first")
                for i in range(0, n_blocks):
                    x = x_next
                    offs = (n_blocks - 1 - i) * BLOCK + cols
                    prv = offs - BLOCK
                    x_next = tl.load(x_row + prv, mask=prv >= 0, other=0.0, eviction_policy="evict_first")
                    _grad_step(x, offs, offs < n_cols, label, lse, coef, mul, softcap, g_row, HAS_SOFTCAP)
            else:
                for i in range(0, n_blocks):
                    offs = (n_blocks - 1 - i) * BLOCK + cols
                    mask = offs < n_cols
                    x = tl.load(x_row + offs, mask=mask, other=0.0, eviction_policy="evict_first")
                    _grad_step(x, offs, mask, label, lse, coef, mul, softcap, g_row, HAS_SOFTCAP)
    else:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            g_row = grad_ptr + row * stride_grad
            zero = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
            for i in range(0, n_blocks):
                offs = i * BLOCK + cols
                tl.store(g_row + offs, zero, mask=offs < n_cols, eviction_policy="evict_first")


@triton.jit
def _scale_flat_kernel(
    x_ptr,  # contiguous tensor scaled in place, viewed flat
    g_ptr,  # fp32 scalar factor
    numel,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:  # the common loss.backward(): nothing to do, no memory touched
        cols = tl.arange(0, BLOCK)
        for b in range(pid, tl.cdiv(numel, BLOCK), nprog):
            offs = tl.cast(b, tl.int64) * BLOCK + cols
            mask = offs < numel
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(
    x_ptr,  # (R, C) tensor scaled in place, unit column stride
    g_ptr,  # (R,) fp32 factors, one per row
    n_rows,
    n_cols,
    stride_row,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    for row in range(pid, n_rows, nprog):
        g = tl.load(g_ptr + row).to(tl.float32)
        if g != 1.0:
            base = x_ptr + tl.cast(row, tl.int64) * stride_row
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                mask = offs < n_cols
                x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(base + offs, (x * g).to(x_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
def runs_here(t: torch.Tensor) -> bool:
    """Triton can run on ``t``'s device: a GPU, or the CPU under the interpreter."""
    return t.device.type != "cpu" or interpreter_on()


def row_block(config: dict, n_cols: int) -> int:
    """The config's vocab block, shrunk (to a power of two >= 32 * num_warps) for narrow rows."""
    block = int(config["block"])
    floor = 32 * int(config["num_warps"])
    return max(min(block, triton.next_power_of_2(max(1, n_cols))), floor)


def loss_mul(softcap: float | None, scale: float) -> float:
    return scale / softcap if softcap is not None else scale


def launch_ce_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: torch.Tensor,
    grad: torch.Tensor | None,
    gscale: torch.Tensor | None,
    gscale_mode: int,
    ignore_index: int,
    softcap: float | None,
    scale: float,
    config: dict,
) -> None:
    """Per-row CE of ``logits`` (R, V) into ``loss`` (R,) fp32; gradient into ``grad`` if given.

    ``logits`` must have unit column stride; ``grad`` (R, V) may be ``logits`` itself (in place).
    ``gscale`` is the fp32 factor tensor for ``gscale_mode`` (``GSCALE_SCALAR``: 1 element,
    ``GSCALE_PER_ROW``: R elements). ``labels`` must be contiguous int32/int64.
    """
    rows, cols = logits.shape
    if rows == 0:
        return
    write = grad is not None
    _ce_rows_kernel[(rows,)](
        logits, grad if write else logits, labels, loss, gscale if gscale is not None else loss,
        cols, logits.stride(0), grad.stride(0) if write else 0, ignore_index,
        loss_mul(softcap, scale), scale, 1.0 if softcap is None else softcap,
        BLOCK=row_block(config, cols), HAS_SOFTCAP=softcap is not None,
        GSCALE_MODE=gscale_mode if write else GSCALE_NONE, WRITE_GRAD=write,
        PREFETCH=bool(config.get("prefetch", True)), num_warps=int(config["num_warps"]),
        **launch_options(config),
    )


@functools.cache
def _max_programs(device: torch.device) -> int:
    """A grid big enough to fill the device for a streaming kernel (a few programs per SM/CU)."""
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "cpu":
        return 4
    return 1024


def scale_(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x *= g`` in place; ``g`` holds one factor (any contiguous ``x``) or one per row of a 2-D
    ``x`` with unit column stride. A single factor equal to 1.0 costs one launch, no traffic."""
    if x.numel() == 0:
        return x
    g = g.to(device=x.device, dtype=torch.float32).reshape(-1).contiguous()
    if g.numel() == 1:
        if not x.is_contiguous():
            return x.mul_(g)
        grid = (min(triton.cdiv(x.numel(), SCALE_BLOCK), _max_programs(x.device)),)
        _scale_flat_kernel[grid](x, g, x.numel(), BLOCK=SCALE_BLOCK, num_warps=SCALE_WARPS)
        return x
    rows, cols = x.shape
    grid = (min(rows, _max_programs(x.device)),)
    _scale_rows_kernel[grid](x, g, rows, cols, x.stride(0), BLOCK=SCALE_BLOCK, num_warps=SCALE_WARPS)
    return x


def valid_count(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of non-ignored labels, on device (int64, 0-dim): no host synchronisation."""
    return (labels != ignore_index).sum()


def reduce_rows(loss: torch.Tensor, reduction: str, count: torch.Tensor | None) -> torch.Tensor:
    """The op's reduction of per-row fp32 losses (mean over non-ignored rows, 0.0 if none)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    assert count is not None
    return loss.sum() / count.clamp(min=1)


def check_options(reduction: str, softcap: float | None) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"`softcap` must be > 0 or None, got {softcap}")


# ----------------------------------------------------------------------------- autograd
class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str,
                softcap: float | None, scale: float, config: dict, grad_on: bool) -> torch.Tensor:
        n, v = logits.shape
        x = logits if logits.stride(1) == 1 or v <= 1 else logits.contiguous()
        labels = labels.contiguous()
        want_grad = grad_on and ctx.needs_input_grad[0]  # forward itself always runs without grad mode
        loss = torch.empty(n, device=logits.device, dtype=torch.float32)
        grad = torch.empty((n, v), device=logits.device, dtype=logits.dtype) if want_grad else None
        count = valid_count(labels, ignore_index) if reduction == "mean" else None
        gscale = None
        mode = GSCALE_NONE
        if count is not None and want_grad:
            gscale = 1.0 / count.clamp(min=1).to(torch.float32)
            mode = GSCALE_SCALAR
        launch_ce_rows(x, labels, loss, grad, gscale, mode, ignore_index, softcap, scale, config)
        ctx.grad = grad
        return reduce_rows(loss, reduction, count)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("slipstream cross_entropy: backward ran twice through one forward (the "
                               "gradient is scaled in place); recompute the loss instead of retain_graph")
        ctx.grad = None
        scale_(grad, grad_output)
        return grad, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public
# block: logits per step of the row loop; prefetch: load step i+1 before reducing step i
# (more registers, loads stay in flight across the block reductions' barriers).
CONFIGS: list[dict] = [
    {"block": 8192, "num_warps": 8, "prefetch": True},
    {"block": 8192, "num_warps": 8, "prefetch": False},
    {"block": 4096, "num_warps": 4, "prefetch": True},
    {"block": 4096, "num_warps": 8, "prefetch": True},
    {"block": 4096, "num_warps": 4, "prefetch": False},
    {"block": 8192, "num_warps": 16, "prefetch": True},
    {"block": 16384, "num_warps": 16, "prefetch": True},
    {"block": 16384, "num_warps": 16, "prefetch": False},
]


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    scale: float = 1.0,
    config: dict | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (N, V) against ``labels`` (N,), same meaning as the op's reference.

    Logits are scaled, then soft-capped, then fed to an fp32 online logsumexp. Returns an fp32
    scalar (``"mean"``/``"sum"``) or (N,) fp32 (``"none"``). The gradient w.r.t. ``logits`` (in
    ``logits.dtype``) is computed during forward into a new N x V buffer and scaled by
    ``grad_output`` in backward. ``config``: ``{"block", "num_warps"}``; ``None`` picks ``CONFIGS[0]``.
    """
    check_options(reduction, softcap)
    cfg = {**CONFIGS[0], **(config or {})}
    return _CrossEntropy.apply(logits, labels, int(ignore_index), reduction,
                               None if softcap is None else float(softcap), float(scale), cfg,
                               torch.is_grad_enabled())


def accepts(logits: object, labels: object, ignore_index: object = -100, reduction: object = "mean",
            softcap: object = None, scale: object = 1.0) -> bool:
    """Inputs this kernel handles: 2-D float logits with V >= 1 on a device Triton runs on."""
    return (isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor) and logits.dim() == 2
            and logits.dtype in FLOAT_DTYPES and labels.dtype in LABEL_DTYPES
            and tuple(labels.shape) == (logits.shape[0],) and 1 <= logits.shape[1] <= MAX_VOCAB
            and labels.device == logits.device and runs_here(logits)
            and isinstance(ignore_index, int) and -2**31 <= ignore_index < 2**31
            and reduction in REDUCTIONS and isinstance(scale, (int, float))
            and (softcap is None or (isinstance(softcap, (int, float)) and softcap > 0)))


# ----------------------------------------------------------------------------- AOT
def ce_rows_unit(config: dict, dtype: torch.dtype = torch.bfloat16, label_dtype: torch.dtype = torch.int64,
                 *, softcap: bool = False, gscale_mode: int = GSCALE_SCALAR, write_grad: bool = True,
                 tag: str = "") -> AotUnit:
    """The row kernel as launched for ``dtype`` logits at the config's nominal block."""
    p = ptr(dtype)
    signature = {"logits_ptr": p, "grad_ptr": p, "labels_ptr": ptr(label_dtype), "loss_ptr": "*fp32",
                 "gscale_ptr": "*fp32", "n_cols": "i32", "stride_logits": "i32", "stride_grad": "i32",
                 "ignore_index": "i32", "mul": "fp32", "scale": "fp32", "softcap": "fp32",
                 "BLOCK": "constexpr", "HAS_SOFTCAP": "constexpr", "GSCALE_MODE": "constexpr",
                 "WRITE_GRAD": "constexpr", "PREFETCH": "constexpr"}
    constexprs = {"BLOCK": int(config["block"]), "HAS_SOFTCAP": softcap,
                  "GSCALE_MODE": gscale_mode if write_grad else GSCALE_NONE, "WRITE_GRAD": write_grad,
                  "PREFETCH": bool(config.get("prefetch", True))}
    name = (f"ce_rows[{tag or 'grad'},block={config['block']},warps={config['num_warps']},"
            f"prefetch={bool(config.get('prefetch', True))}]")
    return AotUnit(name, _ce_rows_kernel, signature, constexprs, {"num_warps": int(config["num_warps"])})


def scale_units(dtype: torch.dtype = torch.bfloat16, *, per_row: bool = True) -> list[AotUnit]:
    """The backward scaling kernels: flat (scalar factor, i32 and i64 element counts) and, with
    ``per_row``, the per-row one used by ``reduction="none"``."""
    units = [AotUnit(f"scale_flat[numel {n}]", _scale_flat_kernel,
                     {"x_ptr": ptr(dtype), "g_ptr": "*fp32", "numel": n, "BLOCK": "constexpr"},
                     {"BLOCK": SCALE_BLOCK}, {"num_warps": SCALE_WARPS}) for n in ("i32", "i64")]
    if per_row:
        signature = {"x_ptr": ptr(dtype), "g_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
                     "stride_row": "i32", "BLOCK": "constexpr"}
        units.append(AotUnit("scale_rows", _scale_rows_kernel, signature, {"BLOCK": SCALE_BLOCK},
                             {"num_warps": SCALE_WARPS}))
    return units


def aot(config: dict) -> list[AotUnit]:
    """Every kernel a bf16 call with this config launches: the row kernel for mean (scalar
    gradient factor), sum (none), softcap, and forward-only, plus both backward scalings."""
    return [
        ce_rows_unit(config, tag="mean"),
        ce_rows_unit(config, gscale_mode=GSCALE_NONE, tag="sum"),
        ce_rows_unit(config, softcap=True, tag="mean,softcap"),
        ce_rows_unit(config, write_grad=False, tag="forward-only"),
        *scale_units(),
    ]


KERNELS = [
    PortableKernel(
        op="cross_entropy",
        name="cross_entropy",
        fn=cross_entropy,
        configs=CONFIGS,
        accepts=accepts,
        aot=aot,
        description="Triton CE: online logsumexp per row, gradient written in forward, free backward at 1.0",
    )
]
