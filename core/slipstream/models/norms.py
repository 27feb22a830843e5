"""RMSNorm modules -> ``ops.rms_norm`` (instance-level forward replacement).

Candidates are found structurally: a module whose class name contains ``RMSNorm`` (or a
``torch.nn.RMSNorm``) with a 1-D ``weight`` and an epsilon attribute (``variance_epsilon`` for
Llama/Mistral/Qwen/Phi-3, ``eps`` for Gemma, ``epsilon``). Which formula it computes is then
*measured*: its own forward is compared with ``w * x / rms(x)`` (``offset=0``) and Gemma's
``(1 + w) * x / rms(x)`` (``offset=1``) on a random input; the matching offset is used, and a
module matching neither keeps its forward. Gemma's embedding scaling by ``sqrt(hidden)`` is a
separate module and is left untouched.

Output dtype follows the module: Llama-style norms (``w * x.to(input_dtype)``) return the
promotion of the weight and input dtypes (fp32 weights under bf16 activations give fp32, as in
transformers); Gemma-style norms return the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slipstream import ops
from slipstream.models.base import Build, close, instance_forward_reason, probe_input
from slipstream.train import recompute

EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


@dataclass(frozen=True)
class NormConfig:
    eps_attr: str
    offset: float


def rms_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    cfg: NormConfig = self._slipstream
    eps = getattr(self, cfg.eps_attr)
    if eps is None:  # torch.nn.RMSNorm(eps=None): the input dtype's machine epsilon
        eps = torch.finfo(x.dtype).eps
    eps = float(eps)
    out = normalize(x, self.weight, eps, cfg.offset)
    # Under lean activations the output is recomputed from (x, weight) when a later op saved it.
    return recompute.tag(out, normalize, x, self.weight, eps, cfg.offset, label="rms_norm")


def normalize(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """``ops.rms_norm`` with the module's output dtype (see the module docstring)."""
    out = ops.rms_norm(x, w, eps, offset)
    if offset == 0.0 and w.dtype != x.dtype:
        out = out.to(torch.promote_types(w.dtype, x.dtype))
    return out


def is_candidate(module: nn.Module) -> bool:
    if isinstance(module, getattr(nn, "RMSNorm", ())):
        return True
    return "rmsnorm" in type(module).__name__.lower()


def eps_attr_of(module: nn.Module) -> str | None:
    for attr in EPS_ATTRS:
        if hasattr(module, attr):
            value = getattr(module, attr)
            if value is None or isinstance(value, (int, float)):
                return attr
    return None


def choose_offset(module: nn.Module, eps_attr: str, expected: float | None) -> tuple[float | None, str]:
    """Run the module next to both RMSNorm forms; the offset that matches, or ``None`` and why."""
    w = module.weight
    if w.device.type == "meta":
        return expected, "" if expected is not None else "weights are on the meta device (cannot probe)"
    x = probe_input((2, 3, w.shape[0]), w.device, w.dtype, seed=1)
    eps = getattr(module, eps_attr)
    eps = torch.finfo(x.dtype).eps if eps is None else float(eps)
    order = (0.0, 1.0) if expected != 1.0 else (1.0, 0.0)
    errors = []
    with torch.no_grad():
        try:
            ref = module(x)
        except Exception as exc:  # noqa: BLE001 - any failure means "don't touch it"
            return None, f"its forward failed on a probe input ({type(exc).__name__}: {exc})"
        if not isinstance(ref, torch.Tensor):
            return None, f"its forward returns {type(ref).__name__}, not a tensor"
        for offset in order:
            mine = ops.spec("rms_norm").reference(x, w, eps, offset).to(ref.dtype)
            ok, err = close(mine, ref)
            if ok:
                if expected is not None and offset != expected:
                    return None, (
                        f"the family expects offset={expected} but the module computes "
                        f"offset={offset}; its formula changed"
                    )
                return offset, ""
            errors.append(f"offset={offset}: rel err {err:.1e}")
    return None, "its output matches neither w*x/rms(x) nor (1+w)*x/rms(x) (" + ", ".join(errors) + ")"


def apply(build: Build) -> None:
    for module in list(build.model.modules()):
        if not is_candidate(module):
            if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm"):
                build.skip(
                    module, "rms_norm", "LayerNorm (mean-centred, with bias) is not an RMSNorm; no op for it"
                )
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not weight.is_floating_point():
            build.skip(module, "rms_norm", "it has no 1-D floating-point weight (elementwise_affine=False?)")
            continue
        if getattr(module, "bias", None) is not None:
            build.skip(module, "rms_norm", "it has a bias, which ops.rms_norm does not take")
            continue
        eps_attr = eps_attr_of(module)
        if eps_attr is None:
            build.skip(module, "rms_norm", f"no epsilon attribute ({', '.join(EPS_ATTRS)})")
            continue
        reason = instance_forward_reason(module)
        if reason:
            build.skip(module, "rms_norm", reason)
            continue
        offset, reason = choose_offset(module, eps_attr, build.adapter.norm_offset)
        if offset is None:
            build.skip(module, "rms_norm", reason)
            continue
        build.set_forward(module, rms_norm_forward, NormConfig(eps_attr, offset))
        build.ok(module, "rms_norm", f"offset={offset:g}, eps from .{eps_attr}")
