"""The architecture table: one :class:`~slipstream.models.base.Adapter` per supported family.

Everything module-level (which RMSNorm, which MLP activation, which LoRA layers) is found
structurally and verified by probes, so a family entry only says what cannot be probed cheaply:
whether its attention masks are the flash-attention-2 kind (causal / sliding window / padding /
packing), whether its rotary embedding is transformers' rotate-half ``apply_rotary_pos_emb``,
the RMSNorm form it must have, and how its logits are produced.

==========  ===================  =====================================================================
family      model_type           what the mapping covers
==========  ===================  =====================================================================
llama       llama                Llama 2 / 3 / 3.1 / 3.2 (rope scaling lives in cos/sin, untouched)
mistral     mistral              config.sliding_window passed to every layer
qwen2       qwen2                Qwen2 / 2.5: q/k/v biases (in the projections), optional sliding layers
qwen3       qwen3                q_norm / k_norm RMSNorms on the head dim
gemma       gemma                (1 + w) RMSNorm, GeGLU (tanh), sqrt(hidden) embedding scale untouched
gemma2      gemma2               + attention-logit softcap, final-logit softcap, alternating sliding window,
                                 pre/post feed-forward norms
gemma3      gemma3_text          + q_norm / k_norm, sliding/full layer pattern, local rope base
phi3        phi3                 fused qkv_proj (sliced by transformers), fused gate_up_proj split in half,
                                 partial rotary factor
==========  ===================  =====================================================================
"""

from __future__ import annotations

from slipstream.models.base import Adapter, register_adapter

LLAMA = register_adapter(Adapter("llama", ("llama",), mlp_output_to_residual=True,
                                 notes="RMSNorm, rotate-half RoPE, SwiGLU, GQA"))
MISTRAL = register_adapter(
    Adapter("mistral", ("mistral",), mlp_output_to_residual=True, notes="sliding window from config.sliding_window")
)
QWEN2 = register_adapter(Adapter("qwen2", ("qwen2",), mlp_output_to_residual=True,
                                 notes="q/k/v biases, optional sliding-window layers"))
QWEN3 = register_adapter(Adapter("qwen3", ("qwen3",), mlp_output_to_residual=True,
                                 notes="q_norm/k_norm RMSNorms on the head dim"))
GEMMA = register_adapter(
    Adapter(
        "gemma",
        ("gemma",),
        norm_offset=1.0,
        mlp_output_to_residual=True,
        notes="(1 + w) RMSNorm, GeGLU tanh; embedding scaling left as is",
    )
)
GEMMA2 = register_adapter(
    Adapter(
        "gemma2",
        ("gemma2",),
        norm_offset=1.0,
        final_softcap="final_logit_softcapping",
        notes="attention softcap, final logit softcap, alternating sliding window",
    )
)
GEMMA3 = register_adapter(
    Adapter(
        "gemma3",
        ("gemma3_text",),
        norm_offset=1.0,
        final_softcap="final_logit_softcapping",
        notes="q_norm/k_norm, sliding/full layer pattern, optional softcaps",
    )
)
PHI3 = register_adapter(Adapter("phi3", ("phi3",), mlp_output_to_residual=True,  # through a dropout: no values
                                notes="fused qkv_proj and gate_up_proj, partial rotary"))

FAMILIES = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3, PHI3)
