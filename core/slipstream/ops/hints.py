"""Call-site hints that implementations may use to skip work, and may ignore.

A hint never changes what a caller can observe: an implementation that ignores it is still correct.

:func:`output_values_unused`: inside this context the caller promises not to read the *values* of
the forward outputs of the ops it calls; it only needs their autograd nodes, i.e. the backward.
Activation checkpointing is the user: when a decoder layer is recomputed in backward, the layer's
final output (``residual + down_proj(h)``) is discarded, only the gradient flows through it, so the
last projection's base GEMM (for Llama-3.1-8B 2 * 4096 * 14336 FLOPs per token, about 5 % of a
checkpointed step) computes numbers nobody reads. ``kernels.lora`` then returns an uninitialised
output and runs only what its backward needs.


:func:`inputs_expire_in_backward`: inside this context the caller promises that the autograd graph it
records is differentiated once and that the tensors an op saves for backward are read by nobody
after that op's own backward. An implementation may then write its input gradients over its saved
inputs instead of allocating new buffers. The gated MLP's recompute in a checkpointed layer is the
user: ``swiglu``'s backward writes d(gate) and d(up) over gate and up (2 x 112 MiB for Llama-3.1-8B
at 4096 tokens, at the layer backward's memory peak). Implementations that do so bump the inputs'
version counters, so a second backward (``retain_graph``) fails loudly instead of reading gradients.

The hints live in :mod:`contextvars` variables: they are per thread (the dispatcher's tuning thread
never sees it, so verification always compares real outputs).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

_unused = contextvars.ContextVar("slipstream_output_values_unused", default=False)
_expire = contextvars.ContextVar("slipstream_inputs_expire_in_backward", default=False)


@contextmanager
def _setting(var: contextvars.ContextVar, enabled: bool) -> Iterator[None]:
    token = var.set(bool(enabled))
    try:
        yield
    finally:
        var.reset(token)


def output_values_unused(enabled: bool = True) -> AbstractContextManager[None]:
    """Within the block, forward outputs' values may be left uncomputed (their backward stays exact)."""
    return _setting(_unused, enabled)


def output_values_are_unused() -> bool:
    """Whether the current call may skip computing its forward output's values."""
    return _unused.get()


def inputs_expire_in_backward(enabled: bool = True) -> AbstractContextManager[None]:
    """Within the block, ops may overwrite their saved inputs with gradients in backward."""
    return _setting(_expire, enabled)


def inputs_may_be_overwritten() -> bool:
    """Whether the current call's backward may write its gradients over its saved inputs."""
    return _expire.get()


__all__ = ["inputs_expire_in_backward", "inputs_may_be_overwritten", "output_values_are_unused",
           "output_values_unused"]
