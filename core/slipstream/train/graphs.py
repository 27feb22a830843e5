"""CUDA graphs for checkpointed decoder layers: each layer's forward and its recompute + backward replayed.

Why: a checkpointed LoRA step enqueues ~80 kernels per decoder layer and pass, each through Python
(transformers' and peft's module code, our dispatcher, autograd). On the H100 that host work took
longer than the GPU's (W8B: ~0.45 s of host time for ~0.33 s of GPU work per step), so the GPU
idled. A checkpointed layer is a closed piece of work, which makes it a good unit to capture once
and replay:

- forward: ``layer(hidden, **kwargs)`` under ``no_grad`` (nothing is saved for backward);
- backward: the recompute under autograd plus ``torch.autograd.grad`` for the layer input and its
  trainable parameters (the LoRA adapters).

Each replay is one launch instead of ~80. The graphs of all layers share one memory pool, and they
never run at the same time, so the pool is as large as one layer's temporaries (the larger graph,
the backward, is captured first so that the forward's temporaries fit in its blocks). Inputs and
outputs go through static buffers shared by the layers of one shape. A backward graph writes its
parameters' gradients (the LoRA adapters') into static buffers shared by the layers with the same
parameter shapes; after each replay they are handed out like autograd would: a copy becomes
``.grad`` where it was ``None`` (so gradients are freed by ``zero_grad`` and take no memory during
the next forward and loss), else they are added to it (gradient accumulation).

A graph replays the kernels of its capture: the same implementations, the same host-side decisions.
So a graph is only used when every input that steers host-side decisions is unchanged. Its key holds
shapes, dtypes and strides, the non-tensor arguments, autocast, the layer's trainable parameters and
peft's switches on its LoRA modules (disabled, active adapters, merged, scales).
Integer and boolean tensors (position ids, masks), and any tensor other than the rotary cos/sin, must
equal the captured contents. That check costs one synchronisation per tensor per step; a mismatch
(a new packing layout) runs the layer eagerly; after 3 such calls in a row (packed batches whose
layout changes every step) the graphs are dropped, their memory given back and the comparisons
stop. The rotary cos/sin and the hidden states are plain data and are copied in.

When graphs are not used: ``SLIPSTREAM_CUDA_GRAPHS=0``; a device without CUDA graphs; a layer
with active dropout (a replay would draw other random numbers than the forward did); arguments a
graph can't take (caches, tensors needing a gradient besides the hidden states); more than 4 shapes;
too little free memory for the pool (long sequences). A layer also runs eagerly for its first call
(that call tunes the kernels): its backward is captured on its second call, its forward on the call
after that. If a capture fails, that layer runs eagerly from then on, with one line on stderr that
says why.

Layers that keep their activations (lean, not checkpointed) replay from graphs too; their entries,
pool and capture rules are in :mod:`slipstream.train.lean_graphs`, on the same :class:`LayerGraphs`.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from slipstream.models.attention import pin_layouts

_REPORTED: set[str] = set()
EAGER_CALLS = 1  # eager calls of a layer shape before its capture: the first call tunes the kernels
POOL_INPUTS = 32  # a layer's graph pool, in layer inputs (H100, W8B bf16: 0.99 GiB = 31 inputs of 32 MiB)
MAX_SHAPES = 4  # call shapes graphed per model (each holds static buffers); more shapes run eagerly
MISMATCHES = 3  # calls in a row whose keyword contents differ from the capture's: the graphs are dropped
DATA_KWARGS = ("position_embeddings",)  # floating tensors in these are plain data: copied, never compared


def enabled_for(device: torch.device, requested: bool | None = None) -> bool:
    """Whether layers on ``device`` are graphed: ``requested`` (``None``: by default), and only on
    CUDA, and not under ``SLIPSTREAM_CUDA_GRAPHS=0``."""
    if requested is False:
        return False
    if os.environ.get("SLIPSTREAM_CUDA_GRAPHS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return device.type == "cuda" and torch.cuda.is_available()


class Ungraphable(Exception):
    """The call can't be replayed from a graph; the message says why."""


