"""On a GPU: timing by CUDA-graph replay leaves no device memory behind. Skipped on the CPU."""

from __future__ import annotations

import threading

import pytest
import torch

from slipstream.dispatch.graph_timing import graph_ms

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")]


def test_repeated_timings_on_fresh_threads_hold_at_most_one_workspace():
    """The tuner times every candidate with ``graph_ms`` on a fresh thread. Each capture that runs a
    cuBLAS GEMM on a stream it has not used before allocates a workspace (32 MiB or more on Hopper)
    that outlives the graph: 40 timings on fresh streams held 960 MiB on an H100 (torch 2.11)."""
    a = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
    times: list[float] = []

    def on_a_fresh_thread() -> None:
        worker = threading.Thread(target=lambda: times.append(graph_ms(lambda: a @ b, torch.device("cuda"))))
        worker.start()
        worker.join()

    on_a_fresh_thread()  # the first timing on a tuning thread's cuBLAS handle may allocate the one workspace
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(40):
        on_a_fresh_thread()
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    assert len(times) == 41 and all(t > 0 for t in times)
    assert grown <= 8 * 2**20, f"40 timings left {grown / 2**20:.0f} MiB allocated"
