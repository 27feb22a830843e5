"""Which device tensors outlive the dispatcher's tuning in a W8B step (GPU diagnostic).

Runs one W8B bf16 offload step with the LoRA ops tuned (the rest pinned as in ``w8b_force.txt``),
then prints ``LEAK`` lines: the allocated bytes before and after ``gc.collect()``, and the largest
live CUDA tensors that are not parameters, with the types of what refers to them.
Usage on the device: python3 benchmarks/gpu/tuning_memory_probe.py (PIN_LORA=1: nothing tuned, for comparison)
"""
from __future__ import annotations

import gc
import importlib.util
import os
import re
from pathlib import Path

import torch


def report(top: int = 25) -> None:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    gc.collect()
    after = torch.cuda.memory_allocated()
    print(f"LEAK allocated {before / 2**30:.2f} GiB, after gc.collect {after / 2**30:.2f} GiB", flush=True)
    # live blocks by the pool and stream their segment belongs to: graph pools that outlived their
    # graph (cuBLAS workspaces captured on fresh streams) show up as many small private pools
    by_pool: dict = {}
    for seg in torch.cuda.memory_snapshot():
        live = sum(b["size"] for b in seg["blocks"] if b["state"] == "active_allocated")
        if live:
            key = (tuple(seg.get("segment_pool_id", (0, 0))), seg.get("stream", 0))
            by_pool[key] = by_pool.get(key, 0) + live
    default = sum(v for (pool, _), v in by_pool.items() if pool == (0, 0))
    private = {k: v for k, v in by_pool.items() if k[0] != (0, 0)}
    print(f"LEAK default pool {default / 2**30:.2f} GiB; {len(private)} private pool/stream pairs hold "
          f"{sum(private.values()) / 2**30:.2f} GiB: "
          + ", ".join(f"{v / 2**20:.0f} MiB" for v in sorted(private.values(), reverse=True)[:12]), flush=True)
    tensors = [o for o in gc.get_objects()
               if isinstance(o, torch.Tensor) and o.is_cuda and not isinstance(o, torch.nn.Parameter)]
    tensors.sort(key=lambda t: -t.untyped_storage().nbytes())
    seen: set[int] = set()
    for t in tensors[:top * 2]:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        refs = []
        for r in gc.get_referrers(t):
            if r is tensors:
                continue
            keys = ":" + ",".join(map(str, list(r.keys())[:6])) if isinstance(r, dict) else ""
            refs.append(type(r).__name__ + keys)
        print(f"LEAK {t.untyped_storage().nbytes() / 2**20:.0f} MiB {tuple(t.shape)} {t.dtype} refs={refs[:4]}",
              flush=True)


def main() -> None:
    spec = importlib.util.spec_from_file_location("w8b", "benchmarks/train/w8b.py")
    w8b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(w8b)
    log = w8b.log

    def log_and_report(message: str) -> None:
        log(message)
        if message.startswith("step 0"):
            report()

    w8b.log = log_and_report
    force = Path("benchmarks/gpu/w8b_force.txt").read_text().strip()
    if os.environ.get("PIN_LORA") != "1":  # PIN_LORA=1: everything pinned, the baseline to compare with
        force = re.sub(r"lora_linear(_group)?=[^]]*\],?", "", force).rstrip(",")
    os.environ["SLIPSTREAM_FORCE"] = force
    w8b.run("llama3-8b", "bf16", "offload", 2, 2048, 1, 1, "cuda")


if __name__ == "__main__":
    main()
