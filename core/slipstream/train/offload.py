"""Gradient checkpointing policies for transformers decoder layers, including offloaded checkpointing.

:func:`apply_checkpointing` sets the policy through transformers' own extension point: every
``GradientCheckpointingLayer`` (the decoder layers) has a ``gradient_checkpointing`` flag and a
``_gradient_checkpointing_func`` it calls as ``func(partial(forward, layer, **kwargs), *args)``.

- ``"lean"``: no recompute of the layer; its cheap elementwise outputs (RMSNorm, the gated
  activation) are recomputed when backward needs them instead of being kept
  (:mod:`slipstream.train.recompute`): about a third less activation memory for 3-5 % of the
  step time (H100, W8B). On CUDA the lean layers replay from graphs too
  (:mod:`slipstream.train.lean_graphs`).
- ``"checkpoint"``: ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``; on CUDA with
  CUDA graphs on, :class:`OffloadedCheckpoint` with ``offload=False`` (the input stays on the
  device, the layers replay from graphs: :mod:`slipstream.train.graphs`).
- ``"offload"``: :class:`OffloadedCheckpoint`. Like checkpointing, only each layer's input is kept
  and the layer is recomputed in backward, but that input lives in pinned host memory: it is
  copied out on a side stream during forward, and during the backward of layer ``i`` the input of
  layer ``i - 1`` is already being copied back on the side stream, so the copy overlaps compute.
  The recompute runs under lean activations, so the one layer whose activations are alive at a
  time holds about a third less (what bounds the longest sequence that trains).
  On the CPU there is no device memory to free: it degrades to ``"checkpoint"`` with a note.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from slipstream.train import attention_stash
from slipstream.train.graphs import LayerGraphs, enabled_for
from slipstream.train.lean_graphs import GraphedLean, lean_graphs_enabled
from slipstream.train.recompute import lean_activations, lean_forward, recomputing_layer

POLICY_NAMES = {False: "none", None: "none", True: "checkpoint", "none": "none", "lean": "lean",
                "checkpoint": "checkpoint", "offload": "offload"}


def policy_name(value: bool | str | None) -> str:
    try:
        return POLICY_NAMES[value]
    except (KeyError, TypeError):
        raise ValueError(f"gradient_checkpointing must be False, True, \"lean\", \"offload\" or \"auto\", "
                         f"got {value!r}") from None


def checkpoint_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules transformers checkpoints: its ``GradientCheckpointingLayer`` s (decoder layers)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers without the layer base class
        return [m for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_checkpointing(model: torch.nn.Module, policy: bool | str | None, *, layers: int | None = None,
                        lean: bool = False, force_offload: bool = False, verbose: bool = True,
                        graphs: bool | None = None, stash_layers: int = 0) -> str:
    """Set ``policy`` (False/True/"lean"/"offload", or a policy name) on ``model``'s decoder layers.

    ``layers`` limits checkpointing to the first ``layers`` decoder layers (the memory planner's
    ``partial`` policy); the others keep their activations, leanly if ``lean`` (``"lean"`` is
    ``lean`` for every layer). Returns the policy applied (``"none"``, ``"lean"``,
    ``"checkpoint"`` or ``"offload"``). ``force_offload`` runs the offloading code path on the CPU
    too (tests), where it copies into host memory. ``graphs``: replay checkpointed and lean layers from
    CUDA graphs (``None``: on CUDA unless ``SLIPSTREAM_CUDA_GRAPHS=0``, lean layers also unless
    ``SLIPSTREAM_LEAN_GRAPHS=0``; see :mod:`slipstream.train.graphs`, :mod:`slipstream.train.lean_graphs`).
    ``stash_layers``: with ``"offload"`` and no graphs, up to this many layers at a time keep their
    attention output for the recompute (:mod:`slipstream.train.attention_stash`).
    """
    name = policy_name(policy)
    all_layers = checkpoint_layers(model)
    if layers is not None and not 0 <= layers <= len(all_layers):
        raise ValueError(f"layers must be between 0 and the model's {len(all_layers)} decoder layers, got {layers}")
    if name != "none" and not all_layers:
        raise ValueError(f"{type(model).__name__} has no transformers GradientCheckpointingLayer modules, so "
                         f"gradient checkpointing cannot be applied; use gradient_checkpointing=False")
    device = _device_of(model)
    if name == "offload" and device.type == "cpu" and not force_offload:
        if verbose:
            print("gradient checkpointing: offload degrades to plain checkpointing on the CPU "
                  "(activations already live in host memory)")
        name = "checkpoint"
    func: Callable | None = None
    use_graphs = enabled_for(device, graphs)
    if name == "checkpoint":
        # with CUDA graphs: the offload path without the offload, which replays layers from graphs
        func = OffloadedCheckpoint(device, offload=False, graphs=True) if use_graphs else plain_checkpoint
    elif name == "offload":
        func = OffloadedCheckpoint(device, graphs=use_graphs, stash_layers=stash_layers)
    lean = lean or name == "lean"
    lean_func: Callable = lean_forward
    layer_graphs = getattr(func, "graphs", None)
    some_lean = lean and (layers is not None or func is None)
    if some_lean and use_graphs and lean_graphs_enabled():
        layer_graphs = layer_graphs or LayerGraphs(device)
        lean_func = GraphedLean(layer_graphs)
    for i, layer in enumerate(all_layers):
        checkpointed = func is not None and (layers is None or i < layers)
        # transformers calls _gradient_checkpointing_func only when the flag is set: a lean layer is
        # "checkpointed" with a function that runs it once under lean activations.
        layer.gradient_checkpointing = checkpointed or lean
        if checkpointed:
            layer._gradient_checkpointing_func = func
        elif lean:
            layer._gradient_checkpointing_func = lean_func
    config = getattr(model, "config", None)
    if name != "none" and config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
    object.__setattr__(_unwrap(model), "_slipstream_checkpointing", name)
    # the causal-LM loss replays from a graph in the same pool (models.loss, LayerGraphs.loss)
    object.__setattr__(_unwrap(model), "_slipstream_layer_graphs", layer_graphs)
    return name


def current_policy(model: torch.nn.Module) -> str:
    return getattr(_unwrap(model), "_slipstream_checkpointing", "none")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def plain_checkpoint(function: Callable, *args: object, **kwargs: object) -> object:
    """``checkpoint(..., use_reentrant=False)`` with early stopping of the recompute turned off.

    Early stopping ends the recompute by raising an exception inside the layer's forward; code on
    that path that catches exceptions to fall back (as a kernel dispatcher does) would swallow it.
    Recomputing the whole layer costs little more and is robust to that.
    """
    with set_checkpoint_early_stop(False):
        return checkpoint(function, *args, use_reentrant=False, context_fn=_recompute_contexts, **kwargs)


def _recompute_contexts() -> tuple[object, object]:
    """torch checkpoint's ``context_fn``: nothing around the forward, :func:`recomputing_layer` around
    the recompute."""
    return nullcontext(), recomputing_layer()


# ----------------------------------------------------------------------------- offloading
class _Saved:
    """One layer input, held in host memory between forward and backward (or, ``keep``, where it is)."""

    def __init__(self, device: torch.device, stream: object | None, prev: _Saved | None, keep: bool = False) -> None:
        self.device = device
        self.stream = stream
        self.prev = prev
        self.keep = keep
        self.host: torch.Tensor | None = None
        self.back: torch.Tensor | None = None
        self.ready: object | None = None

    def offload(self, x: torch.Tensor) -> None:
        if self.keep:  # checkpointing without offload: the input stays where it is
            self.host = self.back = x.detach()
            self.stream = None
            return
        if self.stream is None:  # CPU (tests): a plain copy
            self.host = x.detach().clone()
            return
        mod = torch.get_device_module(self.device)
        self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self.stream.wait_stream(mod.current_stream(self.device))
        with mod.stream(self.stream):
            self.host.copy_(x.detach(), non_blocking=True)
        x.record_stream(self.stream)  # the allocator must not reuse x before the copy ran

    def prefetch(self) -> None:
        """Start copying the input back (on the side stream) unless already started."""
        if self.back is not None or self.host is None:
            return
        if self.stream is None:
            self.back = self.host
            return
        mod = torch.get_device_module(self.device)
        with mod.stream(self.stream):
            self.back = self.host.to(self.device, non_blocking=True)
            self.ready = mod.Event()
            self.ready.record(self.stream)

    def fetch(self) -> torch.Tensor:
        self.prefetch()
        x = self.back
        if self.stream is not None:
            mod = torch.get_device_module(self.device)
            current = mod.current_stream(self.device)
            current.wait_event(self.ready)
            x.record_stream(current)
        self.host = self.back = self.ready = None
        return x


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, saved, graphs, slot, _anchor, hidden, *args):
        ctx.run, ctx.saved, ctx.args, ctx.graphs, ctx.slot = run, saved, args, graphs, slot
        ctx.hidden_grad = hidden.requires_grad
        ctx.device = hidden.device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.dev_rng = None
        if hidden.device.type != "cpu":
            ctx.dev_rng = torch.get_device_module(hidden.device).get_rng_state(hidden.device)
        ctx.autocast = {t: (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
                        for t in {"cpu", hidden.device.type}}
        saved.offload(hidden)  # starts the copy on the side stream; it overlaps the layer's compute
        ctx.call = graphs.describe(run, hidden, args) if graphs is not None else None
        with torch.no_grad():
            out = graphs.forward(ctx.call, hidden) if ctx.call is not None else None
            if out is None:
                with attention_stash.recording(slot):
                    out = run(hidden, *args)
        return out

    @staticmethod
    def backward(ctx, *grads):
        saved: _Saved = ctx.saved
        if saved.prev is not None:
            saved.prev.prefetch()  # overlap the previous layer's copy-back with this layer's recompute
        box = [saved.fetch().detach().requires_grad_(ctx.hidden_grad)]
        saved.prev = None
        skip = (None, None, None, None, None)
        if ctx.call is not None:  # a replay takes the input out of the box once copied in (frees it)
            done, gx = ctx.graphs.backward(ctx.call, box, grads[0], ctx.hidden_grad,
                                           lambda: _recompute_scope(ctx.autocast))
            if done:
                return (*skip, gx, *([None] * len(ctx.args)))
        x = box.pop()
        devices = [ctx.device.index or 0] if ctx.dev_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.dev_rng is not None:
                torch.get_device_module(ctx.device).set_rng_state(ctx.dev_rng, ctx.device)
            # the recomputed layer's activations live until its backward below is done: keep them leanly
            with _recompute_scope(ctx.autocast), attention_stash.replaying(ctx.slot):
                out = ctx.run(x, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=False)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if ctx.slot is not None:
            ctx.slot.entries.clear()  # anything the recompute did not take back is dropped with the step
        return (*skip, x.grad if ctx.hidden_grad else None, *([None] * len(ctx.args)))


@contextmanager
def _recompute_scope(autocast_states: dict) -> Iterator[None]:
    """Around a layer's recompute in backward: autograd on, the forward's autocast, lean activations
    (the recomputed layer's activations live until its backward is done: keep them leanly)."""
    with torch.enable_grad(), _autocast(autocast_states), lean_activations(), recomputing_layer():
        yield


class _autocast:
    def __init__(self, states: dict) -> None:
        self.contexts = [torch.autocast(t, dtype=dt, enabled=on) for t, (on, dt) in states.items()]

    def __enter__(self) -> None:
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc) -> None:
        for c in reversed(self.contexts):
            c.__exit__(*exc)


