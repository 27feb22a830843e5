"""Call-site hints that implementations may use to skip work, and may ignore.

A hint never changes what a caller can observe: an implementation that ignores it is still correct.

:func:`output_values_unused`: inside this context the caller promises not to read the *values* of
the forward outputs of the ops it calls; it only needs their autograd nodes, i.e. the backward.
Activation checkpointing is the user: when a decoder layer is recomputed in backward, the layer's
final output (``residual + down_proj(h)``) is discarded, only the gradient flows through it, so the
last projection's base GEMM (for Llama-3.1-8B 2 * 4096 * 14336 FLOPs per token, about 5 % of a
checkpointed step) computes numbers nobody reads. ``kernels.lora`` then returns an uninitialised
output and runs only what its backward needs.

The hint lives in a :mod:`contextvars` variable: it is per thread (the dispatcher's tuning thread
never sees it, so verification always compares real outputs).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_unused = contextvars.ContextVar("slipstream_output_values_unused", default=False)


@contextmanager
def output_values_unused(enabled: bool = True) -> Iterator[None]:
    """Within the block, forward outputs' values may be left uncomputed (their backward stays exact)."""
    token = _unused.set(bool(enabled))
    try:
        yield
    finally:
        _unused.reset(token)


def output_values_are_unused() -> bool:
    """Whether the current call may skip computing its forward output's values."""
    return _unused.get()


__all__ = ["output_values_are_unused", "output_values_unused"]
