"""Attention outputs kept across an offloaded layer's recompute (``train.attention_stash``): the
reference kernels against autograd, record/replay, the offload path end to end, the planner."""

from __future__ import annotations

import random

import pytest
import torch

from slipstream.train import attention_stash
from slipstream.train.attention_stash import Slot, attend, recording, replaying
from slipstream.train.memory import ModelShape, plan
from slipstream.train.offload import apply_checkpointing, checkpoint_layers
from tests.train.conftest import load_tiny
from tests.train.test_gradients import assert_grads_close, lora_grads, perturb_lora_b


def _eager(q, k, v, causal: bool, scale: float | None) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ kk.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        n = q.shape[2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ vv


def _qkv(gen: torch.Generator, b=2, hq=4, hk=2, s=7, d=8, dtype=torch.float64):
    return [torch.randn(b, h, s, d, generator=gen, dtype=dtype).requires_grad_() for h in (hq, hk, hk)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (4, 1)], ids=["gqa", "mha", "mqa"])
def test_record_then_replay_equals_attention_and_its_gradients(causal, scale, heads):
    """The output kept by the forward, and the gradients the replay's backward computes from
    (dout, q, k, v, out, lse), equal plain attention's and autograd's (fp64: to 1e-10)."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    q, k, v = _qkv(gen, hq=heads[0], hk=heads[1], s=9 if causal else 1)
    dout = torch.randn(q.shape, generator=gen, dtype=q.dtype)
    expected = _eager(q, k, v, causal, scale)
    grads = torch.autograd.grad(expected, (q, k, v), dout)
    slot = Slot()
    with torch.no_grad(), recording(slot):
        first = attend(q, k, v, causal, scale)
    assert first is not None and len(slot.entries) == 1
    torch.testing.assert_close(first, expected.detach(), rtol=1e-10, atol=1e-12)
    with replaying(slot):
        again = attend(q, k, v, causal, scale)
    assert again.data_ptr() == first.data_ptr() and not slot.entries  # the kept tensor, taken out
    got = torch.autograd.grad(again, (q, k, v), dout)
    for g, e in zip(got, grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_attend_declines_what_it_does_not_handle():
    gen = torch.Generator().manual_seed(0)
    q, k, v = _qkv(gen)
    attention_stash.stats.reset()
    assert attend(q, k, v, True, None) is None  # no slot: the caller's attention runs
    slot = Slot()
    with recording(slot):  # autograd on: this is not a checkpointed layer's no-grad forward
        assert attend(q, k, v, True, None) is None
    with replaying(Slot()):
        assert attend(q, k, v, True, None) is None  # nothing kept
    assert attention_stash.stats.refused == {"autograd on: not a checkpointed forward": 1,
                                             "nothing kept for this call": 1}
    with torch.no_grad(), recording(slot):
        attend(q, k, v, True, None)
    with replaying(slot), pytest.raises(RuntimeError, match="does not match the kept output"):
        attend(q[:, :, :3], k[:, :, :3], v[:, :, :3], True, None)


def _unpacked_batch(gen: torch.Generator) -> dict:
    ids = torch.randint(10, 3000, (2, 40), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


def test_offload_with_kept_attention_gives_the_same_gradients(tiny_dir):
    """Offloaded checkpointing where the first layer keeps its attention output (its recompute runs
    no attention forward) against offloading without: same LoRA gradients; counters and slots say
    what happened."""
    model, _ = load_tiny(tiny_dir, accelerate=True)
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    perturb_lora_b(model, gen)
    batch = _unpacked_batch(gen)
    model.train()

    def grads() -> dict:
        model.zero_grad()
        model(**batch, use_cache=False).loss.backward()
        return lora_grads(model)

    apply_checkpointing(model, "offload", force_offload=True, verbose=False)
    grads()  # warm-up: first-call dispatch decisions
    reference = grads()
    layers = checkpoint_layers(model)
    assert len(layers) >= 2
    apply_checkpointing(model, "offload", force_offload=True, verbose=False, stash_layers=1)
    func = layers[0]._gradient_checkpointing_func
    assert func.stash_layers == 1
    attention_stash.stats.reset()
    got = grads()
    assert attention_stash.stats.recorded == 1 and attention_stash.stats.replayed == 1
    assert not any(s.entries for s in func._slots)  # nothing is kept after the step's backward
    # the kept layer's attention ran the reference kernel (fp32 math) instead of the dispatched one
    assert_grads_close(got, reference, rtol=1e-4, atol=1e-6)


def _shape() -> ModelShape:
    return ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)


def test_planner_keeps_attention_in_spare_memory_for_long_offloaded_sequences():
    args = dict(batch=1, seq=262144, dtype_bytes=2, free_bytes=int(73.5 * 2**30), trainable_params=42_000_000,
                fused_loss=True, gated_op=True, lean_elements=2 * 4096 + 14336, host_free_bytes=120 * 2**30)
    long = plan(_shape(), device_type="cuda", graphs=False, **args)
    per = attention_stash.kept_bytes_per_layer(262144, 32, 128, 2)
    assert long.choice == "offload" and long.stash_layers > 0
    assert long.need_bytes["offload"] + long.stash_layers * per <= long.budget_bytes
    assert long.need_bytes["offload"] + (long.stash_layers + 1) * per > long.budget_bytes  # as many as fit
    assert "attention outputs kept" in long.describe()
    assert plan(_shape(), device_type="cpu", graphs=False, **args).stash_layers == 0
    short = plan(_shape(), device_type="cuda", graphs=True, **{**args, "seq": 2048, "free_bytes": 8 * 2**30})
    assert short.stash_layers == 0  # graphed layers never keep anything
