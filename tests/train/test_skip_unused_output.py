"""Checkpoint recompute skips the down projection's output GEMM where the layer adds it straight into
the residual (``Adapter.mlp_output_to_residual``), and no gradient changes.

Every architecture with the fused LoRA kernel (under Triton's CPU interpreter) on all projections:
LoRA gradients with checkpointing (torch's, and offloaded) against no checkpointing, fp32.
Recompute runs the same fp32 ops on the same inputs, so the only difference allowed is gradient
accumulation order (rtol 1e-5). The kernel's hint calls are counted: families whose MLP output goes
through a norm first (Gemma 2/3's post-feed-forward norm) must never skip.
"""

from __future__ import annotations

import pytest
import torch

from slipstream.dispatch import dispatcher, forced
from slipstream.kernels import lora as lora_kernels
from slipstream.models import accelerate
from slipstream.models.base import adapter_for
from slipstream.train.offload import apply_checkpointing
from tests.models.tiny import ARCHS, build, ids, rel, with_lora

KERNEL = "nvidia.lora_linear[base=cublas,bytes=2048,num_warps=4]"


def lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=batch, labels=batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("arch", "policy"), [(a, True) for a in sorted(ARCHS)] + [("llama", "offload"),
                                                                                    ("phi3", "offload")])
def test_recompute_skips_only_unread_outputs_and_keeps_gradients(monkeypatch, arch, policy):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # this package's conftest turns the interpreter off
    dispatcher().forget()
    model = with_lora(build(arch))
    accelerate(model)
    model.train()
    skipped = []
    real = lora_kernels.output_values_are_unused

    def counting() -> bool:
        unused = real()
        skipped.append(unused)
        return unused

    monkeypatch.setattr(lora_kernels, "output_values_are_unused", counting)
    batch = ids(2, 11, seed=int(torch.randint(0, 2**31, (1,))))
    with forced("lora_linear", KERNEL):  # down_proj is never grouped
        expected = lora_grads(model, batch)
        assert skipped and not any(skipped), "no checkpointing: nothing may be skipped"
        skipped.clear()
        apply_checkpointing(model, policy, force_offload=True, verbose=False)
        got = lora_grads(model, batch)
    assert got.keys() == expected.keys() and got
    worst = max(rel(got[n], expected[n]) for n in got)
    assert worst < 1e-5, f"{arch}/{policy}: LoRA gradients differ by {worst:.1e}"
    layers = model.config.num_hidden_layers
    if adapter_for(model.get_base_model()).mlp_output_to_residual:
        assert sum(skipped) == layers, f"one down projection per recomputed layer should skip, got {sum(skipped)}"
    else:
        assert not any(skipped), "the MLP output feeds a norm here: its values are read"
