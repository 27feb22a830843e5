"""Measuring what dispatch costs per call once a decision exists (the hot path: check + dict lookup)."""

from __future__ import annotations

import time

import torch


def _per_call_us(fn, args: tuple, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls * 1e6


def _interleaved_best(fns: list, args: tuple, calls: int, repeats: int = 7) -> list[float]:
    """Best per-call time of each function, runs interleaved so a load spike hits all alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], _per_call_us(fn, args, calls))
    return best


def measure_overhead(rows: int = 4, hidden: int = 64, calls: int = 20000) -> dict[str, float | str]:
    """Microseconds per ``slipstream.ops.rms_norm`` call vs calling the chosen implementation directly.

    CPU tensors under ``torch.no_grad``, so the difference is the dispatcher's own work: validating
    the arguments into a key, one dict lookup, one indirect call. Best of 7 interleaved runs.
    """
    from slipstream import ops
    from slipstream.dispatch import dispatcher, forced
    from slipstream.ops import SPECS

    spec = SPECS["rms_norm"]
    x, w = torch.randn(rows, hidden), torch.randn(hidden)
    args = (x, w, 1e-6, 0.0)
    # The reference is pinned so the measured function is the same everywhere (under Triton's CPU
    # interpreter a kernel would cost milliseconds and drown the microseconds being measured).
    with torch.no_grad(), forced("rms_norm", "reference.rms_norm"):
        ops.rms_norm(*args)  # decide once
        chosen = dispatcher()._table[spec.check(args)]
        direct, dispatched, check_only = _interleaved_best(
            [chosen, ops.rms_norm, lambda *a: spec.check(a)], args, max(1, calls // 7))
        label = dispatcher().decisions("rms_norm")[-1].chosen
    return {"direct_us": direct, "dispatched_us": dispatched, "overhead_us": dispatched - direct,
            "check_and_key_us": check_only, "chosen": label}
