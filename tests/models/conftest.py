"""Fixtures for the model-integration tests.

These tests check the *integration* (which module calls which op, with which arguments), so
every op is forced to its plain-PyTorch reference: the comparison with transformers' eager code
is then exact up to summation order, and no Triton kernel runs under the CPU interpreter here
(kernels are judged against the same references in tests/kernels and tests/ops). Modules that
set ``USE_DISPATCHER = True`` (the GPU tests) run whatever the dispatcher chooses.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from slipstream.dispatch import forced
from slipstream.ops import SPECS


@pytest.fixture(autouse=True, scope="module")
def _reference_ops(request):
    if getattr(request.module, "USE_DISPATCHER", False):  # the GPU tests exercise the real choice
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and immune to a loaded machine
    with ExitStack() as stack:
        for op in SPECS:
            stack.enter_context(forced(op, f"reference.{op}"))
        yield
    torch.set_num_threads(threads)
