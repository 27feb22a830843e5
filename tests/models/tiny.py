"""Tiny random-weight models of every supported family, and comparison helpers.

Sizes: hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 128, fp32, eager attention for the
baseline. Weights are drawn with ``initializer_range=0.1`` and every norm weight is perturbed,
so that norms, soft-caps and attention patterns all matter numerically.

Tolerances (fp32 on the CPU, norm-wise relative error ``||a - b|| / ||b||``): forward logits and
losses 1e-5, gradients 1e-4. The accelerated path runs the ops' fp32 references, which differ
from transformers' eager code only in summation order and mask representation.
"""

from __future__ import annotations

import copy

import torch
import transformers as tf

FWD_TOL = 1e-5
GRAD_TOL = 1e-4

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    intermediate_size=96,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,
    attn_implementation="eager",
    tie_word_embeddings=False,
)

GEMMA2_SOFTCAPS = dict(attn_logit_softcapping=0.8, final_logit_softcapping=1.5)

ARCHS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=6)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=16)),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(head_dim=16)),
    "gemma2": (
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=4, **GEMMA2_SOFTCAPS),
    ),
    "gemma3": (
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(partial_rotary_factor=0.5)),
}

# per architecture: how many modules each op should cover (2 layers)
EXPECTED = {
    "llama": dict(rms_norm=5, swiglu=2, lora=14),
    "mistral": dict(rms_norm=5, swiglu=2, lora=14),
    "qwen2": dict(rms_norm=5, swiglu=2, lora=14),
    "qwen3": dict(rms_norm=9, swiglu=2, lora=14),
    "gemma": dict(rms_norm=5, geglu=2, lora=14),
    "gemma2": dict(rms_norm=9, geglu=2, lora=14),
    "gemma3": dict(rms_norm=13, geglu=2, lora=14),
    "phi3": dict(rms_norm=5, swiglu=2, lora=8),
}


def build(arch: str, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(1234)
    model = model_cls(config_cls(**{**COMMON, **extra, **overrides})).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def with_lora(model: torch.nn.Module, **overrides) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(99)
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(copy.deepcopy(model), LoraConfig(**{**cfg, **overrides}))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, seq), generator=g)
