"""CUDA graphs for lean decoder layers (kept activations, no recompute): forward and backward replayed.

Why: checkpointed layers already replay from graphs (:mod:`slipstream.train.graphs`), but a layer
that keeps its activations ran eagerly, ~80 kernels per pass each through Python. On the H100 the
W8B ``"auto"`` step (17 layers checkpointed and graphed, 15 lean and eager) took its host time plus
~0.1 s: the GPU waited for the host during the lean layers. With the lean layers graphed the host
time per step went from 0.185 to 0.158 s and the step became GPU-bound.

How: on a lean layer's third call (two eager calls tune the kernels and let the checkpointed
layers size the shared pool first), within that call's forward:

1. the layer runs once eagerly without autograd on its static input (the decisions a capture can't
   make: a kernel choice for a new key, an attention layout from the position ids);
2. its forward is captured *with autograd recording*, under lean activations. Everything autograd
   saves for backward is allocated during the capture, in a pool only lean forwards use, and stays
   allocated for as long as the graphs live: the captured autograd graph is retained. Each replay
   of the forward rewrites those tensors in place. The trainable parameters (and the input) enter
   the captured graph as views made inside the capture: a leaf's gradient is handed over on the
   stream of its gradient accumulator, which an eager call may have made on the legacy stream, and
   the backward capture then failed ("operation would make the legacy stream depend on a capturing
   blocking stream");
3. the backward runs once eagerly through the retained graph (its saved tensors hold values after
   one replay), then is captured from the same graph into the pool the checkpointed layers share:
   its temporaries die within it. Capturing it later, inside the autograd engine's backward, failed
   the same way.

Each lean layer has an input buffer of its own (its first RMSNorm saves its input); outputs,
incoming gradients and parameter gradients go through the static buffers shared with the
checkpointed layers' graphs.

Why this is safe: a block of the lean pool is either held for good (saved tensors) or a forward's
temporary. A temporary freed by one capture can be handed to a later capture as a saved tensor; the
earlier graph writes it again on replay, which is harmless only if the earlier graph replays before
the later one within a step, i.e. if layers are captured in the order they run. So all lean layers
of a call shape are captured in one forward pass: after the first backward replay of that shape,
a layer that has not been captured (it was busy, or its keywords differed) stays eager.

Memory: a lean layer's saved tensors are held all the time instead of between its forward and its
backward; the peak, the turn from the last forward to the first backward, holds all of them anyway.
New is the lean pool's slack (one lean forward's temporaries: the graph pools' idle bytes went from
0.545 to 0.742 GiB at W8B), while the backward transients move into the graphs' pools: the measured
peak hardly moved (the planner counts the slack, :func:`slipstream.train.memory.lean_graph_bytes`).

A replay is only right if nothing has overwritten the saved tensors since its forward: a second
forward of the same layer before the first one's backward (or a call whose keyword contents differ
from the capture's: a new packing layout) runs eagerly. Graphs are used under the same conditions as
:mod:`slipstream.train.graphs` (no dropout, at most 4 call shapes, ...) and not under
``SLIPSTREAM_LEAN_GRAPHS=0``; a failed capture leaves the layer eager, with one line on stderr.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from slipstream.train.graphs import LayerCall, LayerGraphs, Ungraphable, _quiet, _Statics
from slipstream.train.recompute import lean_activations, lean_forward

EAGER_CALLS = 2  # eager calls of a lean layer before its capture (see the module doc)


def lean_graphs_enabled() -> bool:
    """Lean layers replay from graphs wherever checkpointed ones do, unless ``SLIPSTREAM_LEAN_GRAPHS=0``."""
    return os.environ.get("SLIPSTREAM_LEAN_GRAPHS", "1").strip().lower() not in ("0", "false", "no", "off")


class _Busy:
    """Lives with the autograd node of a replayed forward: while it does, the saved tensors are taken."""


@dataclass
class LeanEntry:
    """One lean layer's graphs and what they keep."""

    forward: torch.cuda.CUDAGraph | None = None
    backward: torch.cuda.CUDAGraph | None = None
    # The layer's own static input: ``x`` is the captured autograd graph's leaf, ``hidden`` the same
    # memory with a version counter of its own. Each call copies its input into ``hidden``; through
    # ``x`` that would count as an in-place change of a tensor saved for backward, and the
    # captured graph's recompute recipes (lean activations) would refuse to run.
    hidden: torch.Tensor | None = None
    x: torch.Tensor | None = None
    out: torch.Tensor | None = None  # the captured output, until the backward is captured
    node: object = None  # the captured autograd graph: holds what the forward saved for backward
    params: list[torch.Tensor] = field(default_factory=list)  # the trainable parameters the layer uses
    inputs: list[torch.Tensor] = field(default_factory=list)  # their stand-ins in the captured graph (+ x)
    grads: list[torch.Tensor] = field(default_factory=list)
    busy: weakref.ref | None = None
    shape_key: tuple = ()
    calls: int = 0
    mismatches: int = 0
    failed: str = ""
    what = "a lean layer"  # for the stderr line when its graphs fail (not a field)

    def drop(self) -> None:
        self.forward = self.backward = None
        self.hidden = self.x = self.out = self.node = None
        self.inputs = []

    def in_flight(self) -> bool:
        return self.busy is not None and self.busy() is not None


