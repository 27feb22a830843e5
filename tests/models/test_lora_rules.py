"""When peft's own forward is kept (and why), runtime fallbacks, and KV-cache generation."""

from __future__ import annotations

import copy

import torch

from slipstream.models import accelerate, attention_fallbacks, reset_attention_fallbacks
from tests.models.tiny import FWD_TOL, build, ids, rel, with_lora


def logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False, **kw).logits


def test_layers_peft_must_run_itself_are_reported():
    base = build("llama")
    dropout = accelerate(with_lora(base, lora_dropout=0.1))
    assert "lora_linear" not in dropout.counts()
    assert {s.reason for s in dropout.skipped_for("lora_linear")} == {"lora_dropout p=0.1 > 0"}

    dora = accelerate(with_lora(base, use_dora=True))
    assert "lora_linear" not in dora.counts()
    assert {s.reason for s in dora.skipped_for("lora_linear")} == {"DoRA / a LoRA variant is used"}

    head = accelerate(with_lora(base, target_modules=["q_proj", "lm_head"]))
    assert head.counts()["lora_linear"] == 3  # 2 q_proj + lm_head itself
    assert "not a plain nn.Linear" in head.skipped_for("linear_cross_entropy")[0].reason

    two = with_lora(base)
    from peft import LoraConfig

    two.add_adapter(
        "other", LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0, init_lora_weights=False)
    )
    two.base_model.set_adapter(["default", "other"])
    report = accelerate(two)
    q_reasons = {s.reason for s in report.skipped_for("lora_linear")}
    assert q_reasons == {"2 active adapters (ops.lora_linear takes exactly one)"}
    assert report.counts()["lora_linear"] == 12  # the 12 non-q projections have one active adapter


def test_merged_and_disabled_adapters_fall_back_at_runtime():
    slow = with_lora(build("qwen2"))
    fast = copy.deepcopy(slow)
    accelerate(fast)
    x = ids(2, 10, seed=8)
    with slow.disable_adapter(), fast.disable_adapter():
        assert rel(logits(fast, x), logits(slow, x)) < FWD_TOL
    fast.merge_adapter()
    slow.merge_adapter()
    assert rel(logits(fast, x), logits(slow, x)) < FWD_TOL
    fast.unmerge_adapter()
    slow.unmerge_adapter()
    assert rel(logits(fast, x), logits(slow, x)) < FWD_TOL


def test_generation_with_kv_cache_matches():
    slow = build("gemma2")
    fast = copy.deepcopy(slow)
    accelerate(fast)
    prompt = ids(2, 8, seed=9)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded batch, as generate() sees it
    prompt[1, :3] = 0
    reset_attention_fallbacks()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = slow.generate(prompt, **kw)
        got = fast.generate(prompt, **kw)
    assert torch.equal(got, ref)
    fallbacks = attention_fallbacks()
    assert list(fallbacks) == ["query and key lengths differ (KV cache / prefix)"]  # decode steps only


def test_dropout_and_custom_mask_fall_back_to_eager():
    slow = build("mistral", attention_dropout=0.0)
    fast = copy.deepcopy(slow)
    accelerate(fast)
    x = ids(1, 8, seed=10)
    mask4d = torch.tril(torch.ones(8, 8, dtype=torch.bool))[None, None]
    mask4d[..., 5, 1] = False
    reset_attention_fallbacks()
    additive = torch.where(mask4d, 0.0, torch.finfo(torch.float32).min)
    assert rel(logits(fast, x, attention_mask=additive), logits(slow, x, attention_mask=additive)) < FWD_TOL
    assert "a custom 4D attention mask" in attention_fallbacks()

    holes = torch.ones(2, 8, dtype=torch.long)
    holes[1, 3] = 0
    x2 = ids(2, 8, seed=11)
    got, ref = logits(fast, x2, attention_mask=holes), logits(slow, x2, attention_mask=holes)
    assert rel(got[holes.bool()], ref[holes.bool()]) < FWD_TOL
    assert any("holes" in r for r in attention_fallbacks())

    fast.config.attention_dropout = 0.5
    for m in fast.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    fast.train()
    loss = fast(input_ids=x2, labels=x2, use_cache=False).loss
    assert torch.isfinite(loss) and "attention dropout > 0" in attention_fallbacks()
