"""Lean activations: tagged cheap outputs are stored as recipes and recomputed, bit for bit."""

from __future__ import annotations

import random

import pytest
import torch

from slipstream.train import recompute
from slipstream.train.offload import apply_checkpointing, checkpoint_layers
from tests.train.test_gradients import tiny_with_batch


def scaled_sin(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * w


def forward(x, w, m, lean: bool):
    """``(scaled_sin(x, w) viewed (rows, cols) @ m).sum()``: the matmul saves the (tagged) activation."""
    with recompute.lean_activations() if lean else torch.enable_grad():
        y = recompute.tag(scaled_sin(x, w), scaled_sin, x, w, label="scaled_sin")
        return (y.view(x.shape[0] * x.shape[1], -1) @ m).sum()


def leaves(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    m = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    return x, w, m


def test_recomputed_activation_gives_identical_gradients():
    seed = random.randrange(2**31)
    plain = leaves(seed)
    want = torch.autograd.grad(forward(*plain, lean=False), plain)
    args = leaves(seed)  # the same values, fresh leaves
    recompute.stats.reset()
    loss = forward(*args, lean=True)
    assert recompute.stats.packed == 1 and recompute.stats.by_label == {"scaled_sin": 3 * 5 * 7 * 8}
    got = torch.autograd.grad(loss, args)
    assert recompute.stats.recomputed == 1
    for g, ref in zip(got, want, strict=True):
        assert torch.equal(g, ref)


class _ViewOut(torch.autograd.Function):
    """Like the Triton kernels: computes into a fresh (rows, cols) buffer and returns a view of it."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        y = torch.empty((x.numel() // x.shape[-1], x.shape[-1]), dtype=x.dtype)
        y.copy_((torch.sin(x) * w).reshape(y.shape))
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * torch.cos(x) * w, (g * torch.sin(x)).sum(dim=(0, 1))


def view_out(x, w):
    return _ViewOut.apply(x, w)


def test_a_view_of_a_fresh_buffer_is_recomputed_too():
    seed = random.randrange(2**31)

    def run(lean: bool):
        x, w, m = leaves(seed)
        recompute.stats.reset()
        with recompute.lean_activations() if lean else torch.enable_grad():
            y = recompute.tag(view_out(x, w), view_out, x, w, label="view_out")
            assert y._base is not None
            loss = (y.reshape(15, 7)[:, 1:] @ m[1:]).sum()  # the matmul saves a strided view of y
        return torch.autograd.grad(loss, (x, w, m)), recompute.stats.packed

    (want, packed_plain), (got, packed_lean) = run(False), run(True)
    assert packed_plain == 0 and packed_lean == 1
    for g, ref in zip(got, want, strict=True):
        assert torch.equal(g, ref)


def test_tagging_is_off_outside_lean_mode_and_without_grad_inputs():
    x, w, _ = leaves(0)
    y = recompute.tag(scaled_sin(x, w), scaled_sin, x, w)
    assert not hasattr(y, recompute.ATTR)
    with recompute.lean_activations():
        frozen = recompute.tag(scaled_sin(x.detach(), w.detach()), scaled_sin, x.detach(), w.detach())
        assert not hasattr(frozen, recompute.ATTR)  # nothing saves the inputs: holding them could cost more
        view = scaled_sin(x, w)[1:]  # a view of part of a buffer: not what scaled_sin returns
        assert recompute.tag(view, scaled_sin, x, w) is view and not hasattr(view._base, recompute.ATTR)
        same = recompute.tag(x.view(-1), scaled_sin, x, w)  # a view of an input is not a fresh output
        assert not hasattr(x, recompute.ATTR) and not hasattr(same, recompute.ATTR)
        with torch.no_grad():
            assert not hasattr(recompute.tag(scaled_sin(x, w), scaled_sin, x, w), recompute.ATTR)


def test_input_modified_in_place_raises_instead_of_recomputing_a_different_value():
    x, w, m = leaves(1)
    xs = x * 1.0  # a non-leaf that can be modified in place
    with recompute.lean_activations():
        y = recompute.tag(scaled_sin(xs, w), scaled_sin, xs, w, label="scaled_sin")
        loss = (y.view(15, 7) @ m).sum()
    # scaled_sin's own backward needs sin(x)'s input, which autograd guards itself; a mutation of the
    # recipe's input is caught by the recipe before autograd's own check runs
    with torch.no_grad():
        xs.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        loss.backward()


def test_output_modified_in_place_is_kept_not_recomputed():
    x, w, m = leaves(2)
    recompute.stats.reset()
    with recompute.lean_activations():
        y = recompute.tag(scaled_sin(x, w), scaled_sin, x, w)
        y.mul_(2.0)  # the recipe no longer describes y: it must be saved as it is
        loss = (y.view(15, 7) @ m).sum()
    assert recompute.stats.packed == 0
    loss.backward()
    torch.testing.assert_close(m.grad, (2 * torch.sin(x.detach()) * w.detach()).view(15, 7).sum(0)[:, None]
                               .expand(7, 4), rtol=0, atol=1e-12)


def test_lean_policy_on_a_model_is_exact_and_recomputes_the_mapped_outputs(tiny_dir):
    model, batch, grads = tiny_with_batch(tiny_dir)  # lora_dropout 0: the LoRA projections run our op
    apply_checkpointing(model, False, verbose=False)
    grads()  # warm-up: first-call dispatch decisions
    reference = grads()
    assert apply_checkpointing(model, "lean", verbose=False) == "lean"
    layers = checkpoint_layers(model)
    assert all(layer.gradient_checkpointing for layer in layers)
    recompute.stats.reset()
    got = grads()
    # the same ops on the same inputs: forward values and gradients are bit-identical
    assert got.keys() == reference.keys()
    for name in got:
        assert torch.equal(got[name], reference[name]), name
    tokens = int(batch["input_ids"].numel())
    intermediate = model.config.intermediate_size
    # every layer's down projection saved act(gate) * up (fp32 here) as a recipe
    assert recompute.stats.by_label["swiglu"] == len(layers) * tokens * intermediate * 4
    assert recompute.stats.by_label["rms_norm"] > 0
    assert recompute.stats.recomputed >= 2 * len(layers)
    # back to plain: no recipes any more
    apply_checkpointing(model, False, verbose=False)
    recompute.stats.reset()
    grads()
    assert recompute.stats.packed == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gemma3", "phi3"])
def test_the_planner_counts_what_lean_actually_frees(arch):
    """``lean_elements`` (the planner's saving per token and layer) equals the bytes of the buffers
    stored as recipes in a real forward: Gemma 2/3's post-norms and Qwen3's q/k norms feed nothing
    that saves them, so they must not be counted."""
    from slipstream.models import accelerate
    from slipstream.train.memory import lean_elements
    from tests.models.tiny import build, ids, with_lora

    model = with_lora(build(arch))
    accelerate(model)
    model.enable_input_require_grads()  # the first layer's input norm is then tagged like the others
    model.train()
    layers = checkpoint_layers(model)
    apply_checkpointing(model, "lean", verbose=False)
    gated, elements = lean_elements(model)
    assert gated and elements > 0
    batch = ids(2, 12)
    recompute.stats.reset()
    model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    assert recompute.stats.unique_bytes == len(layers) * batch.numel() * elements * 4  # fp32
