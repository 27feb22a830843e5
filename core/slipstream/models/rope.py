"""Rotary embedding -> ``ops.rope``: a scoped, reversible swap of ``apply_rotary_pos_emb``.

transformers' attention modules call their modeling module's global ``apply_rotary_pos_emb(q,
k, cos, sin)`` by name, so there is no per-instance hook for it. This is the one place where a
module-level function is swapped (DESIGN principle 5 allows it when scoped, reversible and
documented):

* **Scoped.** The replacement only uses ``ops.rope`` while a *slipstream-accelerated attention
  module* is running: each such module gets an instance-level forward that sets a context
  variable around its class forward. Any other model of the same architecture in the process
  (e.g. an unaccelerated baseline) still runs transformers' own function, and gradient
  checkpointing's recomputation (which re-enters the accelerated module) sees the same code path.
* **Reversible.** The original is kept; the swap is reference-counted per modeling module and
  restored when the last accelerated model is de-accelerated (only if nobody replaced the
  global since; otherwise it is left alone).
* **Verified.** Before swapping, the original function and the ``ops.rope`` path are run on the
  same random q/k/cos/sin; the swap is skipped if they disagree (e.g. interleaved rotary).

``ops.rope`` handles the common layout: q (B, Hq, S, D), k (B, Hk, S, D), cos/sin (B, S, Dr)
with ``unsqueeze_dim=1``. A partial rotary dimension ``Dr < D`` (Phi-3 ``partial_rotary_factor``)
rotates the first ``Dr`` features and passes the rest through, as transformers does. Any other
call shape falls through to the original function.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys
import threading
import types
from dataclasses import dataclass

import torch
from torch import nn

from slipstream import ops
from slipstream.models.base import Build, close, instance_forward_reason, probe_input

FUNCTION = "apply_rotary_pos_emb"

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("slipstream_rope_active", default=False)
_LOCK = threading.Lock()


@dataclass
class _Patch:
    module: types.ModuleType
    original: object
    wrapper: object
    users: int


_PATCHES: dict[str, _Patch] = {}


def rope_via_ops(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: object, **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``ops.rope`` for transformers' ``apply_rotary_pos_emb`` arguments, or ``None`` if not expressible.

    ``_rope=`` replaces the op (the probe passes the op's reference: it checks the *meaning*, and
    must not make the dispatcher tune at a probe shape).
    """
    rope = kwargs.pop("_rope", ops.rope)
    unsqueeze_dim = kwargs.pop("unsqueeze_dim", args[0] if args else 1)
    if kwargs or len(args) > 1 or unsqueeze_dim != 1:
        return None
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (q, k, cos, sin)):
        return None
    if q.dim() != 4 or k.dim() != 4 or cos.dim() not in (2, 3) or cos.shape != sin.shape:
        return None
    d, dr = q.shape[-1], cos.shape[-1]
    if dr % 2 or dr > d or k.shape[-1] != d:
        return None
    if dr == d:
        return rope(q, k, cos, sin, None)
    q_rot, k_rot = rope(q[..., :dr], k[..., :dr], cos, sin, None)
    return torch.cat((q_rot, q[..., dr:]), dim=-1), torch.cat((k_rot, k[..., dr:]), dim=-1)


def make_wrapper(original):  # noqa: ANN001, ANN201 - mirrors the wrapped function's signature
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):  # noqa: ANN001, ANN202
        if _ACTIVE.get():
            out = rope_via_ops(q, k, cos, sin, *args, **dict(kwargs))
            if out is not None:
                return out
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.__slipstream_original__ = original
    return apply_rotary_pos_emb


def rope_scope_forward(self: nn.Module, *args: object, **kwargs: object) -> object:
    """Instance forward of an accelerated attention module: its class forward, with ops.rope active."""
    token = _ACTIVE.set(True)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _ACTIVE.reset(token)


