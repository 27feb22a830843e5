"""Comparing an op's reference with the module transformers / peft actually run.

Two judgements, forward and every gradient:

* **fp32, tight** (:func:`assert_tight`): the reference and HF evaluate the same formula in fp32
  and differ at most in the association order of a few roundings and in summation order of
  reductions / small matmuls. Each rounding costs <= 2^-24 (6e-8) relative, so the norm-wise
  relative difference stays a few 1e-7; ``1e-6`` leaves headroom without hiding a real
  semantic difference (a wrong eps, a missing offset, a wrong mask entry is >= 1e-4).
* **low precision vs fp64 truth** (:func:`assert_no_worse`): both are run in bf16/fp16 on the
  same (rounded) inputs, and both are compared with an fp64 evaluation of HF's module on those
  inputs upcast. The reference must be at least as close to the truth as HF's own module
  (10% slack for noise), or within ``1e-2`` relative (about 2.5 bf16 ulps), whichever is looser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def rel_err(got: torch.Tensor, truth: torch.Tensor) -> float:
    """Norm-wise relative error ``||got - truth|| / ||truth||`` in fp64 (absolute when truth is 0)."""
    g, t = got.detach().double(), truth.detach().double()
    assert g.shape == t.shape, f"shape {tuple(g.shape)} != {tuple(t.shape)}"
    if t.numel() == 0:
        return 0.0
    scale = t.norm().item()
    diff = (g - t).norm().item()
    return diff / scale if scale > 0 else diff


def as_tuple(out: object) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def leaves(args: Sequence, dtype: torch.dtype | None = None) -> tuple:
    """Fresh leaf copies of the floating-point tensors (optionally cast), keeping requires_grad."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            b = a.detach().to(dtype) if dtype is not None else a.detach().clone()
            out.append(b.requires_grad_(a.requires_grad))
        else:
            out.append(a)
    return tuple(out)


def grad_outputs_for(fn: Callable, args: Sequence, round_to: torch.dtype) -> list[torch.Tensor]:
    """Random output gradients, rounded to ``round_to`` so every run backpropagates the same values."""
    outs = as_tuple(fn(*leaves(args)))
    return [torch.randn(o.shape, dtype=torch.float32).to(round_to).float() for o in outs]


def forward_backward(fn: Callable, args: Sequence, grad_outs: Sequence[torch.Tensor] | None):
    """``(outputs, grads)``: ``fn(*args)`` on fresh leaves, gradients of every arg requiring grad."""
    args = leaves(args)
    outs = as_tuple(fn(*args))
    targets = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads: list[torch.Tensor] = []
    if targets and grad_outs is not None:
        pairs = [(o, g) for o, g in zip(outs, grad_outs, strict=True) if o.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], targets, [g.to(o.dtype) for o, g in pairs],
                                  allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, got, strict=True)]
    return [o.detach() for o in outs], [g.detach() for g in grads]


def _names(n_out: int, args: Sequence, arg_names: Sequence[str] | None) -> list[str]:
    names = [f"out{i}" for i in range(n_out)]
    grad_args = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    names += [f"grad_{arg_names[i]}" if arg_names else f"grad{i}" for i in grad_args]
    return names


def assert_tight(ours: Callable, theirs: Callable, args: Sequence, *, rel: float = 1e-6,
                 arg_names: Sequence[str] | None = None) -> dict[str, float]:
    """fp32: outputs and gradients of ``ours`` within ``rel`` (norm-wise) of ``theirs``."""
    gouts = grad_outputs_for(theirs, args, torch.float32)
    o1, g1 = forward_backward(ours, args, gouts)
    o2, g2 = forward_backward(theirs, args, gouts)
    assert len(o1) == len(o2) and len(g1) == len(g2)
    names = _names(len(o1), args, arg_names)
    errs = {}
    for name, a, b in zip(names, o1 + g1, o2 + g2, strict=True):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        errs[name] = rel_err(a, b)
    bad = {k: v for k, v in errs.items() if not v <= rel}
    assert not bad, f"differs from HF beyond {rel:g} (norm-wise relative): {bad}"
    return errs


def assert_no_worse(ours: Callable, theirs: Callable, truth: Callable, args: Sequence, *,
                    floor: float = 1e-2, slack: float = 1.1, arg_names: Sequence[str] | None = None,
                    truth_dtype: torch.dtype = torch.float64) -> dict[str, tuple[float, float]]:
    """Low precision: ``ours`` at least as close to ``truth`` (fp64) as ``theirs``, or within ``floor``.

    ``args`` hold the low-precision inputs; ``truth`` is called on them upcast to fp64 (callers make
    ``truth`` evaluate HF's module in fp64). Returns ``{name: (our error, HF's error)}``.
    """
    low = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    gouts = grad_outputs_for(theirs, args, low)
    o_ours, g_ours = forward_backward(ours, args, gouts)
    o_hf, g_hf = forward_backward(theirs, args, gouts)
    o_t, g_t = forward_backward(truth, leaves(args, truth_dtype), [g.to(truth_dtype) for g in gouts])
    names = _names(len(o_t), args, arg_names)
    errs = {}
    for name, a, b, t in zip(names, o_ours + g_ours, o_hf + g_hf, o_t + g_t, strict=True):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        errs[name] = (rel_err(a, t), rel_err(b, t))
    bad = {k: v for k, v in errs.items() if not (v[0] <= slack * v[1] + 1e-12 or v[0] <= floor)}
    assert not bad, f"(ours, HF) error vs fp64: reference is worse than HF and than {floor:g}: {bad}"
    return errs
