"""``cross_entropy``: token-level CE over a (large) vocabulary, HF causal-LM loss semantics."""

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
    rows_within,
)

OP = "cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


def loss_from_logits(
    z: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    scale: float,
) -> torch.Tensor:
    """CE of fp32-or-wider logits ``z`` (N, V) against ``labels`` (N,); shared by both CE ops."""
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    picked = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    loss = (torch.logsumexp(z, dim=-1) - picked) * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (N, V) against ``labels`` (N,) int64, computed in fp32.

    Logits are first multiplied by ``scale``, then soft-capped ``softcap * tanh(z / softcap)``
    (Gemma 2). Labels equal to ``ignore_index`` contribute 0. ``reduction``: ``"mean"`` over
    non-ignored tokens (0.0, not NaN, when every label is ignored, so a fully-masked packed row
    cannot poison a step), ``"sum"``, or ``"none"`` (per-token, (N,)). Returns fp32.
    """
    wide = torch.promote_types(logits.dtype, torch.float32)
    return loss_from_logits(logits.to(wide), labels, ignore_index, reduction, softcap, scale)


def check_loss_args(op: str, labels: torch.Tensor, rows: int, reduction: str, softcap: float | None) -> None:
    require_tensor("labels", labels, op=op, floating=False)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: `labels` must be int64 or int32, got {labels.dtype}")
    if labels.shape != (rows,):
        raise ValueError(f"{op}: `labels` must have shape ({rows},), got {tuple(labels.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{op}: `softcap` must be > 0 or None, got {softcap}")


def check(args: tuple) -> tuple:
    logits, labels, ignore_index, reduction, softcap, scale = args
    require_tensor("logits", logits, op=OP)
    require_dtype(OP, "logits", logits, FLOAT_DTYPES)
    if logits.dim() != 2:
        raise ValueError(f"{OP}: `logits` must be (N, V); flatten batch and sequence first, got {tuple(logits.shape)}")
    check_loss_args(OP, labels, logits.shape[0], reduction, softcap)
    device = require_same_device(OP, logits=logits, labels=labels)
    return (OP, device, logits.dtype, logits.shape[1], bucket(logits.shape[0]), logits.requires_grad,
            reduction, softcap is not None, scale != 1.0)


def fresh_labels(labels: torch.Tensor, rows: int, vocab: int, ignore_index: int) -> torch.Tensor:
    """Random labels in [0, vocab) with about one in eight set to ``ignore_index``."""
    out = torch.randint(0, vocab, (rows,), device=labels.device, dtype=labels.dtype)
    drop = torch.rand(rows, device=labels.device) < 0.125
    return out.masked_fill(drop, ignore_index)


def fresh(args: tuple, max_elements: int | None) -> tuple:
    logits, labels, ignore_index, reduction, softcap, scale = args
    n, v = logits.shape
    rows = rows_within(n, v, max_elements)
    return (like(logits, (rows, v), scale=3.0), fresh_labels(labels, rows, v, ignore_index),
            ignore_index, reduction, softcap, scale)


def samples(device: torch.device, dtype: torch.dtype, size: str = "small") -> list[Sample]:
    def make(label: str, n: int, v: int, reduction: str = "mean", softcap: float | None = None,
             scale: float = 1.0, all_ignored: bool = False) -> Sample:
        logits = (torch.randn(n, v, device=device) * 3).to(dtype)
        labels = torch.randint(0, v, (n,), device=device)
        labels[::5] = -100
        if all_ignored:
            labels.fill_(-100)
        return Sample(label, (logits, labels, -100, reduction, softcap, scale))

    if size == "real":
        return [make("llama3 8192x128256", 8192, 128256), make("gemma2 4096x256000 softcap", 4096, 256000,
                                                               softcap=30.0)]
    return [make("8x50", 8, 50), make("1 row", 1, 7), make("odd 37x1000 sum", 37, 1000, "sum"),
            make("none softcap", 6, 300, "none", softcap=5.0), make("scaled", 5, 64, scale=0.5),
            make("all ignored", 4, 32, all_ignored=True), make("vocab 256k", 2, 262144)]


SPEC = OpSpec(
    name=OP,
    reference=reference,
    tolerances=ELEMENTWISE_TOLERANCES,
    check=check,
    fresh=fresh,
    samples=samples,
    differentiable=("logits",),
)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (N, V) against ``labels`` (N,); see :func:`reference`."""
    return call(SPEC, (logits, labels, ignore_index, reduction, softcap, scale))
