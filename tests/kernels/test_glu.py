"""The Triton SwiGLU / GeGLU kernels against the ops' references (fp64 truth, per-dtype tolerance),
forward and backward, under Triton's CPU interpreter; plus ahead-of-time compilation for sm_90."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels import glu as kmod
from slipstream.ops.geglu import SPEC as GEGLU
from slipstream.ops.swiglu import SPEC as SWIGLU
from tests.helpers import aot_compile_sm90, assert_matches_reference

CPU = torch.device("cpu")
SPECS = {"swiglu": SWIGLU, "geglu": GEGLU}


def _fn(op: str, config: dict | None = None):
    if op == "swiglu":
        return lambda gate, up: kmod.swiglu(gate, up, config=config)
    return lambda gate, up, approximate: kmod.geglu(gate, up, approximate, config=config)


def _extra(op: str, approximate: str = "none") -> tuple:
    return () if op == "swiglu" else (approximate,)


def _cases() -> list[tuple[str, int]]:
    return [(op, i) for op, spec in SPECS.items()
            for i in range(len(spec.samples(CPU, torch.float32, "small")))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,index", _cases())
def test_spec_samples(op: str, index: int, dtype: torch.dtype) -> None:
    sample = SPECS[op].samples(CPU, dtype, "small")[index]
    assert_matches_reference(SPECS[op], _fn(op), sample.args)


@pytest.mark.parametrize("op", SPECS)
def test_float16_sample(op: str) -> None:
    sample = SPECS[op].samples(CPU, torch.float16, "small")[2]  # odd 9x1001
    assert_matches_reference(SPECS[op], _fn(op), sample.args)


@pytest.mark.parametrize("config", kmod.CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("op,approximate", [("swiglu", ""), ("geglu", "none"), ("geglu", "tanh")])
def test_every_config(op: str, approximate: str, config: dict) -> None:
    gate = torch.randn(3, 4100, dtype=torch.bfloat16) * 2  # ragged last column block
    up = torch.randn(3, 4100, dtype=torch.bfloat16)
    assert_matches_reference(SPECS[op], _fn(op, config), (gate, up, *_extra(op, approximate)))


@pytest.mark.parametrize("op", SPECS)
def test_fused_gate_up_views_and_strided_grad(op: str) -> None:
    """gate/up as the two halves of one fused projection (row stride 2I, read in place), a
    transposed (copied) operand, and a strided incoming gradient."""
    kernel = _fn(op)

    def fn(gate, up, *rest):
        i = gate.shape[-1]
        fused = torch.cat([gate, up], -1)
        y1 = kernel(fused[..., :i], fused[..., i:], *rest)
        y2 = kernel(gate.transpose(0, 1).contiguous().transpose(0, 1), up, *rest)
        y = (y1 + y2) * 0.5
        return torch.cat([y, y.detach()], -1)[..., :i]

    gate, up = torch.randn(2, 7, 33) * 2, torch.randn(2, 7, 33)
    assert_matches_reference(SPECS[op], fn, (gate, up, *_extra(op)))


@pytest.mark.parametrize("which", ["gate", "up"])
@pytest.mark.parametrize("op", SPECS)
def test_single_grad(op: str, which: str) -> None:
    gate = (torch.randn(5, 40) * 2).requires_grad_(which == "gate")
    up = torch.randn(5, 40).requires_grad_(which == "up")
    assert_matches_reference(SPECS[op], _fn(op), (gate, up, *_extra(op, "tanh")), grads=False)


def test_geglu_rejects_unknown_approximation() -> None:
    with pytest.raises(ValueError):
        kmod.geglu(torch.randn(2, 3), torch.randn(2, 3), "sigmoid")
    assert not kmod.accepts_geglu(torch.randn(2, 3), torch.randn(2, 3), "sigmoid")


def test_accepts() -> None:
    g = torch.randn(2, 8)
    assert kmod.accepts_swiglu(g, g) and kmod.accepts_geglu(g, g, "tanh")
    assert not kmod.accepts_swiglu(g.double(), g.double())
    assert not kmod.accepts_swiglu(g, g.half())
    assert not kmod.accepts_swiglu(g, torch.randn(2, 9))


def test_kernels_entry() -> None:
    assert [(k.op, k.name) for k in kmod.KERNELS] == [("swiglu", "swiglu"), ("geglu", "geglu")]
    assert all(2 <= len(k.configs) <= 5 for k in kmod.KERNELS)


def test_aot_compiles_for_sm90() -> None:
    """Every unit of the first config of both kernels compiles for sm_90."""
    results = aot_compile_sm90("from slipstream.kernels.glu import KERNELS\n"
                               "units = [u for k in KERNELS for u in k.aot(k.configs[0])]")
    assert len(results) == 6, results


def _projected(rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator):
    """gate and up as a layer makes them: outputs of an op (not leaves), contiguous, separate buffers."""
    x = torch.randn(rows, 8, generator=gen).to(dtype).requires_grad_()
    wg = (torch.randn(cols, 8, generator=gen) * 0.7).to(dtype)
    wu = (torch.randn(cols, 8, generator=gen) * 0.4).to(dtype)
    return x, x @ wg.T, x @ wu.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", SPECS)
def test_backward_writes_gradients_over_expiring_inputs(op: str, dtype: torch.dtype) -> None:
    """Under ``inputs_expire_in_backward`` d(gate), d(up) land in gate's and up's buffers: no new
    memory, and every gradient bit-identical to the normal call (the same kernel, other addresses)."""
    from slipstream.ops.hints import inputs_expire_in_backward

    seed = int(torch.randint(0, 2**31, (1,)))
    kernel = _fn(op)
    results = []
    for expire in (False, True):
        x, gate, up = _projected(9, 1001, dtype, torch.Generator().manual_seed(seed))
        seen = {}
        gate.register_hook(lambda g, seen=seen: seen.setdefault("dg", g))
        with inputs_expire_in_backward(expire):
            y = kernel(gate, up, *_extra(op, "tanh"))
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        y.backward(dy)
        assert (seen["dg"].data_ptr() == gate.data_ptr()) == expire
        results.append(x.grad)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_overwritten_inputs_fail_a_second_backward() -> None:
    from slipstream.ops.hints import inputs_expire_in_backward

    _, gate, up = _projected(4, 64, torch.float32, torch.Generator().manual_seed(0))
    with inputs_expire_in_backward():
        y = kmod.swiglu(gate, up)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("case", ["leaves", "fused halves", "no hint"])
def test_inputs_that_must_survive_are_never_overwritten(case: str) -> None:
    """Leaves (the caller's data), views of one fused buffer and calls outside the hint keep their values."""
    from contextlib import nullcontext

    from slipstream.ops.hints import inputs_expire_in_backward

    x, gate, up = _projected(6, 48, torch.float32, torch.Generator().manual_seed(1))
    if case == "leaves":
        gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    elif case == "fused halves":
        fused = torch.cat([gate, up], -1)
        gate, up = fused[:, :48], fused[:, 48:]
    before = (gate.detach().clone(), up.detach().clone())
    with nullcontext() if case == "no hint" else inputs_expire_in_backward():
        y = kmod.swiglu(gate, up)
    y.backward(torch.randn(y.shape))
    assert torch.equal(gate.detach(), before[0]) and torch.equal(up.detach(), before[1])
