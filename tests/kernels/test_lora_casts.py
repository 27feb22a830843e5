"""Adapter casts reused within a step (``kernels._casts``): never a stale value, bit-identical results."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels._casts import ADAPTER_CASTS, KEEP, PEEK, TAKE, AdapterCasts, forward_use
from slipstream.kernels.lora import CONFIGS, lora_linear, lora_linear_group


@pytest.fixture
def casts():
    yield ADAPTER_CASTS
    ADAPTER_CASTS.stop()
    ADAPTER_CASTS.enabled = True


def test_inactive_until_a_step_begins_then_reused_until_the_tensor_changes():
    c = AdapterCasts()
    a = torch.randn(4, 8, requires_grad=True)
    first = c.get(a, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and c.get(a, torch.bfloat16) is not first  # off: a fresh cast each time
    c.begin_step()
    first = c.get(a, torch.bfloat16)
    assert c.get(a, torch.bfloat16) is first and c.hits == 1
    assert c.get(a, torch.float32) is a  # no cast needed: the tensor itself
    with torch.no_grad():
        a.add_(1.0)  # what an optimizer step does: the version counter moves
    second = c.get(a, torch.bfloat16)
    assert second is not first and torch.equal(second, a.detach().to(torch.bfloat16))
    b = torch.randn(2, 8)
    joined = c.cat((a, b), torch.bfloat16)
    assert c.cat((a, b), torch.bfloat16) is joined and torch.equal(joined, torch.cat([a, b]).to(torch.bfloat16))
    assert c.cat((b, a), torch.bfloat16) is not joined  # order is part of the key
    a.data.mul_(2.0)  # .data writes move no version counter: only the next step's clear covers them
    c.begin_step()
    assert torch.equal(c.get(a, torch.bfloat16), a.detach().to(torch.bfloat16))


def test_a_cast_lives_from_a_keeping_forward_to_the_backward_that_takes_it():
    c = AdapterCasts()
    c.begin_step()
    a = torch.randn(4, 8, requires_grad=True)
    peeked = c.get(a, torch.bfloat16, PEEK)  # a no-grad forward: nothing stored
    assert len(c) == 0 and c.get(a, torch.bfloat16, PEEK) is not peeked
    kept = c.get(a, torch.bfloat16, KEEP)
    assert len(c) == 1 and c.get(a, torch.bfloat16, PEEK) is kept
    alias = a.detach()  # what a saved tensor may unpack as: another object over the same memory
    assert alias is not a and c.get(alias, torch.bfloat16, TAKE) is kept
    assert len(c) == 0  # taken: the backward was its last use
    assert torch.equal(c.get(a, torch.bfloat16, TAKE), a.detach().to(torch.bfloat16))
    view = a[1:]  # same data pointer family, other shape: never served the whole tensor's cast
    c.get(a, torch.bfloat16, KEEP)
    assert torch.equal(c.get(view, torch.bfloat16, TAKE), view.detach().to(torch.bfloat16))


def test_forward_use_keeps_only_what_autograd_will_record():
    a = torch.randn(4, 8, requires_grad=True)
    frozen = torch.randn(4, 8)
    assert forward_use(frozen, a) == KEEP and forward_use(frozen, None) == PEEK
    with torch.no_grad():
        assert forward_use(frozen, a) == PEEK


def test_a_dead_tensor_never_serves_a_new_one_at_the_same_address():
    c = AdapterCasts()
    c.begin_step()
    for _ in range(20):  # fresh tensors: same id / address reused by the allocator, different values
        t = torch.randn(16, 16)
        assert torch.equal(c.get(t, torch.bfloat16), t.to(torch.bfloat16))
        del t


def _run(x, weight, a, b, dy, config):
    x = x.detach().requires_grad_()
    out = lora_linear(x, weight, a, b, 2.0, config=config)
    return (out, *torch.autograd.grad(out, (x, a, b), dy))


@pytest.mark.parametrize("config", [CONFIGS[0], next(c for c in CONFIGS if c["base"] == "triton"),
                                    next(c for c in CONFIGS if c["base"] == "fused")],
                         ids=["cublas", "triton", "fused"])
def test_fp32_adapters_under_bf16_cast_once_per_step_and_give_the_same_results(casts, config):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    x = torch.randn(19, 32, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(24, 32, generator=gen) * 0.2).to(torch.bfloat16)
    a = (torch.randn(4, 32, generator=gen) * 0.1).requires_grad_()
    b = (torch.randn(24, 4, generator=gen) * 0.1).requires_grad_()
    dy = torch.randn(19, 24, generator=gen).to(torch.bfloat16)
    casts.enabled = False
    casts.begin_step()
    expected = _run(x, weight, a, b, dy, config)
    casts.enabled = True
    casts.begin_step()
    hits = casts.hits
    got = _run(x, weight, a, b, dy, config)
    assert casts.hits - hits >= 2  # the backward reused the forward's casts of A and B
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    with torch.no_grad():
        b.mul_(-1.0)  # an update inside the step: the cached cast must not be used
    flipped = lora_linear(x, weight, a, b, 2.0, config=config)
    casts.enabled = False
    torch.testing.assert_close(flipped, lora_linear(x, weight, a, b, 2.0, config=config), rtol=0, atol=0)


def test_group_caches_the_joined_down_projections(casts):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    x = torch.randn(7, 32, generator=gen).to(torch.bfloat16).requires_grad_()
    weights = [(torch.randn(n, 32, generator=gen) * 0.2).to(torch.bfloat16) for n in (32, 8, 8)]
    a_s = [(torch.randn(4, 32, generator=gen) * 0.1).requires_grad_() for _ in weights]
    b_s = [(torch.randn(w.shape[0], 4, generator=gen) * 0.1).requires_grad_() for w in weights]

    def step():
        outs = lora_linear_group(x, weights, a_s, b_s, [2.0] * 3)
        loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
        return (loss, *torch.autograd.grad(loss, (x, *a_s, *b_s)))

    casts.enabled = False
    casts.begin_step()
    expected = step()
    casts.enabled = True
    casts.begin_step()
    got = step()
    assert casts.hits >= 1
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
