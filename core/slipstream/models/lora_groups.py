"""LoRA projections that read one input -> one ``ops.lora_linear_group`` call (q/k/v, gate/up).

Each peft LoRA projection run on its own reads its input once for ``x @ A.T``, once more in
backward for ``dA``, and autograd sums the projections' input gradients with separate adds. A group
reads ``x`` once per pass for every adapter and sums ``dX`` inside one node. Two kinds, found after
the LoRA pass has accelerated the layers (:func:`apply`), listed in the report's ``groups``:

* **gate/up** (eager): the gated-MLP forward (:mod:`slipstream.models.mlp`) computes both
  projections itself; it calls :func:`run_pair`, which runs the group when both are accelerated
  peft LoRA layers usable right now, else returns ``None`` and the MLP calls the modules.
* **q/k/v** (lazy): transformers' attention forward calls ``self.q_proj(h)``, ``self.k_proj(h)``,
  ``self.v_proj(h)`` on one tensor object ``h``. The first member called (q_proj) computes every
  member with one group call, returns its own output and *stashes* the others' on the group, keyed
  by ``h``'s identity: a weakref to ``h``, ``h._version`` and the grad mode. A member's forward
  returns its stash only when called with that same object at that same version under that grad
  mode; otherwise it drops the stash and computes on its own (:meth:`LoraGroup.forward`). Members
  are the accelerated LoRA layers among q/k/v (peft's default ``q_proj``/``v_proj`` targets: a pair).
  Known cost: a module that feeds k/v another tensor than q (cross-attention) computes them twice.

Stash lifetime. A lazy group only groups while its parent module's forward runs: a forward
pre-hook on the parent arms it and a forward hook (``always_call``, so also on exceptions) disarms
it and drops every stash; the first member's next call drops stale ones too. So a stashed output
never outlives the parent's forward, even when its layer is never called, and nothing holds ``h``
itself. That covers eval and ``no_grad`` (the grad mode is in the key), checkpoint recompute
(the parent's forward runs again, inside its hooks), lean and offloaded layers (whose forward
runs once, or under ``no_grad`` then again in backward) and merged or disabled adapters (the
conditions of :func:`slipstream.models.lora.adapter_reason` are checked for every member on every
group call; one failing member means no group for that call).

Opt-out: ``SLIPSTREAM_LORA_GROUPS=0`` or ``accelerate(model, lora_groups=False)``; each projection
then runs its own ``lora_linear``.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from slipstream import ops
from slipstream.models.base import Build
from slipstream.models.lora import LoraState, lora_forward, operands

ENV = "SLIPSTREAM_LORA_GROUPS"
ATTR = "_slipstream_lora_group"  # on the parent of a lazy group
ATTENTION = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj")


def enabled(flag: bool | None = None) -> bool:
    """``flag`` if given, else ``SLIPSTREAM_LORA_GROUPS`` (default on; ``0/false/no/off`` turn it off)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(eq=False)
class Stash:
    """One member's output from a lazy group call, valid for the same input object and version."""

    ref: weakref.ref
    version: int
    grad: bool
    out: torch.Tensor

    def matches(self, x: torch.Tensor) -> bool:
        return self.ref() is x and x._version == self.version and torch.is_grad_enabled() == self.grad


