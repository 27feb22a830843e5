"""LoRA adapters cast to the activations' dtype, reused within one training step.

peft keeps adapters in fp32 under a bf16 model (``autocast_adapter_dtype``), so every LoRA call casts
``A`` and ``B`` to bf16: in its forward, again in a checkpointed layer's recompute, again in its
backward. On the H100 a W8B step ran 1,343 such cast kernels. They are cheap on the GPU but each
costs host time (Python, dispatch, launch), and the NF4 step there is host-bound: the host needed as
long to enqueue the step as the step took.

:data:`ADAPTER_CASTS` keeps a cast from the pass that makes it to the backward that last needs it.
It is active only from the first :func:`begin_step`: the accelerated model calls it from a forward
pre-hook, and each call drops what is left from the previous step. Within a step:

- a forward with grad enabled (a recomputed layer, or a layer that is not checkpointed) stores its
  casts; the layer's backward :meth:`AdapterCasts.take` s them, so the entry is gone once its last
  user ran and at most the layers between their forward and their backward hold casts;
- a forward under ``no_grad`` (an offloaded or checkpointed layer's first forward, or inference)
  reuses a stored cast but stores none: its casts would otherwise live until that layer's backward,
  which for the first layer is the end of the step (84 MB of bf16 adapters for Llama-8B, r=16).

A checkpointed layer thus casts each adapter twice per step (forward; recompute, reused by the
backward) instead of three times, and a layer that is not checkpointed once instead of twice.

Entries are found by the source tensor's memory (data pointer, shape, strides, dtype), not by the
Python object: a tensor saved for backward may come back as a new object over the same memory. An
entry is served only while its source tensor is alive, at the same address and at the same version
counter value (an optimizer step or any in-place update bumps it). Writes through ``.data``, which
bump nothing, are covered by the clear at the next forward. Ops called outside an accelerated
model's forward never see a cached cast (the cache is off until the first ``begin_step``).
"""

from __future__ import annotations

import threading
import weakref

import torch

KEEP, PEEK, TAKE = "keep", "peek", "take"
"""How a pass uses a cast (see the module docstring): a forward whose backward will run keeps it,
a forward under ``no_grad`` peeks, a backward takes it."""


def forward_use(*tensors: torch.Tensor) -> str:
    """The use for a forward *about to be entered* (``Function.forward`` itself always runs under
    ``no_grad``): :data:`KEEP` if autograd will record it (grad enabled and an input needs grad)."""
    return KEEP if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors) else PEEK


class AdapterCasts:
    """``get(t, dtype)``: ``t.to(dtype)``, cached per step when active (see the module docstring)."""

    def __init__(self) -> None:
        self.active = False
        self.enabled = True  # tests compare against the uncached path
        self.hits = self.misses = 0
        self._entries: dict[tuple, tuple] = {}
        self._lock = threading.Lock()  # the forward runs on the caller's thread, backward on autograd's

    def begin_step(self) -> None:
        """Drop every cached cast and cache from now on (called at each top-level forward)."""
        with self._lock:
            self._entries.clear()
            self.active = self.enabled

    def stop(self) -> None:
        """Back to no caching (the model was de-accelerated)."""
        with self._lock:
            self._entries.clear()
            self.active = False

    def get(self, t: torch.Tensor, dtype: torch.dtype, use: str = KEEP) -> torch.Tensor:
        """``t`` in ``dtype``. ``use``: :data:`KEEP` (store the cast for later passes of this step),
        :data:`PEEK` (reuse a stored cast, store none) or :data:`TAKE` (the step's last use: drop it)."""
        if t.dtype == dtype:
            return t
        return self._cached((t,), dtype, lambda: t.detach().to(dtype), use)

    def cat(self, tensors: tuple[torch.Tensor, ...], dtype: torch.dtype, use: str = KEEP) -> torch.Tensor:
        """``torch.cat([t.to(dtype) for t in tensors])`` (rows), cached like :meth:`get`."""
        if len(tensors) == 1:
            return self.get(tensors[0], dtype, use)
        return self._cached(tensors, dtype, lambda: torch.cat([t.detach().to(dtype) for t in tensors]), use)

    def __len__(self) -> int:
        return len(self._entries)

    def _cached(self, tensors: tuple[torch.Tensor, ...], dtype: torch.dtype, make, use: str) -> torch.Tensor:
        if not self.active or (use == PEEK and not self._entries) or _capturing(tensors[0]):
            return make()  # (an offloaded layer's first forward peeks into an empty cache: no key needed)
        key = (tuple((t.data_ptr(), t.dtype, t.shape, t.stride()) for t in tensors), dtype)
        with self._lock:
            entry = self._entries.pop(key, None) if use == TAKE else self._entries.get(key)
            if entry is not None and self._valid(entry, tensors):
                self.hits += 1
                return entry[-1]
            self.misses += 1
        value = make()
        if use == KEEP:
            self._store(key, tensors, value)
        return value

    @staticmethod
    def _valid(entry: tuple, tensors: tuple[torch.Tensor, ...]) -> bool:
        """Each source is alive, unmoved and unmodified since the cast (the key matched its memory)."""
        refs, versions, pointers, _ = entry
        for ref, version, pointer, t in zip(refs, versions, pointers, tensors, strict=True):
            source = ref()
            if source is None or source.data_ptr() != pointer or source._version != version or t._version != version:
                return False
        return True

    def _store(self, key: tuple, tensors: tuple[torch.Tensor, ...], value: torch.Tensor) -> None:
        entry = (tuple(weakref.ref(t) for t in tensors), tuple(t._version for t in tensors),
                 tuple(t.data_ptr() for t in tensors), value)
        with self._lock:
            if self.active:
                self._entries[key] = entry


def _capturing(t: torch.Tensor) -> bool:
    """A CUDA graph is being captured (the tuner's timing): a cast made now holds no values until the
    graph replays, so it must not be served to anything outside that graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


ADAPTER_CASTS = AdapterCasts()


def begin_step() -> None:
    """A top-level forward starts: casts from the previous step are dropped."""
    ADAPTER_CASTS.begin_step()


__all__ = ["ADAPTER_CASTS", "KEEP", "PEEK", "TAKE", "AdapterCasts", "begin_step", "forward_use"]
