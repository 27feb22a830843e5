"""Helpers shared by tests: judge an implementation against its op's reference."""

from __future__ import annotations

from collections.abc import Callable

import torch

from slipstream.dispatch.verify import Oracle, Verdict
from slipstream.ops import OpSpec


def with_grad(spec: OpSpec, args: tuple) -> tuple:
    """``args`` with every differentiable floating-point tensor set to require grad."""
    out = []
    for name, a in zip(spec.parameters, args, strict=False):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and name in spec.differentiable:
            a = a.detach().clone().requires_grad_(True)
        out.append(a)
    return tuple(out)


def judge(spec: OpSpec, fn: Callable, args: tuple, *, grads: bool = True) -> Verdict:
    """Compare ``fn`` with the reference (fp64 truth, per-dtype tolerance), forward and backward."""
    return Oracle(spec, with_grad(spec, args) if grads else args).judge(fn)


def assert_matches_reference(spec: OpSpec, fn: Callable, args: tuple, *, grads: bool = True) -> None:
    verdict = judge(spec, fn, args, grads=grads)
    assert verdict.ok, f"{spec.name}: {verdict.reason} (errors {verdict.errors})"
