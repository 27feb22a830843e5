"""accelerate / deaccelerate lifecycle: re-applying, deep copies, gradient checkpointing, bf16, the report."""

from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch

from slipstream.models import AccelerationReport, accelerate, deaccelerate, report_of
from tests.models.tiny import FWD_TOL, GRAD_TOL, build, ids, rel, with_lora


def lora_grads(model):
    return {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n
    }


def test_reaccelerate_and_deepcopy_are_clean():
    model = build("qwen3")
    modeling = sys.modules[type(model).__module__]
    before = modeling.apply_rotary_pos_emb
    first = accelerate(model)
    second = accelerate(model)  # re-applies from scratch: no wrapper around a wrapper
    assert first.counts() == second.counts()
    twin = copy.deepcopy(model)
    assert report_of(twin).counts() == second.counts()
    x = ids(1, 9, seed=12)
    with torch.no_grad():
        assert torch.equal(
            twin(input_ids=x, use_cache=False).logits, model(input_ids=x, use_cache=False).logits
        )
    assert deaccelerate(model)
    import slipstream.ops as ops

    calls = []
    real = ops.rope
    ops.rope = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.no_grad():  # the copy holds its own reference on the rotary swap: still ops.rope
            twin(input_ids=x, use_cache=False)
            model(input_ids=x, use_cache=False)  # de-accelerated: transformers' own function
    finally:
        ops.rope = real
    assert len(calls) == 2  # twin's two layers only
    assert deaccelerate(twin)
    original = getattr(before, "__slipstream_original__", before)
    assert (
        getattr(modeling.apply_rotary_pos_emb, "__slipstream_original__", modeling.apply_rotary_pos_emb)
        is original
    )


def test_report_is_frozen_and_readable():
    report = accelerate(build("phi3"))
    assert isinstance(report, AccelerationReport)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.adapter = "x"
    text = str(report)
    assert text.splitlines()[0] == "slipstream: Phi3ForCausalLM (adapter: phi3)"
    assert "accelerated: 5 rms_norm, 2 attention, 2 rope, 2 swiglu, 1 linear_cross_entropy" in text
    assert (
        "fused gate_up_proj split in half" in {m.detail for m in report.accelerated if m.op == "swiglu"}.pop()
    )


def test_gradient_checkpointing_gives_the_same_lora_grads():
    slow = with_lora(build("gemma3"))
    fast = copy.deepcopy(slow)
    accelerate(fast)
    for m in (slow, fast):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = ids(2, 12, seed=13)
    slow(input_ids=x, labels=x, use_cache=False).loss.backward()
    fast(input_ids=x, labels=x, use_cache=False).loss.backward()
    g_ref, g_got = lora_grads(slow), lora_grads(fast)
    assert g_ref and g_ref.keys() == g_got.keys()
    assert max(rel(g_got[n], g_ref[n]) for n in g_ref) < GRAD_TOL


def test_bf16_model_runs_close():
    slow = with_lora(build("llama")).to(torch.bfloat16)
    fast = copy.deepcopy(slow)
    accelerate(fast)
    x = ids(2, 12, seed=14)
    ref = slow(input_ids=x, labels=x, use_cache=False).loss
    got = fast(input_ids=x, labels=x, use_cache=False).loss
    assert got.dtype == torch.float32 and rel(got, ref) < 2e-2  # bf16 rounding (2^-8) through 2 layers
    with torch.no_grad():
        assert (
            rel(fast(input_ids=x, use_cache=False).logits, slow(input_ids=x, use_cache=False).logits) < 3e-2
        )
    assert FWD_TOL < 2e-2


def test_user_subclass_of_a_known_family_is_mapped():
    from transformers import LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):  # defined outside transformers: the decoder still tells the family
        pass

    base = build("llama")
    mine = MyLlama(base.config)
    mine.load_state_dict(base.state_dict())
    report = accelerate(mine)
    assert report.counts()["attention"] == 2 and report.counts()["rope"] == 2
    x = ids(1, 10, seed=15)
    with torch.no_grad():
        assert (
            rel(mine(input_ids=x, use_cache=False).logits, base(input_ids=x, use_cache=False).logits)
            < FWD_TOL
        )
