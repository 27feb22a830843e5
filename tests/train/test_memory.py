"""The memory planner: pure decisions from shape, batch, dtype and free memory."""

from __future__ import annotations

import pytest

from slipstream.train.memory import GIB, RESERVE_DEFAULT, ModelShape, layer_activation_bytes, plan

LLAMA_8B = ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)
TINY = ModelShape(layers=4, hidden=256, intermediate=688, heads=4, kv_heads=2, head_dim=64, vocab=3072)


def test_layer_formula_by_hand():
    # T = 2 * 8 = 16 tokens, bf16: 16 * 2 * (4*256 + 2*256 + 2*128 + 4*688 + 7*16) + 16 * 4 * (2 + 4)
    assert layer_activation_bytes(TINY, 2, 8, 2, lora_r=16) == 16 * 2 * (1024 + 512 + 256 + 2752 + 112) + 16 * 4 * 6
    eager = ModelShape(**{**TINY.__dict__, "attn_implementation": "eager"})
    assert layer_activation_bytes(eager, 2, 8, 2) - layer_activation_bytes(TINY, 2, 8, 2) == 2 * 4 * 8 * 8 * 2 * 2


def test_small_run_keeps_everything():
    p = plan(TINY, batch=8, seq=256, dtype_bytes=4, free_bytes=8 * GIB, device_type="cpu")
    assert p.choice == "none" and p.checkpointing is False
    assert p.describe().startswith("gradient checkpointing: none because all activations fit")


def test_8b_checkpoints_when_activations_do_not_fit():
    # 2 x 2048 tokens, bf16: ~0.69 GB per layer x 32 + 5.3 GB logits ~ 28 GB without checkpointing
    roomy = plan(LLAMA_8B, batch=2, seq=2048, dtype_bytes=2, free_bytes=60 * GIB, trainable_params=42_000_000)
    assert roomy.choice == "none"
    p = plan(LLAMA_8B, batch=2, seq=2048, dtype_bytes=2, free_bytes=int(8.8 * GIB), host_free_bytes=200 * GIB,
             trainable_params=42_000_000)
    assert p.need_bytes["none"] > p.need_bytes["checkpoint"] > p.need_bytes["offload"]
    # keeping one layer's activations costs no more than the recompute buffer full checkpointing needs
    assert p.need_bytes["partial"] <= p.need_bytes["checkpoint"]
    assert p.choice == "partial" and p.checkpointing is True and p.checkpointed_layers == 31
    tight = plan(LLAMA_8B, batch=2, seq=2048, dtype_bytes=2, free_bytes=int(7.7 * GIB), host_free_bytes=200 * GIB,
                 trainable_params=42_000_000)
    assert tight.choice == "offload" and tight.checkpointed_layers == 32 and "checkpoint would need" in tight.reason


def test_partial_checkpoints_the_fewest_layers_that_fit():
    # 2 x 2048 bf16, loss fused: per layer 4096*2*(4*4096 + 2*4096 + 2*1024 + 4*14336 + 112) + 4096*4*34 bytes
    per_layer = 4096 * 2 * (16384 + 8192 + 2048 + 57344 + 112) + 4096 * 4 * 34
    layer_input = 4096 * 4096 * 2
    fixed = 42_000_000 * 12 + RESERVE_DEFAULT
    p = plan(LLAMA_8B, batch=2, seq=2048, dtype_bytes=2, free_bytes=16 * GIB, trainable_params=42_000_000,
             fused_loss=True)
    k = p.checkpointed_layers
    assert p.choice == "partial" and p.checkpointing is True and 0 < k < 32
    need = lambda k: (32 - k) * per_layer + k * layer_input + fixed  # noqa: E731
    assert need(k) <= p.budget_bytes < need(k - 1)  # the fewest: one layer fewer would not fit
    assert p.need_bytes["partial"] == need(k)
    assert f"partial ({k} of 32 layers checkpointed)" in p.describe()
    roomier = plan(LLAMA_8B, batch=2, seq=2048, dtype_bytes=2, free_bytes=20 * GIB, trainable_params=42_000_000,
                   fused_loss=True)
    assert roomier.choice == "partial" and roomier.checkpointed_layers < k


def test_8b_long_context_offloads():
    # 32k tokens: layer inputs 8.6 GB + one layer 5.5 GB (13.9 GiB) do not fit 14 GiB * 0.9; offloaded they do
    p = plan(LLAMA_8B, batch=1, seq=32768, dtype_bytes=2, free_bytes=14 * GIB, host_free_bytes=500 * GIB,
             fused_loss=True)
    assert p.choice == "offload" and p.checkpointing == "offload"
    assert p.host_need_bytes == 32 * 32768 * 4096 * 2


def test_offload_needs_host_memory():
    p = plan(LLAMA_8B, batch=1, seq=32768, dtype_bytes=2, free_bytes=14 * GIB, host_free_bytes=1 * GIB,
             fused_loss=True)
    assert p.choice == "checkpoint" and p.reason.startswith("nothing fits")


def test_cpu_never_offloads():
    p = plan(LLAMA_8B, batch=8, seq=8192, dtype_bytes=2, free_bytes=14 * GIB, device_type="cpu")
    assert p.choice == "checkpoint" and "offloading does not apply on the CPU" in p.reason