class OffloadedCheckpoint:
    """A ``_gradient_checkpointing_func``: checkpoint a layer with its input offloaded to the host.

    Parameters used by the layer get their gradients accumulated during the recompute (as with
    reentrant checkpointing). A layer called with a tensor argument that needs a gradient other
    than its first positional one falls back to plain checkpointing.

    ``offload=False`` keeps the input on the device instead (plain checkpointing through the same
    path). On CUDA the layers' forward and recompute + backward are replayed from CUDA graphs
    (:mod:`slipstream.train.graphs`) unless ``graphs=False`` or ``SLIPSTREAM_CUDA_GRAPHS=0``.
    """

    def __init__(self, device: torch.device, *, offload: bool = True, graphs: bool | None = None,
                 stash_layers: int = 0) -> None:
        self.device = torch.device(device)
        self.offload = offload
        self.stash_layers = stash_layers
        self._slots: weakref.WeakSet = weakref.WeakSet()
        self.stream = None
        if self.device.type != "cpu" and offload:
            self.stream = torch.get_device_module(self.device).Stream(self.device)
        self._last: tuple[weakref.ref, _Saved] | None = None
        self.graphs: LayerGraphs | None = LayerGraphs(self.device) if enabled_for(self.device, graphs) else None

    def __call__(self, function: Callable, *args: object, **kwargs: object) -> object:
        hidden = args[0] if args else None
        if (not torch.is_grad_enabled() or not isinstance(hidden, torch.Tensor) or kwargs
                or _needs_grad(args[1:]) or _needs_grad(getattr(function, "keywords", {}).values())):
            return plain_checkpoint(function, *args, **kwargs)
        prev = None
        if self._last is not None and self._last[0]() is hidden:
            prev = self._last[1]
        saved = _Saved(hidden.device, self.stream, prev, keep=not self.offload)
        anchor = torch.empty(0, requires_grad=True)  # keeps backward reachable when nothing else needs grad
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _OffloadedLayer.apply(function, saved, self.graphs, self._stash_slot(), anchor, hidden, *args[1:])
        first = out if isinstance(out, torch.Tensor) else out[0]
        self._last = (weakref.ref(first), saved)
        return out

    def _stash_slot(self) -> attention_stash.Slot | None:
        """A slot for this layer's attention results while fewer than ``stash_layers`` hold some (a
        slot lives with its layer's autograd node; graphed layers never get one)."""
        if self.stash_layers <= 0 or self.graphs is not None:
            return None
        if sum(1 for s in self._slots if s.entries) >= self.stash_layers:
            return None
        slot = attention_stash.Slot()
        self._slots.add(slot)
        return slot


