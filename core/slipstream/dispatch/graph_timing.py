"""GPU time of a call, replayed from a CUDA graph: what the op costs without the host's overhead.

Events around one call measure the host too whenever it is slower than the GPU (Python, autograd,
kernel launches): on the lent H100 VM a LoRA projection's fwd+bwd took 1.17 ms by events and 0.55
ms of GPU time, and the same cuBLAS GEMM timed twice by events gave 0.71 and 0.43 ms (0.357 and
0.355 by graph). :func:`graph_ms` captures back-to-back calls into one CUDA graph and times its
replays. Used by the op benchmark (``benchmarks/ops``) and, with ``SLIPSTREAM_TIMING=graph``, by the
dispatcher's tuner. A capture that fails (host syncs, pinned allocations, ...) is cleaned up: the
stream, the graph's private memory pool, and the CUDA generator a failed capture leaves in capture
mode (every later random op would raise). Verified on an H100 (torch 2.11) for ``.item()``, a
non-pinned host-to-device copy, an exception inside the capture, CPU-only work and dropout.
"""

from __future__ import annotations

import contextlib
import statistics
import warnings
from collections.abc import Callable

import torch


class GraphCaptureError(RuntimeError):
    """:func:`graph_ms` could not capture or replay the calls (the message says why; the state
    the failed capture left behind has been cleaned up)."""


GRAPH_WARMUP = 3
GRAPH_MAX_ITERS = 20
_ABANDONED_GRAPHS: list = []  # failed captures, kept alive: a stale allocator filter may point at them
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream() -> torch.cuda.Stream:
    """The one side stream every capture on the current device runs on.

    cuBLAS keeps a workspace per (handle, stream), allocated on first use; a GEMM captured into a
    graph allocates it from the graph's private pool, and the workspace cache keeps it for the life
    of the process. A fresh ``torch.cuda.Stream()`` per timing (the pool hands out 32 per priority)
    left a new workspace behind each time: after a W8B step with the LoRA ops tuned, 2.03 GiB more
    was allocated than with them pinned (H100, torch 2.11). One stream leaves one workspace. Clearing
    the cache instead (what inductor does around its captures) would also free the workspaces the
    training step's own graphs captured, which their replays keep using."""
    index = torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream()
    return stream


def graph_ms(fn: Callable[[], object], device: torch.device, *, iters_per_graph: int = 20,
             replays: int = 10, warmup: int = GRAPH_WARMUP) -> float | None:
    """Median GPU milliseconds of one ``fn()``, replayed from a CUDA graph: no host overhead.

    ``fn`` is warmed up ``warmup`` times on a side stream, then ``iters_per_graph`` back-to-back
    calls are captured into one ``torch.cuda.CUDAGraph``; the graph is replayed once untimed
    (upload), then ``replays`` times between CUDA events, queued back to back so that the GPU never
    waits for the host. Result: the median over replays of ``elapsed / iters_per_graph``.

    What it measures differs from event timing around single calls
    (:func:`slipstream.dispatch.timing.median_ms`) in two ways:

    * no host time: Python, autograd bookkeeping and kernel launches are not replayed, so for a
      small op whose launches take longer than its kernels this is the GPU's own time (what the
      op costs inside a graph-captured or otherwise GPU-bound training step), where event timing
      gives the host-bound time;
    * no L2 flush between iterations inside a graph: call ``i + 1`` may find in L2 what call ``i``
      left there. That flatters only ops whose working set fits in L2 (50 MB on an H100); the
      Llama-shaped headline cases read far more (rms_norm 16384x4096 bf16: 128 MB of input).

    Returns ``None`` where the device is not CUDA (there is nothing to capture). Raises
    :class:`GraphCaptureError` when capture or replay fails: ops that synchronise with the host
    (``.item()``, ``.tolist()``, a blocking copy), allocate pinned host memory, launch on the legacy
    default stream or still tune on the call can't be captured. Before raising it ends a capture
    still under way, returns the allocator's private pool, restores the current stream and
    synchronises. The graph and its memory pool are freed before returning either way.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if iters_per_graph < 1 or replays < 1:
        raise ValueError(f"iters_per_graph ({iters_per_graph}) and replays ({replays}) must be >= 1")
    with torch.cuda.device(device):
        return _graph_ms(fn, iters_per_graph, replays, warmup)


def graph_iters(estimate_ms: float | None, budget_ms: float, replays: int, max_iters: int = GRAPH_MAX_ITERS) -> int:
    """Calls per CUDA graph: as many as fit ``budget_ms`` over ``replays`` replays, 1 to ``max_iters``."""
    if not estimate_ms or estimate_ms <= 0:
        return max_iters
    return max(1, min(max_iters, int(budget_ms / (replays * estimate_ms))))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def _graph_ms(fn: Callable[[], object], iters: int, replays: int, warmup: int) -> float:
    # Failures are raised outside the except blocks (no exception context): the failed call's
    # traceback would keep its tensors, some in the graph's pool, alive.
    caller = torch.cuda.current_stream()
    side = _side_stream()
    failure: str | None = None
    # 1. warm up on a side stream (lazy initialisation, autotuning and compilation happen here, not
    #    in the capture), as torch.cuda.graph's documentation asks
    try:
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        caller.wait_stream(side)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - reported as GraphCaptureError below
        torch.cuda.set_stream(caller)
        failure = f"warm-up failed: {_first_line(exc)}"
    if failure is not None:
        raise GraphCaptureError(failure)
    # 2. capture into a private pool whose id is known here, so that a failed capture can be undone
    pool = torch.cuda.graph_pool_handle()
    graphs = [torch.cuda.CUDAGraph()]  # the only reference: _free drops it before emptying the cache
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.cuda.graph(graphs[0], pool=pool, stream=side):
                for _ in range(iters):
                    fn()
    except Exception as exc:  # noqa: BLE001 - reported as GraphCaptureError below
        _abandon(graphs, pool, side, caller)
        what = _first_line(exc)
        hint = " (a host sync such as .item(), or another operation graphs forbid)" if "captur" in what else ""
        failure = f"capture failed{hint}: {what}"
    if failure is not None:
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()  # what the failed call's tensors held is free by now
        if not _rng_usable(side, caller):
            failure += "; the default CUDA generator was left in capture mode (random ops will fail)"
        raise GraphCaptureError(failure)
    for w in caught:
        if "graph is empty" in str(w.message).lower():
            failure = "the capture holds no GPU work (fn launched nothing on the capturing stream)"
        else:
            warnings.warn(w.message, w.category, stacklevel=3)
    # 3. replay once untimed (uploads the graph), then timed replays queued back to back
    per_call: list[float] = []
    try:
        if failure is None:
            graphs[0].replay()
            torch.cuda.synchronize()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(replays)]
            for start, end in events:
                start.record()
                graphs[0].replay()
                end.record()
            torch.cuda.synchronize()
            per_call = [start.elapsed_time(end) / iters for start, end in events]
    except Exception as exc:  # noqa: BLE001 - reported as GraphCaptureError below
        failure = f"replay failed: {_first_line(exc)}"
    finally:
        _free(graphs, caller)
    if failure is not None:
        raise GraphCaptureError(failure)
    ms = float(statistics.median(per_call))
    if not 0 < ms < float("inf"):
        raise GraphCaptureError(f"replays timed {ms} ms per call")
    return ms


def _free(graphs: list, caller) -> None:
    """Drop a captured graph (``graphs`` holds the only reference) and return its private pool's
    memory to the device, so it can't inflate later measurements."""
    torch.cuda.set_stream(caller)
    try:
        torch.cuda.synchronize()
    finally:
        graphs.clear()
        torch.cuda.empty_cache()


