"""What the device can do at best, measured in the same process as the op timings.

Two ceilings frame every op number:

* **copy bandwidth**: a large device-to-device ``dst.copy_(src)``; GB/s counts the bytes read
  *and* written (``2 * nbytes / time``). Memory-bound ops are reported as a % of this.
* **matmul peak**: a square ``n x n x n`` GEMM (8192 on a GPU) in bf16 (and in the run's dtype
  when that differs); TFLOP/s = ``2 * n^3 / time``. Matmul-bearing ops are reported as a % of it.

Timing is :func:`bench_ms`: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every
repetition, median) on CUDA devices, the dispatcher's synchronised wall clock elsewhere. Events
around one call measure host time too whenever the host is slower than the GPU (Python, autograd,
kernel launches): :func:`graph_ms` replays the same calls from a CUDA graph, which leaves the GPU
time alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slipstream.dispatch.graph_timing import GraphCaptureError, graph_ms  # noqa: F401 - re-exported

GPU_COPY_BYTES = 1 << 30  # 1 GiB source: far beyond any L2
CPU_COPY_BYTES = 1 << 26
GPU_MATMUL_N = 8192
CPU_MATMUL_N = 512


def bench_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds of ``fn()`` on ``device``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    from slipstream.dispatch.timing import median_ms

    return float(median_ms(fn, device, budget_ms=rep_ms, max_reps=50))


def copy_bandwidth(device: torch.device, nbytes: int, *, warmup_ms: float, rep_ms: float) -> dict:
    """Device-to-device copy of ``nbytes``: GB/s counting the read and the write."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    moved = 2 * n * 4
    return {"bytes_per_copy": n * 4, "ms": ms, "gbps": moved / ms / 1e6,
            "method": "dst.copy_(src), GB/s = 2 * nbytes / time (read + write)"}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, *, warmup_ms: float, rep_ms: float) -> dict:
    """``n x n x n`` GEMM in ``dtype``: TFLOP/s = 2 n^3 / time."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    ms = bench_ms(lambda: torch.mm(a, b, out=c), device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "ms": ms, "tflops": 2 * n ** 3 / ms / 1e9,
            "method": f"torch.mm {n}x{n}x{n}, TFLOP/s = 2 n^3 / time"}


def measure(device: torch.device, dtype: torch.dtype, *, quick: bool = False) -> dict:
    """Both ceilings on ``device``; matmul in bf16 and, if different, in ``dtype``.

    Returns ``{"copy": {...gbps}, "matmul": {"bfloat16": {...tflops}, ...}}``; an entry that
    failed holds ``{"error": ...}`` instead.
    """
    gpu = device.type != "cpu"
    warmup, rep = (5.0, 20.0) if quick else (10.0, 60.0)
    out: dict = {"matmul": {}}
    try:
        out["copy"] = copy_bandwidth(device, GPU_COPY_BYTES if gpu else CPU_COPY_BYTES, warmup_ms=warmup, rep_ms=rep)
    except Exception as exc:  # noqa: BLE001 - a ceiling that fails is reported, never fatal
        out["copy"] = {"error": f"{type(exc).__name__}: {exc}"}
    n = GPU_MATMUL_N if gpu else CPU_MATMUL_N
    for dt in dict.fromkeys((torch.bfloat16, dtype)):
        key = str(dt).removeprefix("torch.")
        try:
            out["matmul"][key] = matmul_peak(device, dt, n, warmup_ms=warmup, rep_ms=rep)
        except Exception as exc:  # noqa: BLE001
            out["matmul"][key] = {"error": f"{type(exc).__name__}: {exc}"}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out
