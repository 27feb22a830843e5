"""transformers / peft integration: route a model's hot modules through slipstream's ops.

>>> from slipstream.models import accelerate
>>> report = accelerate(model)          # a transformers causal LM, or a peft PeftModel around one
>>> print(report)
slipstream: LlamaForCausalLM (adapter: llama)
  accelerated: 5 rms_norm, 2 attention, 2 rope, 2 swiglu, 14 lora_linear, 1 linear_cross_entropy
  not accelerated: nothing

What is mapped, and through which extension point (no library source is ever rewritten):

==================  ========================================  =============================================
module              op                                        extension point
==================  ========================================  =============================================
RMSNorm             ``rms_norm`` (Gemma: ``offset=1``)        instance-level ``forward`` (``norms``)
gated MLP           ``swiglu`` / ``geglu``                    instance-level ``forward`` (``mlp``)
attention           ``attention``                             ``AttentionInterface`` and
                                                              ``AttentionMaskInterface`` registration,
                                                              ``set_attn_implementation``
rotary embedding    ``rope``                                  scoped, reversible swap of the modeling
                                                              module's ``apply_rotary_pos_emb`` (``rope``)
peft LoRA Linear /  ``lora_linear``                           instance-level ``forward`` on peft's layer
Linear4bit                                                    types (``lora``)
q/k/v, gate/up      ``lora_linear_group``                     the LoRA layers' forward (q/k/v: lazily, armed
LoRA siblings                                                 by forward hooks on the attention module) and
                                                              the gated-MLP forward (``lora_groups``)
causal-LM loss      ``linear_cross_entropy``                  instance-level ``forward`` on the model;
                                                              ``logits=None`` in that path (``loss``)
==================  ========================================  =============================================

Every module mapping is probed against the module's own forward when installed; what does not
match, or is not expressible, keeps its original code and is listed in the
:class:`AccelerationReport` with the reason. :func:`deaccelerate` undoes everything.
Architecture families live in :mod:`slipstream.models.families`; :func:`register_adapter` adds one.
"""

from __future__ import annotations

from slipstream.models import families as _families  # noqa: F401 - registers the table
from slipstream.models.attention import attention_fallbacks, reset_attention_fallbacks
from slipstream.models.base import (
    GENERIC,
    AccelerationReport,
    Adapter,
    Mapping,
    Skipped,
    accelerate,
    adapter_for,
    adapters,
    deaccelerate,
    register_adapter,
    report_of,
)

__all__ = [
    "GENERIC",
    "AccelerationReport",
    "Adapter",
    "Mapping",
    "Skipped",
    "accelerate",
    "adapter_for",
    "adapters",
    "attention_fallbacks",
    "deaccelerate",
    "register_adapter",
    "report_of",
    "reset_attention_fallbacks",
]