class GraphedLean:
    """A lean decoder layer's ``_gradient_checkpointing_func`` that replays it from CUDA graphs
    (falling back to :func:`slipstream.train.recompute.lean_forward`, the eager lean call)."""

    def __init__(self, graphs: LayerGraphs) -> None:
        self.graphs = graphs

    def __call__(self, function: Callable, *args: object, **kwargs: object) -> object:
        hidden = args[0] if args else None
        if not torch.is_grad_enabled() or kwargs or not isinstance(hidden, torch.Tensor):
            return lean_forward(function, *args, **kwargs)
        graphs = self.graphs
        call = graphs.describe(function, hidden, args[1:])
        if call is None:
            return lean_forward(function, *args)
        entry = graphs.lean_entries.setdefault(call.key, LeanEntry())
        statics = self._ready(call, entry, hidden)
        if statics is None:
            return lean_forward(function, *args)
        anchor = torch.empty(0, requires_grad=True)  # keeps backward reachable when nothing else needs grad
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _LeanReplay.apply(self, entry, statics, anchor, hidden)

    def _ready(self, call: LayerCall, entry: LeanEntry, hidden: torch.Tensor) -> _Statics | None:
        """The static buffers for a replay of this call, the graphs captured if due; ``None``: eager."""
        graphs = self.graphs
        if entry.failed:
            return None
        if entry.in_flight():
            graphs.skip("a second forward of a lean layer before its backward")
            return None
        entry.calls += 1
        if entry.backward is None and entry.calls <= EAGER_CALLS:
            return None
        if entry.backward is None and call.shape_key in graphs.lean_closed:
            graphs.skip("a lean layer missed its call shape's capture window")
            return None
        try:
            statics = graphs.statics_for(call, hidden)
        except Ungraphable as exc:
            graphs.skip(str(exc))
            graphs.fail(entry, str(exc))
            return None
        if not graphs.loaded(call, entry, statics):
            return None
        if entry.backward is None:
            try:
                self._capture(call, entry, statics, hidden)
            except Exception as exc:  # noqa: BLE001 - any capture failure means: run this layer eagerly
                graphs.lean_closed.add(call.shape_key)  # a failed capture can leave CUDA's capture state odd
                graphs.fail(entry, f"capturing it failed ({type(exc).__name__}: {exc})")
                return None
        return statics

    def _capture(self, call: LayerCall, entry: LeanEntry, statics: _Statics, hidden: torch.Tensor) -> None:
        """Capture the forward, then the backward (see the module doc, steps 1-3)."""
        graphs = self.graphs
        entry.x = torch.empty_like(hidden).requires_grad_(hidden.requires_grad)
        with torch.no_grad():  # an alias with a version counter of its own (see LeanEntry.hidden)
            entry.hidden = torch.empty(0, dtype=hidden.dtype, device=hidden.device).set_(
                entry.x.untyped_storage(), entry.x.storage_offset(), entry.x.shape, entry.x.stride())
        entry.hidden.copy_(hidden)
        kwargs = statics.kwargs()
        with torch.no_grad():  # no autograd graph: on the H100 one made here outlived the call (1.1 GiB at W8B)
            call.run(entry.x, kwargs)
        forward = torch.cuda.CUDAGraph()
        slots = _trainable_slots(call.layer)
        with _quiet(), torch.enable_grad(), lean_activations(), torch.cuda.graph(forward, pool=graphs.lean_pool):
            # Leaves as autograd inputs fail the backward capture: a leaf's gradient is handed over
            # on the stream of its accumulator node, which may come from an eager call (the legacy
            # stream). Views made here are inputs of their own, on the capture's stream.
            x = entry.x.view_as(entry.x)
            aliases = [p.view_as(p) for _, _, p in slots]
            with _swapped(slots, aliases):
                out = call.run(x, kwargs)
            if not isinstance(out, torch.Tensor) or out.shape != hidden.shape or not out.requires_grad:
                raise Ungraphable("the layer does not return one tensor shaped like its input")
            with torch.no_grad():  # the shared buffer must not join the captured autograd graph
                statics.result.copy_(out)
        entry.forward, entry.out = forward, out
        forward.replay()  # the saved tensors now hold values, for the eager run of the backward
        used = _used_params(out, [p for _, _, p in slots])
        hidden_grad = hidden.requires_grad
        entry.params = [p for (_, _, p), u in zip(slots, used, strict=True) if u]
        entry.inputs = ([x] if hidden_grad else []) + [a for a, u in zip(aliases, used, strict=True) if u]
        entry.grads = graphs.grad_buffers_for(entry.params)
        statics.grad_in.zero_()
        if self._differentiate(entry, statics, hidden_grad):
            raise Ungraphable("a trainable parameter reached the layer other than through its module attribute")

        def record(graph: torch.cuda.CUDAGraph, pool: tuple) -> None:
            with _quiet(), torch.cuda.graph(graph, pool=pool):
                self._differentiate(entry, statics, hidden_grad)

        if not graphs.reserved:
            graphs.reserve_pool(record)
        backward = torch.cuda.CUDAGraph()
        record(backward, graphs.pool)
        entry.backward = backward
        entry.shape_key = call.shape_key
        entry.node, entry.out = out.grad_fn, None  # keep the saved tensors, not the output
        graphs.captures += 2

    def backward(self, entry: LeanEntry, statics: _Statics, grad: torch.Tensor | None,
                 hidden_grad: bool) -> torch.Tensor | None:
        """Replay the backward of the forward last replayed: parameter gradients handed out, the
        input's gradient returned."""
        graphs = self.graphs
        if grad is None:
            statics.grad_in.zero_()
        else:
            statics.grad_in.copy_(grad)
        graphs.lean_closed.add(entry.shape_key)
        entry.backward.replay()
        graphs.replays += 1
        graphs.hand_out(entry)
        return statics.result.clone() if hidden_grad else None

    def _differentiate(self, entry: LeanEntry, statics: _Statics, hidden_grad: bool) -> int:
        """Gradients of the retained autograd graph into the static buffers (captured or eagerly);
        returns how many of the inputs got none."""
        grads = torch.autograd.grad(entry.out, entry.inputs, statics.grad_in, retain_graph=True, allow_unused=True)
        if hidden_grad:
            statics.result.copy_(grads[0])
            grads = grads[1:]
        used = [(buf, g) for buf, g in zip(entry.grads, grads, strict=True) if g is not None]
        if used:
            torch._foreach_copy_([b for b, _ in used], [g for _, g in used])
        return len(grads) - len(used)


