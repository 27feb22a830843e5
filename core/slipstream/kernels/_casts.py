"""LoRA adapters cast to the activations' dtype, reused within one training step.

peft keeps adapters in fp32 under a bf16 model (``autocast_adapter_dtype``), so every LoRA call casts
``A`` and ``B`` to bf16: in its forward, again in a checkpointed layer's recompute, again in its
backward. On the H100 a W8B step ran 1,343 such cast kernels. They are cheap on the GPU but each
costs host time (Python, dispatch, launch), and the NF4 step there is host-bound: the host needed as
long to enqueue the step as the step took.

:data:`ADAPTER_CASTS` keeps each cast until the adapter changes. It is active only from the first
:func:`begin_step`: the accelerated model calls it from a forward pre-hook, so entries live from
one top-level forward to the next, which covers that forward, its recomputes and its backward. An
entry is reused only for the same tensor object (a weak reference), the same storage and the same
version counter. An optimizer step or any in-place update under ``no_grad`` bumps the version.
Writes through ``.data``, which bump nothing, are covered by the clear at the next forward. Ops
called outside an accelerated model's forward never see a cached cast (the cache is off until the
first ``begin_step``).
"""

from __future__ import annotations

import threading
import weakref

import torch


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

    def get(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if t.dtype == dtype:
            return t
        return self._cached((t,), dtype, lambda: t.detach().to(dtype))

    def cat(self, tensors: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """``torch.cat([t.to(dtype) for t in tensors])`` (rows), cached like :meth:`get`."""
        if len(tensors) == 1:
            return self.get(tensors[0], dtype)
        return self._cached(tensors, dtype, lambda: torch.cat([t.detach().to(dtype) for t in tensors]))

    def _cached(self, tensors: tuple[torch.Tensor, ...], dtype: torch.dtype, make) -> torch.Tensor:
        if not self.active or _capturing(tensors[0]):
            return make()
        key = (tuple(id(t) for t in tensors), dtype)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._valid(entry, tensors):
                self.hits += 1
                return entry[-1]
        value = make()
        self._store(key, tensors, value)
        return value

    @staticmethod
    def _valid(entry: tuple, tensors: tuple[torch.Tensor, ...]) -> bool:
        refs, versions, pointers, _ = entry
        return all(r() is t and t._version == v and t.data_ptr() == p
                   for r, v, p, t in zip(refs, versions, pointers, tensors, strict=True))

    def _store(self, key: tuple, tensors: tuple[torch.Tensor, ...], value: torch.Tensor) -> None:
        entry = (tuple(weakref.ref(t) for t in tensors), tuple(t._version for t in tensors),
                 tuple(t.data_ptr() for t in tensors), value)
        with self._lock:
            self.misses += 1
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


__all__ = ["ADAPTER_CASTS", "AdapterCasts", "begin_step"]