def _abandon(graphs: list, pool, side, caller) -> None:
    """Clean up after a capture that raised; every step is best effort and never raises.

    ``torch.cuda.graph.__exit__`` ends the capture (``capture_end``), but when that raises (an
    invalidated capture) it skips restoring the current stream, and (depending on the torch version)
    the allocator may still list the capture and never release the graph's private pool."""
    g = graphs[0]
    with contextlib.suppress(Exception), torch.cuda.stream(side):
        if torch.cuda.is_current_stream_capturing():  # capture_end never reached cudaStreamEndCapture
            g.capture_end()
    torch.cuda.set_stream(caller)
    try:
        g.pool()  # raises unless the capture ended successfully: then g owns its pool and frees it
    except Exception:  # noqa: BLE001
        pass
    else:
        del g
        with contextlib.suppress(Exception):
            _free(graphs, caller)
        return
    index = torch.cuda.current_device()
    for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):  # what capture_end / reset skipped
        undo = getattr(torch._C, name, None)
        if undo is not None:
            with contextlib.suppress(Exception):  # raises where this torch version already did it
                undo(index, pool)
    with contextlib.suppress(Exception):  # drops the generators' capture state where torch keeps one per capture
        g.reset()
    _ABANDONED_GRAPHS.append(graphs.pop())  # kept: a stale allocator filter may still point at it
    with contextlib.suppress(Exception):  # a sticky CUDA error is the caller's to meet next
        torch.cuda.synchronize()
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()


def _rng_usable(side, caller) -> bool:
    """Whether the default CUDA generator works after a failed capture, fixing it if need be.

    ``capture_begin`` puts the device's default generator in capture mode and only a successful
    ``capture_end`` takes it out: after a failed capture every random op (``torch.randn`` on the
    device, dropout) raises "Offset increment outside graph capture encountered unexpectedly".
    A trivial successful capture resets it. The probe restores the generator's state after
    itself, so the random streams callers draw from don't move."""
    device = torch.device("cuda", torch.cuda.current_device())

    def probe() -> bool:
        try:
            state = torch.cuda.get_rng_state(device)
            torch.empty(4, device=device).normal_()
            torch.cuda.set_rng_state(state, device)
            return True
        except Exception:  # noqa: BLE001
            return False

    if probe():
        return True
    with contextlib.suppress(Exception):
        dummy = torch.cuda.CUDAGraph()
        buf = torch.zeros(1, device=device)
        with torch.cuda.graph(dummy, stream=side):
            buf.add_(1)
        torch.cuda.synchronize()
        del dummy, buf
        torch.cuda.empty_cache()
    torch.cuda.set_stream(caller)
    return probe()


__all__ = ["GRAPH_MAX_ITERS", "GRAPH_WARMUP", "GraphCaptureError", "graph_iters", "graph_ms"]
