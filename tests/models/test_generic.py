"""Architectures outside the adapter table still train: structural mappings only, and the report
says what was not accelerated. Plus 4-bit (QLoRA) LoRA layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slipstream.models import accelerate, deaccelerate
from tests.models.tiny import FWD_TOL, GRAD_TOL, rel


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- GPT-2 (transformers, unknown)
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(7)
    cfg = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(cfg)


def test_gpt2_with_lora_trains_and_report_says_what_is_not_accelerated():
    from peft import LoraConfig, get_peft_model

    slow = get_peft_model(
        tiny_gpt2(),
        LoraConfig(
            r=4,
            target_modules=["c_attn", "c_proj", "c_fc"],
            lora_dropout=0.0,
            init_lora_weights=False,
            fan_in_fan_out=True,
        ),
    )
    fast = copy.deepcopy(slow)
    report = accelerate(fast)
    assert report.adapter == "generic"
    assert report.counts() == {
        "lora_linear": 8,
        "linear_cross_entropy": 1,
    }  # Conv1D LoRA + probe-verified loss
    reasons = {s.op: s.reason for s in report.skipped}
    assert "not in the adapter table" in reasons["attention"]
    assert "no rotary embedding" in reasons["rope"]
    assert "LayerNorm" in reasons["rms_norm"] and "not a gated MLP" in reasons["swiglu"]
    text = str(report)
    assert "not accelerated:" in text and "2 attention (transformer.h.0.attn, ...) because" in text
    assert fast.config._attn_implementation == "eager"

    x = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = slow(input_ids=x, labels=x)
    ref.loss.backward()
    got = fast(input_ids=x, labels=x)
    got.loss.backward()
    assert got.logits is None and rel(got.loss, ref.loss) < FWD_TOL
    g_ref, g_got = grads(slow), grads(fast)
    assert g_ref.keys() == g_got.keys() and max(rel(g_got[n], g_ref[n]) for n in g_ref) < GRAD_TOL


def test_logit_postprocessing_is_detected_by_the_probe():
    model = tiny_gpt2()
    original = type(model).forward

    class Scaled(type(model)):  # an "architecture" that scales its logits: the fused loss would be wrong
        def forward(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model.__class__ = Scaled
    report = accelerate(model)
    assert "linear_cross_entropy" not in report.counts()
    assert "post-processes" in report.skipped_for("linear_cross_entropy")[0].reason


# ----------------------------------------------------------------------------- a custom nn.Module LM
class MyRMSNorm(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(h))
        self.eps = 1e-5

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class OddRMSNorm(MyRMSNorm):  # looks like an RMSNorm, computes something else: must not be mapped
    def forward(self, x):
        return super().forward(x - x.mean(-1, keepdim=True))


class GatedMLP(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, 96), nn.Linear(h, 96), nn.Linear(96, h)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(128, 64)
        self.norm = MyRMSNorm(64)
        self.mlp = GatedMLP(64)
        self.final_norm = OddRMSNorm(64)
        self.head = nn.Linear(64, 128)

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        h = h + self.mlp(self.norm(h))
        logits = self.head(self.final_norm(h))
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return loss, logits


def test_custom_module_lm_maps_structurally():
    from peft import LoraConfig, get_peft_model

    slow = get_peft_model(
        TinyLM(),
        LoraConfig(
            r=4,
            target_modules=["gate_proj", "up_proj", "down_proj"],
            lora_dropout=0.0,
            init_lora_weights=False,
        ),
    )
    fast = copy.deepcopy(slow)
    report = accelerate(fast)
    assert report.counts() == {"rms_norm": 1, "swiglu": 1, "lora_linear": 3}
    assert report.modules("rms_norm") == ["norm"]
    odd = [s for s in report.skipped if s.module == "final_norm"]
    assert odd and "matches neither" in odd[0].reason
    assert report.skipped_for("linear_cross_entropy")[0].reason.startswith(
        "not a transformers PreTrainedModel"
    )
    assert "not a transformers model" in report.skipped_for("attention")[0].reason

    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    ref_loss, ref_logits = slow(x, labels=x)
    got_loss, got_logits = fast(x, labels=x)
    assert rel(got_logits, ref_logits) < FWD_TOL and rel(got_loss, ref_loss) < FWD_TOL
    ref_loss.backward()
    got_loss.backward()
    g_ref, g_got = grads(slow), grads(fast)
    assert g_ref.keys() == g_got.keys() and max(rel(g_got[n], g_ref[n]) for n in g_ref) < GRAD_TOL
    assert deaccelerate(fast) and not any("forward" in m.__dict__ for m in fast.modules())


# ----------------------------------------------------------------------------- QLoRA: peft lora.Linear4bit
@pytest.mark.parametrize("flagged", [True, False], ids=["peft-lora.Linear4bit", "peft-lora.Linear-over-Linear4bit"])
def test_lora_linear4bit_uses_quantized_weight(flagged: bool):
    """Both peft layer types over a bitsandbytes NF4 base run ops.lora_linear on the packed weight: the
    model flagged ``is_loaded_in_4bit`` (from_pretrained) and layers quantised by hand (peft's dense layer)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    import slipstream.ops as ops

    def q4(n_in: int, n_out: int) -> nn.Module:
        lin = bnb.nn.Linear4bit(n_in, n_out, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(torch.randn(n_out, n_in) * 0.2, requires_grad=False, quant_type="nf4")
        lin.bias = nn.Parameter(torch.randn(n_out) * 0.1)
        try:
            return lin.to("cpu")  # quantises the weight
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"bitsandbytes cannot quantise on the CPU here: {exc}")

    class Quantized(nn.Module):
        is_loaded_in_4bit = flagged  # what peft checks to dispatch lora.Linear4bit

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(5)
            self.up, self.down = q4(64, 128), q4(128, 64)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    slow = get_peft_model(
        Quantized(), LoraConfig(r=4, target_modules=["up", "down"], lora_dropout=0.0, init_lora_weights=False)
    )
    fast = copy.deepcopy(slow)
    peft_layer = type(fast.base_model.model.up).__name__
    assert peft_layer == ("Linear4bit" if flagged else "Linear")
    report = accelerate(fast)
    assert report.counts() == {"lora_linear": 2}
    assert all("NF4/FP4 base" in m.detail for m in report.accelerated)

    seen = []
    real = ops.lora_linear

    def spy(x, weight, *rest):
        seen.append(type(weight).__name__)
        return real(x, weight, *rest)

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    ref = slow(x)
    ref.square().sum().backward()
    ops.lora_linear = spy
    try:
        got = fast(x)
    finally:
        ops.lora_linear = real
    got.square().sum().backward()
    assert seen == ["QuantizedWeight", "QuantizedWeight"]
    assert rel(got, ref) < FWD_TOL
    g_ref, g_got = grads(slow), grads(fast)
    assert g_ref.keys() == g_got.keys() and max(rel(g_got[n], g_ref[n]) for n in g_ref) < GRAD_TOL