def _trainable_slots(layer: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """``(module, name, parameter)`` for each trainable parameter of ``layer`` (each once)."""
    seen: set[int] = set()
    slots = []
    for module in layer.modules():
        for name, p in module._parameters.items():
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                slots.append((module, name, p))
    return slots


@contextmanager
def _swapped(slots: list[tuple[torch.nn.Module, str, torch.Tensor]], stand_ins: list[torch.Tensor]) -> Iterator[None]:
    """Within the block, each slot's module finds its stand-in where the parameter was."""
    for (module, name, _), t in zip(slots, stand_ins, strict=True):
        module._parameters[name] = t
    try:
        yield
    finally:
        for module, name, p in slots:
            module._parameters[name] = p


def _used_params(out: torch.Tensor, params: list[torch.Tensor]) -> list[bool]:
    """Which of ``params`` the autograd graph of ``out`` reaches (their gradient buffers are written)."""
    reached: set[int] = set()
    seen: set[object] = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            reached.add(id(variable))
        stack.extend(n for n, _ in node.next_functions)
    return [id(p) in reached for p in params]


class _LeanReplay(torch.autograd.Function):
    """A lean layer from its graphs: forward replays the forward graph, backward the backward graph."""

    @staticmethod
    def forward(ctx, lean: GraphedLean, entry: LeanEntry, statics: _Statics, _anchor,
                hidden: torch.Tensor) -> torch.Tensor:
        entry.hidden.copy_(hidden)
        entry.forward.replay()
        lean.graphs.replays += 1
        ctx.lean, ctx.entry, ctx.statics = lean, entry, statics
        ctx.hidden_grad = hidden.requires_grad
        ctx.busy = _Busy()
        entry.busy = weakref.ref(ctx.busy)
        return statics.result.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        entry: LeanEntry = ctx.entry
        try:
            if entry.failed or entry.busy is None or entry.busy() is not ctx.busy:
                raise RuntimeError("slipstream: a lean layer's graphs were dropped or reused between its forward "
                                   "and its backward; its saved activations are gone. Run the forward again.")
            gx = ctx.lean.backward(entry, ctx.statics, grad, ctx.hidden_grad)
        finally:
            entry.busy = None
        return None, None, None, None, gx


__all__ = ["EAGER_CALLS", "GraphedLean", "LeanEntry", "lean_graphs_enabled"]
