"""``lora_linear_group``: its reference is per-projection ``lora_linear``, and what the dispatcher runs
for it (on this machine: the backends' Triton entry under the interpreter, or the reference) matches
that reference on outputs and on every gradient, slot by slot.

Tolerances: fp32 ``1e-5`` norm-wise (``assert_tight``, the fp32 elementwise bound of the specs: the
fused path differs from per-projection calls only in summation order: one ``x @ cat(A).T`` GEMM
instead of three, ``dX`` accumulated in place); bf16 and NF4 through the dispatcher's own oracle
(float64 truth, the op's matmul tolerance).
"""

from __future__ import annotations

import pytest
import torch

import slipstream.ops as ops
from slipstream.dispatch import call, dispatcher
from slipstream.dispatch.verify import Oracle
from slipstream.ops.lora_linear_group import SLOTS, SPEC, flat_args, projections
from slipstream.quant import QuantizedWeight, quantize_nf4
from tests.helpers import assert_matches_reference, with_grad
from tests.ops._compare import assert_tight

CPU = torch.device("cpu")
single = ops.spec("lora_linear").reference


def flat(*args):
    return call(SPEC, args)


def case(rows, k, outs, ranks, *, dtype=torch.float32, adapter=None, nf4=(), bias=(), dense_grad=()):
    """Flat args: x (rows, k) and one projection per entry of ``outs``; all differentiable tensors need grad."""
    x = torch.randn(rows if isinstance(rows, tuple) else (rows, k)).to(dtype)
    ws, a_s, b_s, biases = [], [], [], []
    for i, (n, r) in enumerate(zip(outs, ranks, strict=True)):
        w = (torch.randn(n, k) * k ** -0.5).to(dtype)
        if i in nf4:
            q = quantize_nf4(w)
            w = QuantizedWeight(**{**q.__dict__, "dtype": dtype})
        ws.append(w)
        a_s.append((torch.randn(r, k) * k ** -0.5).to(adapter or dtype))
        b_s.append((torch.randn(n, r) * r ** -0.5).to(adapter or dtype))
        biases.append((torch.randn(n) * 0.1).to(dtype) if i in bias else None)
    args = with_grad(SPEC, flat_args(x, ws, a_s, b_s, [2.0, 0.5, 1.0][:len(outs)], biases))
    # dense base weights are frozen in LoRA training; only those named in dense_grad keep requires_grad
    return tuple(a.detach() if SPEC.parameters[i].startswith("weight") and isinstance(a, torch.Tensor)
                 and int(SPEC.parameters[i][-1]) not in dense_grad else a for i, a in enumerate(args))