def _layer_graphs(model: torch.nn.Module) -> list[LayerGraphs]:
    found = {}
    for layer in checkpoint_layers(model):
        graphs = getattr(getattr(layer, "_gradient_checkpointing_func", None), "graphs", None)
        if graphs is not None:
            found[id(graphs)] = graphs
    return list(found.values())


def disable_graphs(model: torch.nn.Module, reason: str) -> str:
    """Stop replaying ``model``'s checkpointed layers from CUDA graphs; returns a note for the log
    (``""`` if none were in use)."""
    graphs = _layer_graphs(model)
    for g in graphs:
        g.disable(reason)
    return f"CUDA graphs off: {reason}" if graphs else ""


def graph_report(model: torch.nn.Module) -> dict | None:
    """What the CUDA graphs of ``model``'s checkpointed layers did (captures, replays, eager calls and
    why, failures, pool bytes); ``None`` when no layer is graphed."""
    found = _layer_graphs(model)
    if not found:
        return None
    counts = ("captures", "replays", "loss_graphs", "lean_graphs", "pool_bytes", "pool_held_bytes")
    total: dict = {"eager": {}, "failed": []} | dict.fromkeys(counts, 0)
    for graphs in found:
        one = graphs.report()
        for k in counts:
            total[k] += one[k]
        for reason, n in one["eager"].items():
            total["eager"][reason] = total["eager"].get(reason, 0) + n
        total["failed"] += one["failed"]
    return total


def _needs_grad(values) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor) and v.requires_grad:
            return True
        if isinstance(v, (tuple, list)) and _needs_grad(v):
            return True
    return False


__all__ = ["OffloadedCheckpoint", "apply_checkpointing", "checkpoint_layers", "current_policy", "disable_graphs",
           "graph_report", "policy_name"]
