"""On a GPU: accelerated bf16 LoRA / QLoRA training steps through the dispatcher's real choices.

Judged like the ops are: against an fp32 copy of the same model as the truth, the accelerated bf16
model must be about as close as transformers' own bf16 eager path (at most 2x its error plus a
small floor), for the loss and the LoRA gradients. Skipped without CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch

from slipstream.models import accelerate, attention_fallbacks, reset_attention_fallbacks
from tests.models.tiny import ARCHS, build, ids, rel, with_lora

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
USE_DISPATCHER = True
SEQ = 256


def lora_grads(model):
    return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}


def step(model, **inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, use_cache=False).loss
    loss.backward()
    return loss.detach().float(), lora_grads(model)


def print_choices() -> None:
    import slipstream

    for d in slipstream.explain():
        print(f"  {d.op:22s} {d.mode:7s} {d.chosen:40s} {d.shapes}")


def no_worse(fast: float, eager: float, floor: float) -> bool:
    return fast <= 2 * eager + floor


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_lora_step_is_as_good_as_eager(arch):
    truth = with_lora(build(arch)).cuda()
    eager = copy.deepcopy(truth).to(torch.bfloat16)
    fast = copy.deepcopy(eager)
    report = accelerate(fast)
    assert report.counts().get("lora_linear", 0) > 0 and report.counts().get("attention") == 2
    x = ids(2, SEQ, seed=1).cuda()
    reset_attention_fallbacks()
    t_loss, t_grads = step(truth, input_ids=x, labels=x)
    e_loss, e_grads = step(eager, input_ids=x, labels=x)
    f_loss, f_grads = step(fast, input_ids=x, labels=x)
    assert attention_fallbacks() == {}
    assert no_worse(rel(f_loss, t_loss), rel(e_loss, t_loss), 4e-3), (f_loss, e_loss, t_loss)
    f_err = max(rel(f_grads[n], t_grads[n]) for n in t_grads)
    e_err = max(rel(e_grads[n], t_grads[n]) for n in t_grads)
    print(
        f"{arch}: loss err fast {rel(f_loss, t_loss):.2e} eager {rel(e_loss, t_loss):.2e}; "
        f"worst LoRA grad err fast {f_err:.2e} eager {e_err:.2e}"
    )
    print_choices()
    assert no_worse(f_err, e_err, 2e-2)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_bf16_packed_row_matches_separate_sequences(arch):
    model = with_lora(build(arch)).cuda().to(torch.bfloat16)
    accelerate(model)
    lengths = [100, 37, 119]
    seqs = [ids(1, n, seed=10 + i).cuda() for i, n in enumerate(lengths)]
    row = torch.cat(seqs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=pos, use_cache=False).logits[0].float()
        alone = torch.cat([model(input_ids=s, use_cache=False).logits[0].float() for s in seqs])
    assert rel(packed, alone) < 2e-2


def test_qlora_nf4_layers_train_through_lora_linear():
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class Quantized(nn.Module):
        is_loaded_in_4bit = True

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(5)
            self.up = self.q4(256, 512)
            self.down = self.q4(512, 256)

        @staticmethod
        def q4(n_in, n_out):
            lin = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
            lin.weight = bnb.nn.Params4bit(
                torch.randn(n_out, n_in) * n_in**-0.5, requires_grad=False, quant_type="nf4"
            )
            return lin.cuda()

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    slow = get_peft_model(
        Quantized(), LoraConfig(r=8, target_modules=["up", "down"], lora_dropout=0.0, init_lora_weights=False)
    ).to(torch.bfloat16)
    fast = copy.deepcopy(slow)
    report = accelerate(fast)
    assert report.counts() == {"lora_linear": 2}
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    ref = slow(x)
    ref.float().square().mean().backward()
    got = fast(x)
    got.float().square().mean().backward()
    assert rel(got.float(), ref.float()) < 2e-2
    g_ref, g_got = lora_grads(slow), lora_grads(fast)
    assert max(rel(g_got[n], g_ref[n]) for n in g_ref) < 5e-2
    print_choices()