@dataclass
class LayerCall:
    """One checkpointed layer call, split into what a graph needs: the layer, its function, the
    keyword arguments and the key of everything that must match for a replay."""

    layer: torch.nn.Module
    func: Callable
    fargs: tuple
    kwargs: dict
    key: tuple
    shape_key: tuple  # what the static buffers depend on: the key without the layer and gradient flags
    params: list[torch.Tensor]

    def run(self, hidden: torch.Tensor, kwargs: dict | None = None) -> object:
        return self.func(*self.fargs, hidden, **(self.kwargs if kwargs is None else kwargs))


def layer_of(function: Callable) -> torch.nn.Module | None:
    """The module a transformers checkpointing partial runs: ``partial(forward, layer, **kw)``
    (transformers >= 5.2x) or ``partial(layer.__call__, **kw)`` (earlier)."""
    if not isinstance(function, functools.partial):
        return None
    if function.args and isinstance(function.args[0], torch.nn.Module):
        return function.args[0]
    owner = getattr(function.func, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def dropout_in(layer: torch.nn.Module) -> str:
    """``""`` if ``layer`` draws no random numbers in training mode, else which module does."""
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0 and module.training:
            return f"{name or type(module).__name__} (p={module.p})"
        p = getattr(module, "attention_dropout", 0.0)
        if isinstance(p, float) and p > 0 and module.training:
            return f"{name}.attention_dropout (p={p})"
    return ""


def _tensor_key(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.stride(), t.device, t.requires_grad)


def _arg_key(name: str, value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    if isinstance(value, torch.Tensor):
        return _tensor_key(value)
    if isinstance(value, (tuple, list)):
        return tuple(_arg_key(name, v) for v in value)
    raise Ungraphable(f"keyword argument {name!r} is a {type(value).__name__}")


def _leaves(value: object, kind: type) -> Iterator:
    """The ``kind`` instances in ``value``, a leaf or (nested) tuples and lists of them."""
    if isinstance(value, kind):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v, kind)


def _rebuild(value: object, kind: type, replace: Callable[[object], object]) -> object:
    """``value`` with every ``kind`` leaf replaced by ``replace(leaf)``; other leaves kept."""
    if isinstance(value, kind):
        return replace(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_rebuild(v, kind, replace) for v in value)
    return value


def _autocast_key(device_type: str) -> tuple:
    return tuple((t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in ("cpu", device_type))


class _Slot:
    """A static tensor standing in for one keyword tensor; ``data`` slots are copied, others compared."""

    def __init__(self, source: torch.Tensor, data: bool) -> None:
        self.static = source.detach().clone()
        self.data = data
        self._last: tuple[weakref.ref, int, bool] | None = (weakref.ref(source), source._version, True)

    def load(self, source: torch.Tensor) -> bool:
        """Make the static tensor stand for ``source``; ``False`` if a replay can't (contents differ).
        The verdict is kept for this tensor until it changes: one comparison (a synchronisation) per
        tensor and step, whatever the number of layers."""
        last = self._last
        if last is not None and last[0]() is source and last[1] == source._version:
            return last[2]
        same = True
        if self.data:
            self.static.copy_(source)
        else:
            same = torch.equal(self.static, source)
        self._last = (weakref.ref(source), source._version, same)
        return same


@dataclass
class _Statics:
    """Static buffers shared by the graphs of every layer with one call shape. ``result`` receives the
    forward's output and, in backward, the gradient of the layer input; each is copied out right after
    its replay, so one buffer serves both."""

    hidden: torch.Tensor
    grad_in: torch.Tensor
    result: torch.Tensor
    slots: dict[str, object] = field(default_factory=dict)  # keyword name -> _Slot / nested / value

    def kwargs(self) -> dict:
        return {name: _rebuild(v, _Slot, lambda slot: slot.static) for name, v in self.slots.items()}


@dataclass
class _Entry:
    forward: torch.cuda.CUDAGraph | None = None
    backward: torch.cuda.CUDAGraph | None = None
    params: list[torch.Tensor] = field(default_factory=list)  # the parameters whose gradients the backward writes
    grads: list[torch.Tensor] = field(default_factory=list)  # where it writes them (static, see _grad_buffers)
    backward_calls: int = 0
    mismatches: int = 0  # calls in a row that could not replay (other keyword contents)
    failed: str = ""
    what = "a checkpointed layer"  # for the stderr line when its graphs fail (not a field)

    def drop(self) -> None:
        """Let go of the graphs (and whatever else holds memory for them)."""
        self.forward = self.backward = None


@dataclass
class _LossEntry:
    """The causal-LM loss of one call shape: its graph and static buffers (see LayerGraphs.loss)."""

    graph: torch.cuda.CUDAGraph | None = None
    hidden: torch.Tensor | None = None
    target: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    failed: str = ""


class _ReplayedLoss(torch.autograd.Function):
    """A loss computed by a graph, with its gradient with respect to ``hidden`` computed alongside."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None


class LayerGraphs:
    """Captures and replays the checkpointed layers (and the loss) of one model on one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool: tuple | None = None
        self._reservation: torch.cuda.CUDAGraph | None = None  # see reserve_pool
        self.entries: dict[tuple, _Entry] = {}
        self.lean_entries: dict = {}  # call key -> lean_graphs.LeanEntry (slipstream.train.lean_graphs)
        self.lean_closed: set[tuple] = set()  # call shapes whose lean layers can no longer be captured
        self._lean_pool: tuple | None = None
        self.losses: dict[tuple, _LossEntry] = {}
        self.statics: dict[tuple, _Statics] = {}
        self.grad_buffers: dict[tuple, list[torch.Tensor]] = {}  # parameter shapes -> static gradient buffers
        self.replays = 0
        self.captures = 0
        self.skipped: dict[str, int] = {}  # why calls ran eagerly -> how often
        self.disabled = ""  # why this model's layers are not graphed at all (see disable)
        self._dropout: dict[int, str] = {}
        self._loras: dict[int, list[torch.nn.Module]] = {}

    @property
    def pool(self) -> tuple:
        """The memory pool all of this model's layer graphs share (made on the first capture)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    @property
    def lean_pool(self) -> tuple:
        """The pool of the lean layers' forward graphs: what each keeps for its backward, and their
        temporaries (see :mod:`slipstream.train.lean_graphs`)."""
        if self._lean_pool is None:
            self._lean_pool = torch.cuda.graph_pool_handle()
        return self._lean_pool

    @property
    def reserved(self) -> bool:
        """Whether the shared pool is sized yet (by the first backward capture, :meth:`reserve_pool`)."""
        return self._reservation is not None

    def all_entries(self) -> list[_Entry]:
        return [*self.entries.values(), *self.lean_entries.values()]

    # ------------------------------------------------------------------ call description
    def describe(self, function: Callable, hidden: torch.Tensor, rest: tuple) -> LayerCall | None:
        """The :class:`LayerCall` for ``function(hidden, *rest)``, or ``None`` (it runs eagerly)."""
        try:
            return self._describe(function, hidden, rest)
        except Ungraphable as exc:
            self.skip(str(exc))
            return None

    def disable(self, reason: str) -> None:
        """Run every layer eagerly from now on (e.g. the Trainer's packed batches, whose layout changes
        every step, would capture graphs that never replay); drops what was captured."""
        self.disabled = reason
        for entry in self.all_entries():
            entry.drop()
            entry.failed = entry.failed or reason
        self._release()

    def _release(self) -> None:
        """Let go of the static buffers, gradient buffers and pool (once no graph can replay)."""
        self.statics.clear()
        self.grad_buffers.clear()
        self.losses.clear()
        self._reservation = None
        self._pool = None
        self._lean_pool = None

    def _describe(self, function: Callable, hidden: torch.Tensor, rest: tuple) -> LayerCall:
        if self.disabled:
            raise Ungraphable(self.disabled)
        layer = layer_of(function)
        if layer is None:
            raise Ungraphable("not a transformers layer call")
        if rest:
            raise Ungraphable("positional arguments besides the hidden states")
        if not hidden.is_contiguous():
            raise Ungraphable("non-contiguous hidden states")
        reason = self._dropout.get(id(layer))
        if reason is None:
            reason = self._dropout[id(layer)] = dropout_in(layer)
        if reason:
            raise Ungraphable(f"dropout in {reason}")
        kwargs = dict(function.keywords)
        key_args = tuple(sorted((name, _arg_key(name, v)) for name, v in kwargs.items()))
        if any(t.requires_grad for t in _leaves(list(kwargs.values()), torch.Tensor)):
            raise Ungraphable("a keyword tensor needs a gradient")
        params = [p for p in layer.parameters() if p.requires_grad]
        autocast = _autocast_key(hidden.device.type)
        key = (id(layer), layer.training, _tensor_key(hidden), key_args, autocast, tuple(id(p) for p in params),
               self._adapter_state(layer))
        # the first layer's input needs no gradient, the others' do: one set of static buffers for both
        shape_key = (layer.training, _tensor_key(hidden)[:-1], key_args, autocast)
        return LayerCall(layer, function.func, function.args, kwargs, key, shape_key, params)

    def _adapter_state(self, layer: torch.nn.Module) -> tuple:
        """peft's switches on the layer's LoRA modules (disabled, active adapters, merged, scales): a
        graph replays the adapter math it captured, so any change must be a new key."""
        loras = self._loras.get(id(layer))
        if loras is None:
            loras = self._loras[id(layer)] = [m for m in layer.modules()
                                              if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]
        return tuple((m.disable_adapters, tuple(m.active_adapters), bool(getattr(m, "merged", False)),
                      tuple(sorted(getattr(m, "scaling", {}).items()))) for m in loras)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def _load(self, call: LayerCall, statics: _Statics) -> bool:
        """Point ``statics`` ' keyword slots at this call's tensors; ``False`` if a replay can't."""
        for name, value in call.kwargs.items():
            slot = statics.slots[name]
            if isinstance(slot, _Slot):
                if not slot.load(value):
                    return False
            elif isinstance(value, (tuple, list)):
                for s, v in zip(_leaves(slot, _Slot), _leaves(value, torch.Tensor), strict=True):
                    if not s.load(v):
                        return False
        return True

    def _check_room(self, hidden: torch.Tensor) -> None:
        """Refuse a capture whose pool would not fit next to what the eager step needs (long sequences)."""
        need = POOL_INPUTS * hidden.numel() * hidden.element_size()
        free, _ = torch.cuda.mem_get_info(hidden.device)
        free += torch.cuda.memory_reserved(hidden.device) - torch.cuda.memory_allocated(hidden.device)
        if need > free:
            raise Ungraphable(f"not enough free device memory for the graph pool (about {need / 2**30:.1f} GiB "
                              f"needed, {free / 2**30:.1f} GiB free)")

    def statics_for(self, call: LayerCall, x: torch.Tensor) -> _Statics:
        statics = self.statics.get(call.shape_key)
        if statics is None:
            if len(self.statics) >= MAX_SHAPES:
                raise Ungraphable(f"more than {MAX_SHAPES} call shapes")
            self._check_room(x)
            statics = _Statics(hidden=torch.empty_like(x), grad_in=torch.empty_like(x), result=torch.empty_like(x))
            for name, value in call.kwargs.items():
                data = name in DATA_KWARGS
                statics.slots[name] = _rebuild(value, torch.Tensor,
                                               lambda t, d=data: _Slot(t, d and t.is_floating_point()))
            pin_layouts(s.static for v in statics.slots.values() for s in _leaves(v, _Slot))
            self.statics[call.shape_key] = statics
        return statics

    def grad_buffers_for(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Where a backward graph writes its parameters' gradients: one set per list of parameter shapes,
        shared by the layers that have it (each replay's gradients are handed out right after it)."""
        key = tuple((tuple(p.shape), p.dtype) for p in params)
        if key not in self.grad_buffers:
            self.grad_buffers[key] = [torch.empty_like(p, requires_grad=False) for p in params]
        return self.grad_buffers[key]

    def loaded(self, call: LayerCall, entry: object, statics: _Statics) -> bool:
        """:meth:`_load`, counting the calls in a row that can't replay; after ``MISMATCHES`` of them
        the graphs are dropped (packed batches: every step has its own layout)."""
        if self._load(call, statics):
            entry.mismatches = 0
            return True
        self.skip("keyword tensors differ from the captured ones (e.g. a new packing layout)")
        entry.mismatches += 1
        if entry.mismatches >= MISMATCHES:
            self.fail(entry, f"the layer's position ids / masks changed on {MISMATCHES} calls in a row (packed "
                             f"batches of varying layout): graphs can't replay them")
        return False

    # ------------------------------------------------------------------ forward
    def forward(self, call: LayerCall, hidden: torch.Tensor) -> torch.Tensor | None:
        """The layer's output from its graph (captured on this call if due), or ``None``: run eagerly.
        A forward is captured after its layer's backward (see :meth:`backward`)."""
        entry = self.entries.setdefault(call.key, _Entry())
        statics = self.statics.get(call.shape_key)
        if entry.failed or entry.backward is None or statics is None or not self.loaded(call, entry, statics):
            return None
        statics.hidden.copy_(hidden)
        if entry.forward is None:
            return self._capture_forward(call, entry, statics)
        entry.forward.replay()
        self.replays += 1
        return statics.result.clone()

    def _capture_forward(self, call: LayerCall, entry: _Entry, statics: _Statics) -> torch.Tensor:
        kwargs = statics.kwargs()
        out = call.run(statics.hidden, kwargs)  # this call's result, run eagerly on the static tensors
        graph = torch.cuda.CUDAGraph()
        try:
            with _quiet(), torch.cuda.graph(graph, pool=self.pool):
                statics.result.copy_(call.run(statics.hidden, kwargs))
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run this layer eagerly
            self.fail(entry, f"capturing the forward failed ({type(exc).__name__}: {exc})")
            return out
        entry.forward = graph
        self.captures += 1
        return out

    # ------------------------------------------------------------------ backward
    def backward(self, call: LayerCall, box: list[torch.Tensor], grad: torch.Tensor, hidden_grad: bool,
                 rerun: Callable[[], object]) -> tuple[bool, torch.Tensor | None]:
        """Recompute and differentiate the layer through its graph: ``(True, grad of x)``, parameter
        gradients added to ``.grad``. ``(False, None)``: the caller runs it eagerly. ``box`` holds the
        layer input ``x``: a replay takes it out once it is copied in, so its memory is free before
        the replay's outputs are allocated (``box`` is left as it was when the caller runs eagerly).
        ``rerun`` enters the contexts of the recompute (autocast, lean activations).

        A layer's backward is captured on its second call (the first tunes the kernels), before its
        forward: the backward's temporaries are the larger, so capturing them first into the shared
        pool lets the forward's reuse their blocks (the other order left the pool a fifth larger).
        """
        x = box[0]
        entry = self.entries.get(call.key)
        if entry is None or entry.failed or grad is None or grad.shape != x.shape:
            return False, None
        statics = self.statics.get(call.shape_key)
        if entry.backward is not None and statics is not None:
            if not self._load(call, statics):
                return False, None
            statics.hidden.copy_(box.pop())
            del x
            statics.grad_in.copy_(grad)
            entry.backward.replay()
            self.replays += 1
            self.hand_out(entry)
            return True, statics.result.clone() if hidden_grad else None
        entry.backward_calls += 1
        if entry.backward_calls <= EAGER_CALLS:
            return False, None
        try:
            statics = self.statics_for(call, x)
        except Ungraphable as exc:
            self.skip(str(exc))
            self.fail(entry, str(exc))
            return False, None
        if not self._load(call, statics):
            return False, None
        return self._capture_backward(call, entry, statics, x, grad, hidden_grad, rerun)

    def _differentiate(self, call: LayerCall, statics: _Statics, hidden_grad: bool,
                       rerun: Callable[[], object]) -> tuple[torch.Tensor | None, list]:
        kwargs = statics.kwargs()
        with rerun():
            xs = statics.hidden.detach().requires_grad_(hidden_grad)
            out = call.run(xs, kwargs)
        if not isinstance(out, torch.Tensor) or out.shape != xs.shape:
            raise Ungraphable("the layer does not return one tensor shaped like its input")
        inputs = ([xs] if hidden_grad else []) + call.params
        grads = torch.autograd.grad(out, inputs, statics.grad_in, allow_unused=True)
        return (grads[0] if hidden_grad else None), list(grads[1:] if hidden_grad else grads)

    def _capture_backward(self, call, entry, statics, x, grad, hidden_grad, rerun):
        statics.hidden.copy_(x)
        statics.grad_in.copy_(grad)
        try:
            gx, grads = self._differentiate(call, statics, hidden_grad, rerun)  # this call's result
        except Ungraphable as exc:
            self.fail(entry, str(exc))
            return False, None
        used = [(p, g) for p, g in zip(call.params, grads, strict=True) if g is not None]
        entry.params = [p for p, _ in used]
        entry.grads = self.grad_buffers_for(entry.params)
        if used:
            torch._foreach_copy_(entry.grads, [g for _, g in used])
        self.hand_out(entry)
        result = gx  # a fresh tensor of the eager run: the capture below writes only static buffers
        del gx, grads, used

        def record(graph: torch.cuda.CUDAGraph, pool: tuple) -> None:
            with _quiet(), torch.cuda.graph(graph, pool=pool):
                gx, grads = self._differentiate(call, statics, hidden_grad, rerun)
                if gx is not None:
                    statics.result.copy_(gx)
                grads = [g for g in grads if g is not None]
                if len(grads) != len(entry.grads):
                    raise Ungraphable("the parameters with gradients changed between two recomputes")
                if grads:
                    torch._foreach_copy_(entry.grads, grads)

        graph = torch.cuda.CUDAGraph()
        try:
            if self._reservation is None:
                self.reserve_pool(record)
            record(graph, self.pool)
        except Exception as exc:  # noqa: BLE001
            self.fail(entry, f"capturing the backward failed ({type(exc).__name__}: {exc})")
            return True, result
        entry.backward = graph
        self.captures += 1
        return True, result

    def reserve_pool(self, record: Callable[[torch.cuda.CUDAGraph, tuple], None]) -> None:
        """Make the pool one block as large as a layer backward's temporaries at their peak.

        Captured into an empty pool, a backward's temporaries each get a segment of their own size,
        and freed segments can't merge: on the H100 (W8B bf16) the pool grew to 818 MiB for a live
        peak of 659 MiB. So the first backward is captured once into a scratch pool while the
        allocator records its history, which gives that peak; the scratch graph is dropped and the
        pool starts as one block of the peak plus 1/16, from which every later capture allocates.
        Without a recorded peak (another recorder is active) the pool grows as captures need.
        """
        probes: list[torch.cuda.CUDAGraph] = []

        def probe() -> None:
            probes.append(torch.cuda.CUDAGraph())
            record(probes[-1], torch.cuda.graph_pool_handle())

        peak = live_peak(probe, self.device)
        probes.clear()  # the scratch pool is freed at the next capture (torch.cuda.graph empties the cache)
        reservation = torch.cuda.CUDAGraph()
        if peak:
            nbytes = peak + peak // 16
            with _quiet(), torch.cuda.graph(reservation, pool=self.pool):
                block = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                del block
        self._reservation = reservation  # holds the pool until the first real graph does

    # ------------------------------------------------------------------ loss
    def loss(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], hidden: torch.Tensor,
             target: torch.Tensor, key: tuple) -> torch.Tensor | None:
        """``fn(hidden, target)`` (a scalar loss of frozen weights) replayed from a graph in the
        layers' pool, or ``None``: the caller computes it eagerly.

        Why: the loss's temporaries (``linear_cross_entropy``'s logits chunk, 250 MiB for W8B) sit
        next to the pool, whose memory is idle while the loss runs; captured into the pool they use
        that memory instead. The graph computes the loss and its gradient with respect to ``hidden``
        (the op finishes its gradients in forward anyway). It is captured once the layers' pool is
        sized (after their first backward capture, so kernels are tuned by then); ``target`` is
        copied in like ``hidden``; ``key`` holds what else the graph depends on (weights, options).
        """
        if self.disabled or self._reservation is None or not hidden.requires_grad or target.requires_grad:
            return None
        key = (key, _tensor_key(hidden), _tensor_key(target), _autocast_key(hidden.device.type))
        entry = self.losses.get(key)
        if entry is None:
            if len(self.losses) >= MAX_SHAPES:
                return None
            entry = self.losses[key] = _LossEntry()
        if entry.failed:
            return None
        if entry.graph is None:
            return self._capture_loss(fn, key, entry, hidden, target)
        entry.hidden.copy_(hidden)
        entry.target.copy_(target)
        entry.graph.replay()
        self.replays += 1
        return _ReplayedLoss.apply(hidden, entry.loss, entry.grad.clone())

    @staticmethod
    def _loss_and_grad(fn: Callable, entry: _LossEntry) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            hs = entry.hidden.detach().requires_grad_()
            loss = fn(hs, entry.target)
            (grad,) = torch.autograd.grad(loss, hs)
        return loss.detach(), grad

    def _capture_loss(self, fn: Callable, key: tuple, entry: _LossEntry, hidden: torch.Tensor,
                      target: torch.Tensor) -> torch.Tensor | None:
        # the layers' static input and result buffers are idle while the loss runs: when one call
        # shape matches, the loss's input and gradient live there instead of in buffers of their own
        shared = next((st for st in self.statics.values()
                       if st.hidden.numel() == hidden.numel() and st.hidden.dtype == hidden.dtype), None)
        if shared is not None:
            entry.hidden, entry.grad = shared.hidden.view(hidden.shape), shared.result.view(hidden.shape)
        else:
            entry.hidden, entry.grad = torch.empty_like(hidden), torch.empty_like(hidden)
        entry.hidden.copy_(hidden)
        entry.target = target.detach().clone()
        try:
            loss, grad = self._loss_and_grad(fn, entry)  # this call's result
        except Exception:  # noqa: BLE001 - let the eager call raise it, with its own traceback
            del self.losses[key]
            return None
        entry.loss = torch.empty_like(loss)
        graph = torch.cuda.CUDAGraph()
        try:
            with _quiet(), torch.cuda.graph(graph, pool=self.pool):
                replayed_loss, replayed_grad = self._loss_and_grad(fn, entry)
                entry.loss.copy_(replayed_loss)
                entry.grad.copy_(replayed_grad)
                del replayed_loss, replayed_grad
        except Exception as exc:  # noqa: BLE001 - the loss runs eagerly from now on
            reason = f"capturing the loss failed ({type(exc).__name__}: {exc})"
            entry.failed, entry.hidden, entry.target, entry.loss, entry.grad = reason, None, None, None, None
            _report(reason, "the loss runs without a CUDA graph")
            return _ReplayedLoss.apply(hidden, loss, grad)
        entry.graph = graph
        return _ReplayedLoss.apply(hidden, loss, grad)

    @staticmethod
    def hand_out(entry: object) -> None:
        """Give the gradients a backward wrote into ``entry.grads`` to their parameters: a copy becomes
        ``.grad`` where it is ``None`` (freed again by ``zero_grad``, so no gradient memory is held
        between steps), else it is added (gradient accumulation, or a gradient from elsewhere)."""
        fresh = [(p, g) for p, g in zip(entry.params, entry.grads, strict=True) if p.grad is None]
        held = [(p.grad, g) for p, g in zip(entry.params, entry.grads, strict=True) if p.grad is not None]
        if fresh:
            copies = [torch.empty_like(g) for _, g in fresh]
            torch._foreach_copy_(copies, [g for _, g in fresh])
            for (p, _), c in zip(fresh, copies, strict=True):
                p.grad = c
        if held:
            torch._foreach_add_([h for h, _ in held], [g for _, g in held])

    def fail(self, entry: _Entry, reason: str) -> None:
        entry.failed = reason
        entry.drop()
        if all(e.failed for e in self.all_entries()):  # nothing replays any more: give the memory back
            self._release()
        _report(reason, f"{entry.what} runs without CUDA graphs")

    def report(self) -> dict:
        """Counters for logs and benchmarks: graphs captured, replays, why calls ran eagerly."""
        failed = sorted({e.failed for e in self.all_entries() if e.failed})
        pools = [p for p in (self._pool, self._lean_pool) if p is not None]
        return {"captures": self.captures, "replays": self.replays, "eager": dict(self.skipped), "failed": failed,
                "loss_graphs": sum(e.graph is not None for e in self.losses.values()),
                "lean_graphs": sum(e.backward is not None for e in self.lean_entries.values()),
                "pool_bytes": sum(pool_bytes(p) for p in pools),
                "pool_held_bytes": sum(pool_bytes(p, held=True) for p in pools)}


def _report(reason: str, what: str) -> None:
    """One line on stderr per reason: training goes on, only slower."""
    if reason not in _REPORTED:
        _REPORTED.add(reason)
        print(f"slipstream: {what}: {reason}", file=sys.stderr)


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def live_peak(fn: Callable[[], object], device: torch.device) -> int | None:
    """The most bytes that ``fn()``'s allocations on ``device`` held at once, from the caching
    allocator's recorded history; ``None`` where the history can't be had (or someone else is
    recording it: their recording is left alone)."""
    memory = torch.cuda.memory
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        if any(memory._snapshot(device).get("device_traces", [])):
            fn()
            return None
        memory._record_memory_history(enabled="all", context=None, max_entries=1_000_000, device=device)
    except Exception:  # noqa: BLE001 - the history API is private and may change: do without it
        fn()
        return None
    try:
        fn()
        traces = memory._snapshot(device).get("device_traces", [])
    finally:
        memory._record_memory_history(enabled=None, device=device)
    return peak_of(traces[index] if index < len(traces) else []) or None


def peak_of(events: list[dict]) -> int:
    """The most bytes held at once by the allocations in an allocator trace (``alloc`` /
    ``free_requested`` events; frees of blocks allocated before the trace are ignored)."""
    live: dict[int, int] = {}
    held = peak = 0
    for e in events:
        if e.get("action") == "alloc":
            live[e["addr"]] = e["size"]
            held += e["size"]
            peak = max(peak, held)
        elif e.get("action") == "free_requested":
            held -= live.pop(e.get("addr"), 0)
    return peak


def pool_bytes(pool: object, held: bool = False) -> int:
    """Bytes of device memory a graph memory pool reserves and no live tensor holds: what its graphs'
    temporaries use on replay, which the allocator's statistics never see (``held``: the bytes live
    tensors hold instead, e.g. what lean layers keep for backward; those the statistics count)."""
    try:
        segments = torch.cuda.memory_snapshot()
    except Exception:  # noqa: BLE001 - no CUDA
        return 0
    mine = [s for s in segments if tuple(s.get("segment_pool_id", ())) == tuple(pool)]
    if held:
        return sum(s["allocated_size"] for s in mine)
    return sum(s["total_size"] - s["allocated_size"] for s in mine)


__all__ = ["EAGER_CALLS", "LayerCall", "LayerGraphs", "Ungraphable", "dropout_in", "enabled_for", "layer_of",
           "live_peak", "peak_of", "pool_bytes"]
