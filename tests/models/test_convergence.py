"""Convergence: several LoRA training steps with slipstream vs plain transformers + peft, per architecture.

Both models start from the same random weights and adapters (fp32, eager attention for the
baseline) and take the same AdamW steps on the same batches. Tolerances (norm-wise relative):
per-step loss 1e-5 and final LoRA weights 1e-4 — the accelerated path runs the ops' fp32
references, which differ from transformers' eager code only in summation order; Adam's
normalised updates let those ~1e-7 differences grow a little over the steps, hence the looser
bound on the weights. Variants: plain rows and gradient checkpointing. (Packed rows are checked
against separately-run sequences in test_architectures.py: transformers' eager baseline itself
attends across packed boundaries, so it is no oracle for packing.)
"""

from __future__ import annotations

import pytest
import torch

from slipstream.models import accelerate
from tests.models.tiny import ARCHS, build, ids, rel, with_lora

STEPS = 4
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-4


def train(model: torch.nn.Module, variant: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    if variant == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    losses = []
    for _ in range(STEPS):
        batch = ids(2, 18, seed=0)  # one batch, so a falling loss shows the adapters learn
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return losses, lora


@pytest.mark.parametrize("variant", ["plain", "checkpointing"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lora_training_matches_transformers_peft(arch, variant):
    base = build(arch)
    baseline = with_lora(base)
    fast = with_lora(base)
    report = accelerate(fast)
    assert report.counts().get("lora_linear"), str(report)
    ref_losses, ref_lora = train(baseline, variant)
    losses, lora = train(fast, variant)
    assert ref_losses[-1] < ref_losses[0]  # it is training, not standing still
    for step, (got, want) in enumerate(zip(losses, ref_losses, strict=True)):
        assert abs(got - want) / abs(want) < LOSS_TOL, f"{arch}/{variant} step {step}: {got} vs {want}"
    assert lora.keys() == ref_lora.keys()
    worst = max(rel(lora[n], ref_lora[n]) for n in lora)
    assert worst < WEIGHT_TOL, f"{arch}/{variant}: LoRA weights differ by {worst:.2e}"