@pytest.mark.parametrize("free_gib", [1, 4, 16, 64, 256])
def test_monotone_in_free_memory(free_gib):
    order = ["none", "lean", "partial", "checkpoint", "offload"]
    small = plan(LLAMA_8B, batch=1, seq=4096, dtype_bytes=2, free_bytes=free_gib * GIB)
    large = plan(LLAMA_8B, batch=1, seq=4096, dtype_bytes=2, free_bytes=2 * free_gib * GIB)
    assert order.index(large.choice) <= order.index(small.choice)
    if order.index(large.choice) == order.index(small.choice) and small.choice != "offload":
        assert large.checkpointed_layers <= small.checkpointed_layers


def test_fused_loss_drops_logits():
    a = plan(LLAMA_8B, batch=1, seq=4096, dtype_bytes=2, free_bytes=80 * GIB)
    b = plan(LLAMA_8B, batch=1, seq=4096, dtype_bytes=2, free_bytes=80 * GIB, fused_loss=True)
    assert a.extra["logits_bytes"] == 4096 * 128256 * 10 and b.extra["logits_bytes"] == 0


LEAN_8B = 2 * 4096 + 14336  # two RMSNorm outputs and act(gate) * up per token, recomputed under "lean"


def test_lean_takes_off_the_recomputed_elements():
    full = layer_activation_bytes(LLAMA_8B, 2, 2048, 2, gated_op=True)
    lean = layer_activation_bytes(LLAMA_8B, 2, 2048, 2, gated_op=True, lean_elements=LEAN_8B)
    assert full - lean == 4096 * 2 * LEAN_8B
    # slipstream's gated op saves gate and up only: one intermediate-sized tensor less than eager
    assert layer_activation_bytes(LLAMA_8B, 2, 2048, 2) - full == 4096 * 2 * 14336


def test_lean_sits_between_none_and_partial():
    kwargs = dict(batch=2, seq=2048, dtype_bytes=2, trainable_params=42_000_000, fused_loss=True, gated_op=True,
                  lean_elements=LEAN_8B)
    roomy = plan(LLAMA_8B, free_bytes=40 * GIB, **kwargs)
    assert roomy.choice == "none" and not roomy.lean  # lean costs a little time: not chosen when all fits
    need = roomy.need_bytes
    assert need["none"] > need["lean"] > need["partial"] > need["checkpoint"]
    between = plan(LLAMA_8B, free_bytes=int((need["lean"] + need["none"]) / 2 / 0.9), **kwargs)
    assert between.choice == "lean" and between.checkpointing == "lean" and between.checkpointed_layers == 0
    assert "recomputing the cheap elementwise outputs" in between.reason


def test_lean_partial_checkpoints_fewer_layers():
    # W8B under a 23.4 GiB cap leaves about 7.4 GiB usable after the weights
    kwargs = dict(batch=2, seq=2048, dtype_bytes=2, free_bytes=int(7.4 * GIB), trainable_params=42_000_000,
                  fused_loss=True, gated_op=True)
    plain = plan(LLAMA_8B, **kwargs)
    lean = plan(LLAMA_8B, lean_elements=LEAN_8B, **kwargs)
    assert plain.choice == lean.choice == "partial" and lean.lean and not plain.lean
    assert lean.checkpointed_layers < plain.checkpointed_layers
    kept = lean.extra["lean_layer_bytes"]
    k = lean.checkpointed_layers
    assert lean.need_bytes["partial"] == (32 - k) * kept + k * 4096 * 4096 * 2 + lean.extra["fixed_bytes"]
    assert "the others lean" in lean.describe()


def test_long_context_counts_one_layers_transients_and_the_recompute_buffer():
    # 131k tokens, batch 1, with the free memory an NF4 8B left on the H100: the planner once chose
    # partial(29) there, "needing" 64.9 of 65.6 usable GiB, and the step ran out of memory in forward
    kwargs = dict(batch=1, seq=131072, dtype_bytes=2, free_bytes=int(72.9 * GIB), host_free_bytes=120 * GIB,
                  trainable_params=42_000_000, fused_loss=True, gated_op=True, lean_elements=LEAN_8B)
    p = plan(LLAMA_8B, **kwargs)
    t, workspace = 131072, p.extra["workspace_bytes"]
    assert workspace == t * 2 * (3 * 14336 + 2 * 4096 + 4096 + 2 * 1024)  # ~14 GiB of gradients in flight
    assert p.extra["fixed_bytes"] >= workspace
    full_layer = p.per_layer_bytes
    if p.choice == "partial":  # a checkpointed layer's (not lean) recompute must fit beside the stored inputs
        k = p.checkpointed_layers
        assert p.need_bytes["partial"] >= k * t * 4096 * 2 + full_layer + workspace
        assert k >= 30
    assert p.need_bytes[p.choice] <= p.budget_bytes
    # at 2 x 2048 the transients stay under the fixed reserve: the W8B plans are unchanged
    short = plan(LLAMA_8B, **{**kwargs, "batch": 2, "seq": 2048})
    assert short.extra["workspace_bytes"] < RESERVE_DEFAULT <= short.extra["fixed_bytes"] - 42_000_000 * 12
