"""peft LoRA layers -> ``ops.lora_linear`` (instance-level forward override on peft's layer types).

Mapped layer types: ``peft.tuners.lora.Linear`` over a dense ``nn.Linear``, and
``peft.tuners.lora.bnb.Linear4bit`` over a bitsandbytes ``Linear4bit`` (its ``Params4bit`` is
wrapped, without copying, as a :class:`slipstream.quant.QuantizedWeight`, cached per weight).

A layer is accelerated when, at :func:`slipstream.models.accelerate` time, exactly one adapter is
active, it is not merged, its dropout is the identity (``lora_dropout=0``), it is plain LoRA (no
DoRA or other variant, no ``lora_bias``) and ``fan_in_fan_out`` is off; otherwise peft's forward is
kept and the report says why. Things that can change later are checked on every call (cheap
attribute reads): if the layer has since been merged, adapters were disabled
(``with model.disable_adapter():``), the active adapter set changed or extra arguments
(``adapter_names=`` mixed batches) are passed, that call runs peft's own forward.

Layers that read one input (q/k/v, gate/up) are grouped into one ``ops.lora_linear_group`` call
by :mod:`slipstream.models.lora_groups`; ``LoraState.group`` links a layer to its group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from slipstream import ops
from slipstream.kernels._casts import begin_step
from slipstream.models.base import Build, instance_forward_reason
from slipstream.quant import QuantizedWeight

if TYPE_CHECKING:
    from slipstream.models.lora_groups import LoraGroup


@dataclass
class LoraState:
    quantized: bool
    transposed: bool = False  # transformers' Conv1D (GPT-2): weight stored (in, out)
    cache: tuple | None = None  # (param, data_ptr, QuantizedWeight)
    group: LoraGroup | None = None  # siblings sharing its input (slipstream.models.lora_groups)


def lora_types() -> tuple[type | None, type | None, type | None]:
    """``(LoraLayer, lora.Linear, lora.bnb.Linear4bit)``; ``None`` for what isn't importable."""
    try:
        from peft.tuners.lora import Linear, LoraLayer
    except ImportError:
        return None, None, None
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except (ImportError, AttributeError):
        Linear4bit = None  # noqa: N806
    return LoraLayer, Linear, Linear4bit


def bnb_linear4bit() -> type | None:
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001 - a broken bitsandbytes install only disables 4-bit mapping
        return None
    return getattr(bnb.nn, "Linear4bit", None)


def is_conv1d(base: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``x @ W + b`` with ``W`` (in, out), i.e. a transposed Linear."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return type(base) is Conv1D


def is_identity(dropout: nn.Module) -> bool:
    return isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and dropout.p == 0)


def adapter_reason(layer: nn.Module) -> tuple[str | None, str]:
    """``(adapter name, "")`` if the fast path applies to ``layer`` now, else ``(None, why)``."""
    if layer.disable_adapters:
        return None, "adapters are disabled"
    if layer.merged:
        return None, "the adapter is merged into the base weight"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None, f"{len(active)} active adapters (ops.lora_linear takes exactly one)"
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None, "DoRA / a LoRA variant is used"
    if not is_identity(layer.lora_dropout[name]):
        return None, f"lora_dropout p={getattr(layer.lora_dropout[name], 'p', '?')} > 0"
    if getattr(layer.lora_B[name], "bias", None) is not None:
        return None, "lora_bias=True"
    if not getattr(layer, "cast_input_dtype_enabled", True):
        return None, "peft's input dtype casting is disabled"
    return name, ""


def base_weight(layer: nn.Module, base: nn.Module) -> torch.Tensor | QuantizedWeight | None:
    state: LoraState = layer._slipstream
    if not state.quantized:
        return base.weight.t() if state.transposed else base.weight
    param = base.weight
    cached = state.cache
    if cached is not None and cached[0] is param and cached[1] == param.data_ptr():
        return cached[2]
    if getattr(param, "quant_state", None) is None:
        return None  # not quantised yet (still on the CPU before .cuda()): peft's path
    qw = QuantizedWeight.from_bnb(param)
    state.cache = (param, param.data_ptr(), qw)
    return qw


def operands(layer: nn.Module) -> tuple | None:
    """``(weight, lora_a, lora_b, scaling, bias)`` for ``ops.lora_linear`` when the layer's single active
    adapter is usable right now (see :func:`adapter_reason`), else ``None`` (peft's forward runs)."""
    name, _ = adapter_reason(layer)
    if name is None:
        return None
    base = layer.get_base_layer()
    weight = base_weight(layer, base)
    if weight is None:
        return None
    return weight, layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]), base.bias


def lora_forward(self: nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    if not args and not kwargs:
        group = self._slipstream.group
        if group is not None and group.lazy:  # q/k/v: served by one group call when the siblings allow
            out = group.forward(self, x)
            if out is not None:
                return out
        found = operands(self)
        if found is not None:
            return ops.lora_linear(x, *found)
    return type(self).forward(self, x, *args, **kwargs)


def apply(build: Build) -> None:
    lora_layer, dense_cls, q4_cls = lora_types()
    if lora_layer is None:
        return
    bnb4 = bnb_linear4bit()
    for module in list(build.model.modules()):
        if not isinstance(module, lora_layer):
            continue
        base = module.get_base_layer()
        kind = type(module)
        transposed = False
        if kind is dense_cls and isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward:
            quantized = False
        elif kind is dense_cls and is_conv1d(base):
            quantized, transposed = False, True
        elif q4_cls is not None and kind is q4_cls and bnb4 is not None and isinstance(base, bnb4):
            quantized = True
        elif kind is dense_cls and bnb4 is not None and type(base) is bnb4:
            # peft picks its dense lora.Linear when the model isn't flagged ``is_loaded_in_4bit`` (layers
            # quantised by hand); the base is still bitsandbytes' NF4/FP4 Linear4bit.
            quantized = True
        else:
            build.skip(
                module,
                "lora_linear",
                f"peft layer lora.{kind.__name__} over {type(base).__name__} has no ops.lora_linear mapping",
            )
            continue
        if getattr(module, "fan_in_fan_out", False) != transposed:
            build.skip(
                module,
                "lora_linear",
                f"fan_in_fan_out={not transposed} does not match the {type(base).__name__} base layer",
            )
            continue
        name, reason = adapter_reason(module)
        if name is None:
            build.skip(module, "lora_linear", reason)
            continue
        reason = instance_forward_reason(module)
        if reason:
            build.skip(module, "lora_linear", reason)
            continue
        build.set_forward(module, lora_forward, LoraState(quantized, transposed))
        r = module.lora_A[name].weight.shape[0]
        base_kind = "NF4/FP4 base" if quantized else ("Conv1D base (W.T)" if transposed else "dense base")
        build.ok(module, "lora_linear", f"adapter {name!r}, r={r}, {base_kind}")
    if any(m.op == "lora_linear" for m in build.accelerated):
        install_step_hook(build.model)


def _new_step(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of an accelerated model: adapter casts from the previous step are dropped
    (:mod:`slipstream.kernels._casts`), the ones made in this forward serve its recompute and backward."""
    begin_step()


def install_step_hook(model: nn.Module) -> None:
    if not any(h is _new_step for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_new_step)


def remove_step_hook(model: nn.Module) -> None:
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _new_step:
            del model._forward_pre_hooks[key]
