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


_AOT_DRIVER = """
import json
from triton.backends.compiler import GPUTarget
from slipstream.kernels._aot import compile_unit
{setup}
seen, results = set(), []
for unit in units:
    key = (unit.name, repr(sorted(unit.constexprs.items())), repr(sorted(unit.options.items())))
    if key not in seen:
        seen.add(key)
        r = compile_unit(unit, GPUTarget("cuda", 90, 32))
        results.append([unit.name, r.ok, r.error])
print(json.dumps(results))
"""


def aot_compile_sm90(setup: str) -> list[list]:
    """Compile for sm_90 the distinct ``AotUnit`` s that ``setup`` (Python source) leaves in ``units``.

    Runs in a fresh process: under ``TRITON_INTERPRET=1`` the kernels are interpreter objects, which
    cannot be compiled ahead of time. Returns ``[name, ok, error]`` per distinct unit and checks that
    every one compiled. (The full kernel x config x target matrix is ``ci/compile_matrix.py``'s job.)
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _AOT_DRIVER.format(setup=setup)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results, "no units to compile"
    failed = [(name, error) for name, ok, error in results if not ok]
    assert not failed, failed
    return results