CASES = {
    "q/k/v": dict(rows=(2, 5, 32), k=32, outs=(32, 16, 16), ranks=(4, 4, 4)),
    "gate/up": dict(rows=7, k=24, outs=(40, 40), ranks=(2, 2)),
    "1 row": dict(rows=1, k=16, outs=(16, 8, 8), ranks=(2, 3, 1)),
    "odd + bias (Qwen2 q/k/v)": dict(rows=13, k=40, outs=(27, 9, 9), ranks=(3, 5, 1), bias=(0, 1, 2)),
    "nf4 bases": dict(rows=6, k=64, outs=(32, 16, 16), ranks=(4, 4, 4), nf4=(0, 1, 2), bias=(1,)),
    "dense dW": dict(rows=5, k=32, outs=(24, 8), ranks=(4, 2), dense_grad=(1,)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_is_lora_linear_per_projection(name):
    args = case(**CASES[name])
    outs = SPEC.reference(*args)
    assert len(outs) == len(CASES[name]["outs"])
    for out, p in zip(outs, projections(args), strict=True):
        assert torch.equal(out, single(args[0], *p))


@pytest.mark.parametrize("name", list(CASES))
def test_dispatched_fp32_matches_the_reference_tightly(name):
    args = case(**CASES[name])
    errs = assert_tight(flat, SPEC.reference, args, rel=1e-5, arg_names=SPEC.parameters)
    expected = {f"out{i}" for i in range(len(CASES[name]["outs"]))} | {"grad_x"}
    assert expected <= set(errs)
    assert {f"grad_lora_a{i}" for i in range(len(CASES[name]["outs"]))} <= set(errs)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dispatched_low_precision_passes_the_oracle(name, dtype):
    assert_matches_reference(SPEC, flat, case(**CASES[name], dtype=dtype))


def test_fp32_adapters_under_bf16_x():
    """peft's default under a bf16 base: adapters (and their gradients) stay fp32, outputs are bf16."""
    args = case(rows=9, k=32, outs=(24, 8, 8), ranks=(4, 4, 4), dtype=torch.bfloat16, adapter=torch.float32,
                bias=(0,))
    assert_matches_reference(SPEC, flat, args)
    outs = flat(*args)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    sum(o.float().sum() for o in outs).backward()
    assert all(args[3 + 5 * i].grad.dtype == torch.float32 for i in range(SLOTS))


def test_oracle_judges_each_output_and_slot_gradient():
    """Multi-output verification: a candidate wrong in only the third output, or only the third slot's
    adapter gradient, is rejected and the report names it."""
    args = case(rows=6, k=16, outs=(16, 8, 8), ranks=(2, 2, 2))
    oracle = Oracle(SPEC, args)
    assert oracle.judge(SPEC.reference).ok

    def wrong_out2(*a):
        q, k, v = SPEC.reference(*a)
        return q, k, v * 1.01

    def wrong_grad_a2(*a):
        lora_a2 = a[12]
        shifted = list(a)
        shifted[12] = lora_a2 + (lora_a2 - lora_a2.detach()) * 0.05  # same value, 1.05x its gradient
        return SPEC.reference(*shifted)

    verdict = oracle.judge(wrong_out2)
    assert not verdict.ok and verdict.reason.startswith("out2 off by")
    verdict = oracle.judge(wrong_grad_a2)
    assert not verdict.ok and verdict.reason.startswith("grad_lora_a2 off by")


def test_dispatch_key_tells_groups_apart():
    pair, triple = case(**CASES["gate/up"]), case(**CASES["q/k/v"])
    nf4 = case(**CASES["nf4 bases"])
    keys = {SPEC.check(a) for a in (pair, triple, nf4)}
    assert len(keys) == 3
    assert SPEC.check(triple) == SPEC.check(case(**CASES["q/k/v"]))  # same signature, same decision


def test_public_function_and_decision_trace():
    x = torch.randn(4, 16, requires_grad=True)
    ws = [torch.randn(16, 16), torch.randn(8, 16)]
    a_s = [torch.randn(2, 16, requires_grad=True) for _ in ws]
    b_s = [torch.randn(16, 2, requires_grad=True), torch.randn(8, 2, requires_grad=True)]
    q, k = ops.lora_linear_group(x, ws, a_s, b_s, [1.0, 2.0])
    torch.testing.assert_close(q, single(x, ws[0], a_s[0], b_s[0], 1.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, single(x, ws[1], a_s[1], b_s[1], 2.0), rtol=1e-5, atol=1e-5)
    decision = dispatcher().decisions("lora_linear_group")[-1]
    assert "weight1=8x16:float32" in decision.shapes and "weight2" not in decision.shapes


def test_tuner_verifies_and_times_a_multi_output_op():
    """Tuning on: every candidate is verified on both outputs and all slot gradients, then timed."""
    from slipstream.dispatch import set_tuning

    set_tuning(True)
    try:
        args = case(**CASES["gate/up"])
        outs = flat(*args)
        decision = dispatcher().decisions("lora_linear_group")[-1]
    finally:
        set_tuning(None)
    assert len(outs) == 2 and decision.mode == "tuned"
    timed = [c for c in decision.candidates if c.time_ms is not None]
    assert timed and all(c.status in ("chosen", "accepted") for c in timed)
    assert any(c.status == "chosen" for c in decision.candidates)
