"""Device-synchronised timing: the median of repeats, after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_ms(fn: Callable[[], object], device: torch.device, *, budget_ms: float = 100.0,
              max_reps: int = 200) -> float:
    """Median milliseconds of ``fn()`` on ``device``.

    On CUDA-like devices with Triton this is ``triton.testing.do_bench`` (CUDA events, L2 flushed
    between runs); elsewhere a synchronised wall clock. Repeats fill about ``budget_ms``.
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=max(5, budget_ms / 4), rep=budget_ms, return_mode="median"))
        except ImportError:
            pass
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    once = max(time.perf_counter() - start, 1e-7)
    reps = int(max(3, min(max_reps, budget_ms / 1000 / once)))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000
