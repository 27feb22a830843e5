"""A bf16 model with peft's fp32 adapters trains identically with the per-step adapter cast cache on
and off (the fused LoRA kernels under Triton's CPU interpreter, with offloaded checkpointing so each
step has a forward, a recompute and a backward), every backward reuses its recompute's casts and
leaves none behind, and de-accelerating removes the step hook."""

from __future__ import annotations

import torch

from slipstream.dispatch import dispatcher, forced
from slipstream.kernels._casts import ADAPTER_CASTS
from slipstream.models import accelerate, deaccelerate
from slipstream.models.lora import _new_step
from slipstream.train.offload import apply_checkpointing
from tests.models.tiny import build, ids, with_lora

KERNEL = "nvidia.lora_linear[base=cublas,bytes=2048,num_warps=4]"
GROUP = "nvidia.lora_linear_group[base=cublas,bytes=2048,num_warps=4]"


def train(cached: bool, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor], int]:
    model = with_lora(build("llama").to(torch.bfloat16))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)  # peft's upcast
    accelerate(model)
    apply_checkpointing(model, "offload", force_offload=True, verbose=False)
    ADAPTER_CASTS.enabled = cached
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, hits = [], ADAPTER_CASTS.hits
    batch = ids(2, 9, seed=3)
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        assert len(ADAPTER_CASTS) == 0  # every cast kept by a recompute was taken by its backward
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base = model.get_base_model()
    assert any(h is _new_step for h in base._forward_pre_hooks.values())
    deaccelerate(model)
    assert not any(h is _new_step for h in base._forward_pre_hooks.values())
    return losses, lora, ADAPTER_CASTS.hits - hits


def test_cached_adapter_casts_train_bit_identically(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # this package's conftest turns the interpreter off
    dispatcher().forget()
    try:
        with forced("lora_linear", KERNEL), forced("lora_linear_group", GROUP):
            plain_losses, plain_lora, plain_hits = train(cached=False)
            losses, lora, hits = train(cached=True)
    finally:
        ADAPTER_CASTS.enabled = True
        ADAPTER_CASTS.stop()
    assert plain_hits == 0 and hits > 0
    assert losses == plain_losses and plain_losses[-1] < plain_losses[0]
    for name, weight in lora.items():
        torch.testing.assert_close(weight, plain_lora[name], rtol=0, atol=0, msg=name)
