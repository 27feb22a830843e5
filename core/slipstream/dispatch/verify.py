"""Checking an implementation against its op's reference, forward and backward.

The reference is evaluated twice on the same inputs: upcast to float64 (the truth) and in the
call's own dtype (how wrong the op's meaning itself is at that precision). A candidate passes
when every output and every gradient is finite where the truth is, and within the op's
tolerance of the truth, the tolerance widened to twice the reference's own error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from slipstream.ops._spec import OpSpec, Tolerance


@dataclass(frozen=True)
class RunResult:
    """Outputs and gradients (by argument name) of one forward+backward."""

    outputs: tuple[torch.Tensor, ...]
    grads: dict[str, torch.Tensor]


def _as_tuple(out: object) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def grad_targets(spec: OpSpec, args: Sequence) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) arguments a backward pass must produce gradients for."""
    names = spec.parameters
    return [(n, a) for n, a in zip(names, args, strict=False)
            if n in spec.differentiable and isinstance(a, torch.Tensor) and a.requires_grad]


def random_grad_outputs(outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.randn_like(o) if o.is_floating_point() else torch.zeros_like(o) for o in outputs]


def run(fn: Callable, spec: OpSpec, args: Sequence, grad_outputs: Sequence[torch.Tensor] | None) -> RunResult:
    """Call ``fn(*args)`` and, if any argument requires grad, backpropagate ``grad_outputs``."""
    outputs = _as_tuple(fn(*args))
    targets = grad_targets(spec, args)
    grads: dict[str, torch.Tensor] = {}
    if targets and grad_outputs is not None:
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
        if pairs:
            got = torch.autograd.grad([o for o, _ in pairs], [t for _, t in targets],
                                      [g.to(o.dtype) for o, g in pairs], allow_unused=True)
            grads = {name: (torch.zeros_like(t) if g is None else g) for (name, t), g in zip(targets, got,
                                                                                             strict=True)}
    return RunResult(tuple(o.detach() for o in outputs), grads)


def upcast(args: Sequence, dtype: torch.dtype) -> tuple:
    """Detached copies of the floating-point tensor arguments in ``dtype``, keeping requires_grad."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            out.append(a.detach().to(dtype).requires_grad_(a.requires_grad))
        else:
            out.append(a)
    return tuple(out)


def detached(args: Sequence) -> tuple:
    """Fresh leaves with the same values, so each run builds its own graph."""
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                 and a.is_floating_point() else a for a in args)


def errors(got: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(norm-wise relative error, worst element relative to the largest true magnitude)."""
    g, t = got.double(), truth.double()
    if t.numel() == 0:
        return 0.0, 0.0
    diff = g - t
    scale = t.norm().item()
    peak_scale = t.abs().max().item()
    rel = diff.norm().item() / scale if scale > 0 else diff.norm().item()
    peak = diff.abs().max().item() / peak_scale if peak_scale > 0 else diff.abs().max().item()
    return rel, peak


@dataclass
class Verdict:
    ok: bool
    reason: str
    errors: dict[str, float]


class Oracle:
    """The reference's answers for one set of inputs, computed once and reused per candidate."""

    def __init__(self, spec: OpSpec, args: Sequence):
        self.spec = spec
        self.args = tuple(args)
        self.tolerance: Tolerance = spec.tolerance(spec.dtype_of(args))
        probe = spec.reference(*detached(args))
        self.grad_outputs = random_grad_outputs(_as_tuple(probe)) if grad_targets(spec, args) else None
        wide = upcast(args, torch.float64)
        grads64 = None if self.grad_outputs is None else [g.double() for g in self.grad_outputs]
        self.truth = run(spec.reference, spec, wide, grads64)
        self.own = run(spec.reference, spec, detached(args), self.grad_outputs)

    def named(self, result: RunResult) -> dict[str, torch.Tensor]:
        items = {f"out{i}" if len(result.outputs) > 1 else "out": o for i, o in enumerate(result.outputs)}
        items.update({f"grad_{n}": g for n, g in result.grads.items()})
        return items

    def judge(self, fn: Callable) -> Verdict:
        """Run ``fn`` on the same inputs and compare with the reference."""
        try:
            got = run(fn, self.spec, detached(self.args), self.grad_outputs)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            return Verdict(False, f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
                           {})
        truth, own, mine = self.named(self.truth), self.named(self.own), self.named(got)
        missing = sorted(set(truth) - set(mine))
        if missing:
            return Verdict(False, f"produced no {', '.join(missing)}", {})
        errs: dict[str, float] = {}
        tol = self.tolerance
        for name, t in truth.items():
            m = mine[name]
            if m.shape != t.shape:
                return Verdict(False, f"{name} has shape {tuple(m.shape)}, expected {tuple(t.shape)}", errs)
            if m.dtype != own[name].dtype:
                return Verdict(False, f"{name} has dtype {m.dtype}, expected {own[name].dtype}", errs)
            bad = ~torch.isfinite(m) & torch.isfinite(t)
            if bool(bad.any()):
                return Verdict(False, f"{name} has NaN/Inf where the reference is finite "
                                      f"({int(bad.sum())} elements)", errs)
            finite = torch.isfinite(t)
            rel, peak = errors(torch.where(finite, m, 0), torch.where(finite, t, 0))
            own_rel, own_peak = errors(torch.where(finite, own[name], 0), torch.where(finite, t, 0))
            errs[name] = rel
            rel_bound, peak_bound = max(tol.rel, 2 * own_rel), max(tol.peak, 2 * own_peak)
            if rel > rel_bound or peak > peak_bound:
                return Verdict(False, f"{name} off by {rel:.2e} rel / {peak:.2e} peak "
                                      f"(allowed {rel_bound:.1e} / {peak_bound:.1e}: {tol.why})", errs)
        return Verdict(True, "", errs)
