"""Where a W8B training step's time goes: one step under ``torch.profiler`` after warm-up.

Prints (and writes as JSON with ``--out``): the step's wall time, the GPU's busy time (the union of
kernel and copy intervals, so overlap is not double counted) and idle time (wall minus busy: the
host not keeping the GPU fed, or waiting on a synchronisation), the device time per kernel category
(GEMM, attention, slipstream's Triton kernels, copies, other) and the top kernels and host-side ops.

    python benchmarks/train/profile_step.py --base nf4 --checkpointing offload --out $OUT/profile_nf4.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from w8b import SHAPES, build  # noqa: E402

CATEGORIES = (  # first match wins; names are lower-cased kernel names
    ("attention", ("flash", "fmha", "cudnn", "attn", "sdpa")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "cublas")),
    ("copy", ("memcpy", "memset")),
    ("torch elementwise / reductions / optimizer", ("at::native", "void ")),
)


def category(name: str) -> str:
    """The kernel's category; slipstream's Triton kernels are the ``_``-prefixed jit functions."""
    low = name.lower()
    for label, keys in CATEGORIES:
        if any(k in low for k in keys):
            return label
    return "slipstream triton" if name.startswith("_") else "other"


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start_us, end_us)`` intervals, in ms."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1000


def host_profile(step, sync, top: int = 40) -> dict:
    """One step under ``cProfile`` (no torch profiler): where the host's Python time goes, by self
    time and by cumulative time, as ``(function, calls, ms)``."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    sync()
    t = time.perf_counter()
    prof.enable()
    step()
    prof.disable()
    host_ms = (time.perf_counter() - t) * 1000
    sync()
    stats = pstats.Stats(prof).stats

    def name(key: tuple) -> str:
        file, line, fn = key
        return f"{'/'.join(Path(file).parts[-2:])}:{line}:{fn}"

    rows = [(name(k), v[1], v[2] * 1000, v[3] * 1000) for k, v in stats.items()]
    return dict(host_ms_under_cprofile=round(host_ms, 1),
                by_self_ms=[(n, c, round(s, 1)) for n, c, s, _ in sorted(rows, key=lambda r: -r[2])[:top]],
                by_cumulative_ms=[(n, c, round(cu, 1)) for n, c, _, cu in sorted(rows, key=lambda r: -r[3])[:top]])


def profile(base: str, checkpointing: object, bsz: int, seq: int, warm: int, shape: str = "llama3-8b",
            device: str = "cuda", layers: int | None = None, host: bool = False) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, cfg = build(shape, base, checkpointing, device, layers)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(1)

    def step() -> None:
        ids = torch.randint(0, cfg.vocab_size, (bsz, seq), device=device, generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warm):
        step()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    host_side = host_profile(step, sync) if host else None
    sync()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step()
        sync()
        wall_ms = (time.perf_counter() - t) * 1000
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        events = json.loads(Path(trace).read_text())["traceEvents"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in gpu]
    busy = union_ms(intervals)
    span = (max(e for _, e in intervals) - min(s for s, _ in intervals)) / 1000 if intervals else 0.0
    by_cat: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in gpu:
        by_cat[category(e["name"])] += e["dur"] / 1000
        k = by_kernel[e["name"][:90]]
        k[0] += 1
        k[1] += e["dur"] / 1000
    host = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    by_host: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in host:
        h = by_host[e["name"][:60]]
        h[0] += 1
        h[1] += e["dur"] / 1000
    launches = sum(1 for e in events if e.get("cat") == "cuda_runtime" and "Launch" in e.get("name", ""))
    return dict(
        base=base, checkpointing=str(checkpointing), bsz=bsz, seq=seq, wall_ms=round(wall_ms, 1),
        gpu_busy_ms=round(busy, 1), gpu_span_ms=round(span, 1), gpu_idle_ms=round(wall_ms - busy, 1),
        kernel_launches=launches, kernels=len(gpu),
        by_category_ms={k: round(v, 1) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        top_kernels=[(n, c, round(ms, 2)) for n, (c, ms) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:30]],
        top_host_ops=[(n, c, round(ms, 1)) for n, (c, ms) in sorted(by_host.items(), key=lambda kv: -kv[1][1])[:25]],
        shape=shape, layers=cfg.num_hidden_layers, host=host_side,
        device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        torch=torch.__version__, date=time.strftime("%Y-%m-%d"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="bf16", choices=("bf16", "nf4"))
    ap.add_argument("--checkpointing", default="offload")
    ap.add_argument("--bsz", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's decoder layer count")
    ap.add_argument("--host", action="store_true", help="also profile one step's Python time with cProfile")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    a = ap.parse_args()
    policy = {"true": True, "false": False}.get(a.checkpointing.lower(), a.checkpointing)
    result = profile(a.base, policy, a.bsz, a.seq, a.warm, a.shape, a.device, a.layers, a.host)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
