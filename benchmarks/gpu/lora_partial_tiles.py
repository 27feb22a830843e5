"""Which part of the fused LoRA kernel goes wrong on partial tiles on a GPU (diagnostic).

Runs ``kernels.lora._launch`` for one odd shape in each mode (forward with xa given or computed in the
loop; backward with or without the dA partials, the dB partials, the loop's dY @ B) and prints the
relative error of every output against fp64 math. Each case runs in its own process, so an illegal
address in one does not hide the others. Usage: python3 benchmarks/gpu/lora_partial_tiles.py [M K N R]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

CASES = ["fwd_xa_given", "fwd_xa_loop", "bwd_plain", "bwd_e", "bwd_g", "bwd_e_g", "bwd_xa_given_e", "bwd_bcols",
         "bwd_bcols_e"]
"""``bwd_bcols*``: B passed column-major (the candidate fix for the rank-3 failure), the others row-major."""
CFG = {"block_m": 128, "block_n": 256, "block_k": 64, "gemm_warps": 8, "stages": 4, "group_m": 8}


def one(case: str, m: int, k: int, n: int, r: int, dtype: str) -> dict:
    import torch

    from slipstream.kernels import lora as L

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    dev = os.environ.get("PROBE_DEVICE", "cuda")
    x = torch.randn(m, k, device=dev).to(dt)
    w, a = (torch.randn(n, k, device=dev) * k ** -0.5).to(dt), (torch.randn(r, k, device=dev) * k ** -0.5).to(dt)
    b, dy = torch.randn(n, r, device=dev).to(dt), torch.randn(m, n, device=dev).to(dt)
    f = torch.Tensor.double
    xa = f(x) @ f(a).T
    dyb = f(dy) @ f(b)
    out = {}
    if case.startswith("fwd"):
        if case == "fwd_xa_given":
            res = L._launch(x, w, CFG, forward=True, left=(x @ a.T), lora_f2=b, alpha=0.7)
        else:
            left = torch.empty(m, r, device=dev, dtype=dt)
            res = L._launch(x, w, CFG, forward=True, lora_f1=a, lora_f2=b, alpha=0.7, left_out=left)
            out["xa"] = (res.left, xa)
        out["out"] = (res.out, f(x) @ f(w).T + 0.7 * xa @ f(b).T)
    else:
        e = x if "_e" in case else None
        g = (x @ a.T) if case.endswith("_g") or "_e_g" in case else None
        if case.startswith("bwd_bcols"):
            res = L._launch(dy, w, CFG, forward=False, lora_f1=b.t().contiguous().t(), lora_f2=a, alpha=0.7, e=e)
        elif case == "bwd_xa_given_e":
            res = L._launch(dy, w, CFG, forward=False, left=(dy @ b), lora_f2=a, alpha=0.7, e=x)
        else:
            res = L._launch(dy, w, CFG, forward=False, lora_f1=b, lora_f2=a, alpha=0.7, e=e, g=g)
        out["dx"] = (res.out, f(dy) @ f(w) + 0.7 * dyb @ f(a))
        if res.e_part is not None:
            out["da"] = (res.e_part.sum(0), dyb.T @ f(x))
        if res.g_part is not None:
            out["db"] = (res.g_part.sum(0), f(dy).T @ f(g))
    if dev == "cuda":
        torch.cuda.synchronize()
    return {name: float((f(got) - want).abs().max() / want.abs().max()) for name, (got, want) in out.items()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        case, dtype, *dims = sys.argv[2:]
        print(json.dumps(one(case, *map(int, dims), dtype)))
        return
    dims = sys.argv[1:5] or ["13", "40", "27", "3"]
    for dtype in os.environ.get("PROBE_DTYPES", "bfloat16,float16,float32").split(","):
        for case in os.environ.get("PROBE_CASES", ",".join(CASES)).split(","):
            done = subprocess.run([sys.executable, __file__, "--one", case, dtype, *dims], capture_output=True,
                                  text=True, timeout=120, env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"})
            last = (done.stdout.strip().splitlines() or [""])[-1]
            err = "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1][:160]
            print(f"{dtype:9} {case:16} {last} {err}", flush=True)


if __name__ == "__main__":
    main()
