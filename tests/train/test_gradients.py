"""Gradients: accumulation normalises over the whole batch; checkpointing policies change nothing."""

from __future__ import annotations

import random

import pytest
import torch

from slipstream.train.config import TrainConfig
from slipstream.train.data import IGNORE_INDEX
from slipstream.train.offload import OffloadedCheckpoint, apply_checkpointing, checkpoint_layers
from slipstream.train.packing import PackedCollator, pack
from slipstream.train.recompute import lean_forward
from slipstream.train.trainer import Trainer
from tests.train.conftest import load_tiny


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def fresh_rows(n_rows: int, seq: int, gen: torch.Generator, keep: float | None = None) -> list[dict]:
    """Packed rows of random tokens; ``keep``: fraction of labels trained (random per example if None)."""
    examples = []
    for _ in range(n_rows * 8):
        length = int(torch.randint(4, seq // 2, (1,), generator=gen))
        ids = torch.randint(10, 3000, (length,), generator=gen).tolist()
        p = float(torch.rand(1, generator=gen)) * 0.9 + 0.05 if keep is None else keep
        labels = [t if float(torch.rand(1, generator=gen)) < p else IGNORE_INDEX for t in ids]
        examples.append({"input_ids": ids, "labels": labels})
    return pack(examples, seq)[:n_rows]


def perturb_lora_b(model, gen: torch.Generator) -> None:
    """peft starts B at zero (so A gets no gradient); give B random values so every grad is tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def assert_grads_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys() and a
    assert all(float(t.norm()) > 0 for t in b.values())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_accumulation_2x2_equals_one_batch_of_4(tiny_dir):
    model, tok = load_tiny(tiny_dir, accelerate=True)
    trainer = Trainer(model, tok, [{"text": "x"}], TrainConfig(output_dir=str(tiny_dir / "o")), verbose=False)
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    perturb_lora_b(model, gen)
    # the two micro-batches train very different numbers of tokens, so mean-of-means is measurably wrong
    rows = fresh_rows(2, 64, gen, keep=0.15) + fresh_rows(2, 64, gen, keep=0.9)
    collate = PackedCollator(0)
    model.zero_grad()
    loss4, n4 = trainer.forward_backward([collate(rows)])
    g4 = lora_grads(model)
    model.zero_grad()
    loss22, n22 = trainer.forward_backward([collate(rows[:2]), collate(rows[2:])])
    g22 = lora_grads(model)
    assert n4 == n22
    # fp32 on both paths; only the order of the per-token sums differs (two partial sums vs one),
    # a few ulps (1.2e-7 relative each) over ~100 terms -> 1e-5 relative is a safe bound.
    torch.testing.assert_close(loss22, loss4, rtol=1e-5, atol=1e-6)
    assert_grads_close(g22, g4, rtol=1e-4, atol=1e-6)
    # The naive mean of micro-batch means gives measurably different gradients: the test can fail.
    model.zero_grad()
    for half in (rows[:2], rows[2:]):
        (model(**collate(half), use_cache=False).loss / 2).backward()
    naive = lora_grads(model)
    worst = max(float((naive[k] - g4[k]).norm() / g4[k].norm()) for k in g4)
    assert worst > 0.05


def tiny_with_batch(tiny_dir, dropout: float = 0.0):
    """A tiny LoRA model in training mode with random B, a fresh packed batch, and ``grads()``: one
    forward+backward from zeroed gradients (dropout masks seeded the same every time)."""
    model, _ = load_tiny(tiny_dir, accelerate=True, dropout=dropout)
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    batch = PackedCollator(0)(fresh_rows(2, 64, gen))
    perturb_lora_b(model, gen)
    model.train()

    def grads() -> dict:
        model.zero_grad()
        torch.manual_seed(1234)  # same dropout masks in every run (checkpointing replays the RNG)
        model(**batch, use_cache=False).loss.backward()
        return lora_grads(model)

    return model, batch, grads


@pytest.mark.parametrize("policy", [True, "offload", "partial", "partial_lean", "keep"])
def test_checkpointing_gives_the_same_gradients(tiny_dir, policy):
    model, _batch, grads = tiny_with_batch(tiny_dir, dropout=0.1)
    apply_checkpointing(model, False, verbose=False)
    grads()  # warm-up: the dispatcher's first-call decisions draw from the global RNG (dropout's too)
    reference = grads()
    layers = checkpoint_layers(model)
    if policy in ("partial", "partial_lean"):
        # the memory planner's split: the first layer checkpointed, the rest not (or leanly)
        lean = policy == "partial_lean"
        applied = apply_checkpointing(model, True, layers=1, lean=lean, verbose=False)
        assert applied == "checkpoint" and len(layers) > 1
        assert [layer.gradient_checkpointing for layer in layers] == [True] + [lean] * (len(layers) - 1)
        if lean:
            assert layers[1]._gradient_checkpointing_func is lean_forward
    elif policy == "keep":  # the offload path with the input kept on the device (what CUDA graphs replay)
        apply_checkpointing(model, True, verbose=False)
        func = OffloadedCheckpoint(torch.device("cpu"), offload=False)
        for layer in layers:
            layer._gradient_checkpointing_func = func
    else:
        applied = apply_checkpointing(model, policy, force_offload=True, verbose=False)
        assert applied == ("checkpoint" if policy is True else "offload")
        assert layers and all(layer.gradient_checkpointing for layer in layers)
    grads()  # warm-up again: offloading runs the layers' forward under no_grad, which decides anew
    got = grads()
    # Recomputation runs the same fp32 ops on the same inputs with the same RNG state: forward
    # values are bit-identical; only gradient accumulation order may differ (ulps).
    assert_grads_close(got, reference, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("policy", [True, "offload"])
def test_recompute_lets_the_gated_op_overwrite_its_inputs(tiny_dir, policy, monkeypatch):
    """Only a checkpoint's recompute tells the gated op that gate and up expire in its backward
    (ops.hints): the first forward's and a non-checkpointed layer's inputs must survive."""
    from slipstream.models import mlp
    from slipstream.ops.hints import inputs_may_be_overwritten
    from slipstream.train.recompute import recomputing

    model, _batch, grads = tiny_with_batch(tiny_dir)
    real = mlp.gate_op
    seen = []
    monkeypatch.setattr(mlp, "gate_op", lambda *a, **k: seen.append((recomputing(), inputs_may_be_overwritten()))
                        or real(*a, **k))
    apply_checkpointing(model, False, verbose=False)
    grads()
    assert seen and not any(hint for _, hint in seen)
    seen.clear()
    apply_checkpointing(model, policy, force_offload=True, verbose=False)
    grads()
    assert {(False, False), (True, True)} == set(seen), seen


def test_partial_layer_count_is_checked(tiny_dir):
    model, _ = load_tiny(tiny_dir, accelerate=False)
    n = len(checkpoint_layers(model))
    with pytest.raises(ValueError, match=f"between 0 and the model's {n} decoder layers"):
        apply_checkpointing(model, True, layers=n + 1, verbose=False)


def test_memory_cap_bounds_the_plan(tiny_dir):
    from slipstream.train.memory import CAPPED_HEADROOM, HEADROOM, allocated_bytes, plan_for_model

    model, _ = load_tiny(tiny_dir, accelerate=True)
    roomy = plan_for_model(model, batch=2, seq=128)
    assert roomy.choice == "none" and not roomy.lean
    weights = allocated_bytes(model, torch.device("cpu"))
    per_layer, lean_layer = roomy.per_layer_bytes, roomy.extra["lean_layer_bytes"]
    assert lean_layer < per_layer  # the norms and the MLP are mapped: their outputs can be recomputed

    def capped_at(layers_worth: float):
        # a cap leaving room (after the planner's 5 % margin under a cap) for the weights, the fixed
        # reserve and `layers_worth` bytes of activations
        cap = weights + (roomy.extra["fixed_bytes"] + layers_worth) / CAPPED_HEADROOM
        plan = plan_for_model(model, batch=2, seq=128, max_memory_gib=cap / 2**30)
        assert plan.free_bytes == int(cap) - weights
        assert plan.budget_bytes == int(plan.free_bytes * CAPPED_HEADROOM)
        return plan

    # a cap above what is free does not bind: the device's free memory with the wider margin
    loose = plan_for_model(model, batch=2, seq=128, free_bytes=64 * 2**20, max_memory_gib=1024.0)
    assert loose.free_bytes == 64 * 2**20 and loose.budget_bytes == int(64 * 2**20 * HEADROOM)

    # both layers' full activations do not fit, both lean ones do
    lean = capped_at(2.01 * lean_layer)
    assert 2 * lean_layer < 2 * per_layer
    assert lean.choice == "lean" and lean.lean and lean.checkpointed_layers == 0 and lean.checkpointing == "lean"
    assert lean.need_bytes["lean"] <= lean.budget_bytes < lean.need_bytes["none"]
    # one checkpointed layer's input and its recompute buffer (one full layer, which outweighs the
    # other, lean layer) fit; two lean layers do not
    layer_input = roomy.extra["layer_input_bytes"]
    assert per_layer + layer_input < 2 * lean_layer
    partial = capped_at(per_layer + layer_input + 0.01 * lean_layer)
    assert partial.choice == "partial" and partial.lean and partial.checkpointed_layers == 1
    assert partial.need_bytes["partial"] <= partial.budget_bytes < partial.need_bytes["lean"]
    assert "the others lean" in partial.describe()
    with pytest.raises(ValueError, match="max_memory_gib must be positive"):
        plan_for_model(model, batch=2, seq=128, max_memory_gib=0)


def test_offload_degrades_to_checkpointing_on_cpu(tiny_dir, capsys):
    model, _ = load_tiny(tiny_dir, accelerate=False)
    assert apply_checkpointing(model, "offload") == "checkpoint"
    assert "degrades to plain checkpointing" in capsys.readouterr().out
