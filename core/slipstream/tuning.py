"""Pre-tuning: the op calls one training step of a model makes, so they can be decided ahead of time.

``slipstream tune --model CONFIG`` derives, from a transformers config, the shapes each op sees in a
LoRA training step (one decoder layer is representative: all layers share shapes) and runs them
through the dispatcher, which verifies, times and caches every decision on disk. The first real
training step then only reads the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slipstream.ops import SPECS, OpSpec


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    activation: str = "silu"
    offset: float = 0.0
    softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, config: object) -> ModelShape:
        """Read a transformers ``PretrainedConfig`` (Llama-like field names)."""
        text = getattr(config, "get_text_config", lambda: config)()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        act = getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", "silu")
        model_type = getattr(text, "model_type", "")
        return cls(hidden=text.hidden_size, intermediate=text.intermediate_size, heads=heads,
                   kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   vocab=text.vocab_size, activation=act, offset=1.0 if model_type.startswith("gemma") else 0.0,
                   softcap=getattr(text, "attn_logit_softcapping", None),
                   final_softcap=getattr(text, "final_logit_softcapping", None),
                   sliding_window=getattr(text, "sliding_window", None) if model_type.startswith("gemma2") else None)


def _t(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, grad: bool = False,
       scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_(grad)


def step_calls(shape: ModelShape, batch: int, seq: int, device: torch.device, dtype: torch.dtype,
               lora_rank: int = 16) -> list[tuple[OpSpec, tuple]]:
    """(spec, args) for each distinct op call of a LoRA training step, with requires_grad as in training."""
    n, h, d = batch * seq, shape.hidden, shape.head_dim
    calls: list[tuple[OpSpec, tuple]] = []
    calls.append((SPECS["rms_norm"], (_t((n, h), device, dtype, True), _t((h,), device, dtype), 1e-6, shape.offset)))
    q = _t((batch, shape.heads, seq, d), device, dtype, True)
    k = _t((batch, shape.kv_heads, seq, d), device, dtype, True)
    ang = torch.rand(seq, d // 2, device=device) * 6.28
    ang = torch.cat((ang, ang), -1).expand(batch, seq, d).contiguous()
    calls.append((SPECS["rope"], (q, k, ang.cos().to(dtype), ang.sin().to(dtype), None)))
    v = _t((batch, shape.kv_heads, seq, d), device, dtype, True)
    calls.append((SPECS["attention"], (q, k, v, True, None, shape.sliding_window, shape.softcap, None)))
    gate, up = _t((n, shape.intermediate), device, dtype, True), _t((n, shape.intermediate), device, dtype, True)
    if "gelu" in shape.activation:
        approx = "tanh" if "tanh" in shape.activation else "none"
        calls.append((SPECS["geglu"], (gate, up, approx)))
    else:
        calls.append((SPECS["swiglu"], (gate, up)))
    projections = {(h, shape.heads * d), (h, shape.kv_heads * d), (shape.heads * d, h),
                   (h, shape.intermediate), (shape.intermediate, h)}
    def projection(k_in: int, n_out: int) -> tuple:
        w = _t((n_out, k_in), device, dtype, scale=k_in ** -0.5)
        a = _t((lora_rank, k_in), device, dtype, True, scale=k_in ** -0.5)
        b = _t((n_out, lora_rank), device, dtype, True, scale=lora_rank ** -0.5)
        return w, a, b, 1.0, None

    # every projection alone (o_proj, down_proj; all of them with SLIPSTREAM_LORA_GROUPS=0) ...
    for k_in, n_out in sorted(projections):
        calls.append((SPECS["lora_linear"], (_t((n, k_in), device, dtype, True), *projection(k_in, n_out))))
    # ... and the groups of projections sharing an input (models/lora_groups.py): q/k/v and gate/up
    for outs in ((shape.heads * d, shape.kv_heads * d, shape.kv_heads * d), (shape.intermediate,) * 2):
        slots = [a for n_out in outs for a in projection(h, n_out)]
        slots += [None] * (5 * 3 - len(slots))
        calls.append((SPECS["lora_linear_group"], (_t((n, h), device, dtype, True), *slots)))
    labels = torch.randint(0, shape.vocab, (n,), device=device)
    calls.append((SPECS["linear_cross_entropy"], (_t((n, h), device, dtype, True),
                                                   _t((shape.vocab, h), device, dtype, scale=h ** -0.5), labels,
                                                   None, -100, "mean", shape.final_softcap, 1.0)))
    return calls


def tune(shape: ModelShape, batch: int, seq: int, device: torch.device, dtype: torch.dtype,
         lora_rank: int = 16) -> list:
    """Run each call of :func:`step_calls` through the dispatcher; returns the decisions."""
    from slipstream.dispatch import dispatcher

    before = set(id(d) for d in dispatcher().decisions())
    for spec, args in step_calls(shape, batch, seq, device, dtype, lora_rank):
        dispatcher().call(spec, args)
    return [d for d in dispatcher().decisions() if id(d) not in before]
