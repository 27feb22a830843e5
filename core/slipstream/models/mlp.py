"""Gated MLPs -> ``ops.swiglu`` / ``ops.geglu`` between the projections (instance-level forward).

Two structural shapes are recognised:

* ``gate_proj`` / ``up_proj`` / ``down_proj`` (Llama, Mistral, Qwen2/3, Gemma 1/2/3):
  ``down(act(gate(x)) * up(x))``;
* ``gate_up_proj`` / ``down_proj`` (Phi-3): the fused projection is split in half, gate first.

The activation module decides the op: SiLU -> ``swiglu``; tanh-approximated GELU (Gemma's
``gelu_pytorch_tanh``, ``gelu_new``, ``gelu_fast``) -> ``geglu(approximate="tanh")``; exact GELU ->
``geglu(approximate="none")``. The projections are called as modules, so peft LoRA layers
inside the MLP keep working (and are accelerated by the LoRA pass); when gate_proj and up_proj are
both accelerated LoRA layers, one ``ops.lora_linear_group`` call computes them
(:mod:`slipstream.models.lora_groups`). Each mapping is probed against the module's own forward
before it is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slipstream import ops
from slipstream.models import lora_groups
from slipstream.models.base import (
    Build,
    close,
    eval_mode,
    float_dtype,
    instance_forward_reason,
    module_device,
    probe_input,
)
from slipstream.ops.hints import inputs_expire_in_backward, output_values_unused
from slipstream.train import recompute

ACT_ATTRS = ("act_fn", "activation_fn", "act")


@dataclass(frozen=True)
class MlpConfig:
    op: str  # "swiglu" or "geglu"
    approximate: str  # geglu only
    act_attr: str
    fused: bool
    # the decoder layer adds the output straight into the residual (Adapter.mlp_output_to_residual):
    # a checkpoint recompute never reads it, so the down projection may skip its output GEMM
    output_to_residual: bool = False


def classify_activation(act: object) -> tuple[str, str] | None:
    """``(op, approximate)`` for an activation module, or ``None`` if no gated op computes it."""
    from transformers import activations as A

    silu = tuple(c for c in (getattr(A, "SiLUActivation", None), nn.SiLU) if c is not None)
    tanh = tuple(
        c
        for c in (
            getattr(A, "GELUTanh", None),
            getattr(A, "PytorchGELUTanh", None),
            getattr(A, "NewGELUActivation", None),
            getattr(A, "FastGELUActivation", None),
        )
        if c is not None
    )
    exact = tuple(c for c in (getattr(A, "GELUActivation", None),) if c is not None)
    if isinstance(act, silu):
        return "swiglu", "none"
    if isinstance(act, nn.GELU):
        return "geglu", act.approximate
    if tanh and isinstance(act, tanh):
        return "geglu", "tanh"
    if exact and isinstance(act, exact):
        return "geglu", "none"
    return None


def gate_op(cfg: MlpConfig, gate: torch.Tensor, up: torch.Tensor, reference: bool = False) -> torch.Tensor:
    """The configured gated op (``reference=True``: its reference, as the install-time probe uses)."""
    if gate.dtype != up.dtype:
        common = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(common), up.to(common)
    if cfg.op == "swiglu":
        return (ops.spec("swiglu").reference if reference else ops.swiglu)(gate, up)
    return (ops.spec("geglu").reference if reference else ops.geglu)(gate, up, cfg.approximate)


def gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return gated_mlp_forward_with(self, self._slipstream, x)


def in_features(module: nn.Module) -> int | None:
    n = getattr(module, "in_features", None)
    if isinstance(n, int):
        return n
    w = getattr(module, "weight", None)
    return w.shape[-1] if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def structure(module: nn.Module) -> tuple[bool, str] | None:
    """``(fused, act_attr)`` if ``module`` looks like a gated MLP, else ``None``."""
    act_attr = next((a for a in ACT_ATTRS if isinstance(getattr(module, a, None), nn.Module)), None)
    if act_attr is None or not isinstance(getattr(module, "down_proj", None), nn.Module):
        return None
    if all(isinstance(getattr(module, a, None), nn.Module) for a in ("gate_proj", "up_proj")):
        return False, act_attr
    if isinstance(getattr(module, "gate_up_proj", None), nn.Module):
        return True, act_attr
    return None


def probe(module: nn.Module, cfg: MlpConfig) -> str:
    first = module.gate_up_proj if cfg.fused else module.gate_proj
    k = in_features(first)
    device = module_device(module)
    if k is None or device is None or device.type == "meta":
        return "cannot build a probe input (unknown in_features or meta device)"
    x = probe_input((2, 3, k), device, float_dtype(module), seed=2)
    with torch.no_grad(), eval_mode(module):
        try:
            ref = type(module).forward(module, x)
            mine = gated_mlp_forward_with(module, cfg, x, reference=True)
        except Exception as exc:  # noqa: BLE001
            return f"probe forward failed ({type(exc).__name__}: {exc})"
    if not isinstance(ref, torch.Tensor):
        return f"its forward returns {type(ref).__name__}, not a tensor"
    ok, err = close(mine.to(ref.dtype), ref)
    return (
        ""
        if ok
        else (
            f"its forward is not down(act(gate) * up) with {cfg.op} (probe rel err {err:.1e}); "
            "it does something extra"
        )
    )


def gated_mlp_forward_with(
    module: nn.Module, cfg: MlpConfig, x: torch.Tensor, reference: bool = False
) -> torch.Tensor:
    if cfg.fused:
        gate, up = module.gate_up_proj(x).chunk(2, dim=-1)
    else:
        # Both projections accelerated peft LoRA layers: one lora_linear_group call reads x once.
        pair = None if reference else lora_groups.run_pair(module, x)
        gate, up = pair if pair is not None else (module.gate_proj(x), module.up_proj(x))
    # In a checkpoint recompute gate and up feed nothing but the gated op, and that graph is
    # differentiated once: its backward may write d(gate), d(up) over them (ops.hints).
    with inputs_expire_in_backward(recompute.recomputing() and not reference):
        act = gate_op(cfg, gate, up, reference)
    # Under lean activations, act(gate) * up is recomputed from gate and up (which the gated op saves
    # anyway) when the down projection's backward needs it, instead of being kept.
    act = recompute.tag(act, gate_op, cfg, gate, up, reference, label=cfg.op)
    # act feeds only the down projection: in a recompute its backward may write d(act) over act
    with inputs_expire_in_backward(recompute.recomputing() and not reference):
        if cfg.output_to_residual and not reference and recompute.recomputing():
            with output_values_unused():
                return module.down_proj(act)
        return module.down_proj(act)


def apply(build: Build) -> None:
    for module in list(build.model.modules()):
        found = structure(module)
        if found is None:
            if type(module).__name__.upper().endswith("MLP"):
                build.skip(
                    module,
                    "swiglu",
                    "not a gated MLP (no gate_proj/up_proj or gate_up_proj + down_proj "
                    "+ activation); no fused op for it",
                )
            continue
        fused, act_attr = found
        kind = classify_activation(getattr(module, act_attr))
        if kind is None:
            act = type(getattr(module, act_attr)).__name__
            build.skip(module, "swiglu", f"activation {act} has no gated op (swiglu/geglu)")
            continue
        op, approximate = kind
        reason = instance_forward_reason(module)
        if reason:
            build.skip(module, op, reason)
            continue
        cfg = MlpConfig(op, approximate, act_attr, fused, build.adapter.mlp_output_to_residual)
        reason = probe(module, cfg)
        if reason:
            build.skip(module, op, reason)
            continue
        build.set_forward(module, gated_mlp_forward, cfg)
        detail = "fused gate_up_proj split in half" if fused else "gate_proj/up_proj/down_proj"
        if op == "geglu":
            detail += f", approximate={approximate!r}"
        build.ok(module, op, detail)