def probe_function(fn, head_dim: int) -> str:  # noqa: ANN001
    """``""`` if ``fn`` agrees with the ops.rope path on random inputs, else why not."""
    dev, dt = torch.device("cpu"), torch.float32
    q = probe_input((2, 4, 5, head_dim), dev, dt, seed=3)
    k = probe_input((2, 2, 5, head_dim), dev, dt, seed=4)
    half = probe_input((2, 5, head_dim // 2), dev, dt, seed=5) * 3
    angles = torch.cat((half, half), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    try:
        with torch.no_grad():
            ref = fn(q, k, cos, sin)
            mine = rope_via_ops(q, k, cos, sin, _rope=ops.spec("rope").reference)
    except Exception as exc:  # noqa: BLE001
        return f"probe call failed ({type(exc).__name__}: {exc})"
    if mine is None or not isinstance(ref, tuple) or len(ref) != 2:
        return "its call shape is not apply_rotary_pos_emb(q, k, cos, sin) -> (q, k)"
    errs = [close(a, b) for a, b in zip(mine, ref, strict=True)]
    if not all(ok for ok, _ in errs):
        return (
            f"{FUNCTION} is not the rotate-half form ops.rope computes "
            f"(probe rel err {max(e for _, e in errs):.1e})"
        )
    return ""


def acquire(modeling: types.ModuleType) -> _Patch:
    with _LOCK:
        patch = _PATCHES.get(modeling.__name__)
        if patch is None or getattr(modeling, FUNCTION, None) is not patch.wrapper:
            original = getattr(modeling, FUNCTION)
            patch = _Patch(modeling, original, make_wrapper(original), 0)
            setattr(modeling, FUNCTION, patch.wrapper)
            _PATCHES[modeling.__name__] = patch
        patch.users += 1
        return patch


def release(patch: _Patch) -> None:
    with _LOCK:
        patch.users -= 1
        if patch.users > 0:
            return
        if getattr(patch.module, FUNCTION, None) is patch.wrapper:
            setattr(patch.module, FUNCTION, patch.original)
        if _PATCHES.get(patch.module.__name__) is patch:
            del _PATCHES[patch.module.__name__]


def home_modules(model: nn.Module) -> set[str]:
    """Modules whose classes make up the architecture: the model's and its decoder's (a user subclass
    of ``LlamaForCausalLM`` defined elsewhere still has a ``LlamaModel`` decoder)."""
    homes = {type(model).__module__}
    prefix = getattr(model, "base_model_prefix", "")
    decoder = getattr(model, prefix, None) if prefix else None
    if isinstance(decoder, nn.Module):
        homes.add(type(decoder).__module__)
    return homes


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The architecture's attention modules: classes named ``*Attention`` from its modeling module(s)."""
    homes = home_modules(model)
    return [
        m for m in model.modules() if type(m).__name__.endswith("Attention") and type(m).__module__ in homes
    ]


def calls_rope(cls: type) -> bool:
    """Whether ``cls.forward``'s code looks the global ``apply_rotary_pos_emb`` up (no source is read)."""
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    return code is not None and FUNCTION in code.co_names


def apply(build: Build) -> None:
    by_home: dict[str, list[nn.Module]] = {}
    for m in attention_modules(build.model):
        by_home.setdefault(type(m).__module__, []).append(m)
    for home, modules in by_home.items():
        apply_to(build, sys.modules[home], modules)


def apply_to(build: Build, modeling: types.ModuleType, modules: list[nn.Module]) -> None:
    original = getattr(modeling, FUNCTION, None)
    if original is None:
        for m in modules:
            build.skip(m, "rope", f"{modeling.__name__} has no {FUNCTION} (no rotary embedding to map)")
        return
    if not build.adapter.rope:
        for m in modules:
            build.skip(
                m,
                "rope",
                f"architecture {type(build.model).__name__} is not in the adapter table; its "
                "rotary layout is not verified",
            )
        return
    original = getattr(original, "__slipstream_original__", original)
    uses = [m for m in modules if calls_rope(type(m))]
    for m in modules:
        if m not in uses:
            build.skip(m, "rope", f"{type(m).__name__}.forward does not call {FUNCTION}")
    if not uses:
        return
    head_dim = int(getattr(uses[0], "head_dim", 0) or 16)
    reason = probe_function(original, head_dim + head_dim % 2)
    if reason:
        for m in uses:
            build.skip(m, "rope", reason)
        return
    ready = []
    for m in uses:
        reason = instance_forward_reason(m)
        if reason:
            build.skip(m, "rope", reason)
        else:
            ready.append(m)
    if ready:
        build.patches.append(acquire(modeling))
    for m in ready:
        build.set_forward(m, rope_scope_forward, None)
        build.ok(m, "rope", f"{modeling.__name__}.{FUNCTION} -> ops.rope while this module runs")