@dataclass(eq=False)
class LoraGroup:
    """Sibling LoRA layers of one parent that read the same input, in call order.

    ``lazy``: q/k/v style (see the module docstring); ``depth`` > 0 while the parent's forward runs.
    ``hits`` / ``misses``: stashes served / dropped because a member got another input.
    """

    layers: tuple[nn.Module, ...] = field(repr=False)
    names: tuple[str, ...]
    lazy: bool
    depth: int = 0
    stashes: list[Stash | None] = field(default_factory=list, repr=False)
    hits: int = 0
    misses: int = 0

    def __post_init__(self) -> None:
        self.clear()

    @property
    def label(self) -> str:
        return "+".join(self.names)

    def clear(self) -> None:
        self.stashes = [None] * len(self.layers)

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Every member's output for ``x`` from one group call, or ``None`` if a member can't join now."""
        if torch.compiler.is_compiling():
            return None  # Dynamo traces the per-layer path (each dispatched op is its reference there)
        operands = []
        for layer in self.layers:
            got = _operands(layer, bypasses_call=not self.lazy)
            if got is None:
                return None
            operands.append(got)
        weights, a_s, b_s, scalings, biases = zip(*operands, strict=True)
        return ops.lora_linear_group(x, weights, a_s, b_s, scalings, biases)

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """A lazy member's forward: its output from a stash or a new group call, or ``None`` (compute alone).

        A member with a stash gets it if ``x`` is the stashed input (same object, version, grad mode),
        else drops it and computes alone. A member without one (the first of the parent's calls: q_proj
        in transformers' order) starts a group call while the parent's forward runs: it returns its own
        output and stashes the others', replacing any stale stashes.
        """
        if torch.compiler.is_compiling():
            return None  # Dynamo traces the per-layer path; weakrefs and stashes are not traceable
        i = next((j for j, m in enumerate(self.layers) if m is layer), None)
        if i is None:
            return None
        stash = self.stashes[i]
        if stash is not None:
            self.stashes[i] = None
            if isinstance(x, torch.Tensor) and stash.matches(x):
                self.hits += 1
                return stash.out
            self.misses += 1
            return None
        self.clear()
        if self.depth <= 0 or not isinstance(x, torch.Tensor) or x.is_inference():
            return None  # outside the parent's forward nothing would drop a stash; inference tensors: no version
        outs = self.run(x)
        if outs is None:
            return None
        ref, version, grad = weakref.ref(x), x._version, torch.is_grad_enabled()
        self.stashes = [None if j == i else Stash(ref, version, grad, o) for j, o in enumerate(outs)]
        return outs[i]


def _hooked(module: nn.Module) -> bool:
    """``module`` has forward hooks (its own or global) that calling the op directly would skip."""
    from torch.nn.modules import module as nn_module

    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(nn_module, "_global_forward_hooks", None)
                or getattr(nn_module, "_global_forward_pre_hooks", None))


def _operands(layer: nn.Module, bypasses_call: bool) -> tuple | None:
    """``(weight, lora_a, lora_b, scaling, bias)`` of an accelerated LoRA layer usable now, else ``None``."""
    if not isinstance(layer.__dict__.get("_slipstream"), LoraState):
        return None  # deaccelerated, or its forward replaced since
    if bypasses_call and _hooked(layer):
        return None
    return operands(layer)


def run_pair(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(gate, up)`` from one group call when ``mlp``'s gate/up form an eager group usable now, else ``None``."""
    state = mlp.gate_proj.__dict__.get("_slipstream")
    group = getattr(state, "group", None)
    if group is None or group.lazy or group.layers != (mlp.gate_proj, mlp.up_proj):
        return None
    outs = group.run(x)
    return None if outs is None else (outs[0], outs[1])


# ----------------------------------------------------------------------------- parent hooks (lazy groups)
def _enter(module: nn.Module, args: tuple) -> None:
    group = module.__dict__.get(ATTR)
    if group is not None:
        group.depth += 1
        group.clear()


def _exit(module: nn.Module, args: tuple, output: object) -> None:
    group = module.__dict__.get(ATTR)
    if group is not None:
        group.depth = max(0, group.depth - 1)
        group.clear()


def undo(model: nn.Module) -> None:
    """Remove every lazy group's parent hooks and state under ``model`` (found by scanning, so a
    ``copy.deepcopy`` of an accelerated model is undone on its own modules)."""
    for m in model.modules():
        m.__dict__.pop(ATTR, None)
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, fn in hooks.items() if fn is _enter or fn is _exit]:
                del hooks[key]
                m._forward_hooks_always_called.pop(key, None)


# ----------------------------------------------------------------------------- building
def _accelerated(layer: object) -> bool:
    if not isinstance(layer, nn.Module) or not isinstance(layer.__dict__.get("_slipstream"), LoraState):
        return False
    return getattr(layer.__dict__.get("forward"), "__func__", None) is lora_forward


def _mlp_calls_pairs(parent: nn.Module) -> bool:
    """``parent`` runs slipstream's gated-MLP forward over separate gate/up projections (which calls run_pair)."""
    from slipstream.models.mlp import MlpConfig, gated_mlp_forward

    cfg = parent.__dict__.get("_slipstream")
    forward = getattr(parent.__dict__.get("forward"), "__func__", None)
    return isinstance(cfg, MlpConfig) and not cfg.fused and forward is gated_mlp_forward


def apply(build: Build, on: bool = True) -> None:
    """Group accelerated LoRA siblings (after the LoRA pass); record each group in the report."""
    if not on:
        build.note(f"LoRA projection groups off ({ENV}=0 or lora_groups=False): q/k/v and gate/up run one "
                   "lora_linear each")
        return
    for parent in list(build.model.modules()):
        for names, lazy in ((ATTENTION, True), (MLP, False)):
            present = [(n, getattr(parent, n, None)) for n in names]
            if not all(isinstance(m, nn.Module) for _, m in present[:2]):
                continue  # not this kind of parent (gate_proj/up_proj, or q_proj/k_proj, must both exist)
            members = [(n, m) for n, m in present if _accelerated(m)]
            if len(members) < 2:
                continue
            if not lazy and (len(members) != 2 or not _mlp_calls_pairs(parent)):
                build.skip(parent, "lora_linear_group", "gate_proj/up_proj not grouped: the MLP's forward is not "
                                                        "slipstream's gated-MLP forward")
                continue
            group = LoraGroup(tuple(m for _, m in members), tuple(n for n, _ in members), lazy)
            for _, m in members:
                m._slipstream.group = group
            if lazy:
                object.__setattr__(parent, ATTR, group)
                parent.register_forward_pre_hook(_enter)
                parent.register_forward_hook(_exit, always_call=True)
            build.group(parent, f"{group.label} grouped")
