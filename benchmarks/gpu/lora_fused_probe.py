"""GPU time of the LoRA linear pieces at Llama-3.1-8B shapes (bf16, r=16, 4096 tokens): cuBLAS base
GEMMs, the Triton GEMM with LoRA fused into its main loop (``kernels.lora._launch``) per tile config,
and whole ``lora_linear`` forward+backward per config, each against the base GEMM pair (x @ W.T, dY @ W).

GPU ms come from CUDA-graph replays (no host overhead, no L2 flush between calls), as the op
benchmark's ``GPU ms (graph)`` column. Usage: python3 benchmarks/gpu/lora_fused_probe.py [--json F]
"""
from __future__ import annotations

import argparse
import json

import torch

from slipstream.dispatch.graph_timing import graph_ms
from slipstream.kernels import lora as L

dev, dt = "cuda", torch.bfloat16
# (block_m, block_n, block_k, warps, stages, TMA tiles)
TILES = [(128, 256, 64, 8, 3, True), (128, 256, 64, 8, 4, True), (256, 128, 64, 8, 3, True),
         (128, 128, 128, 8, 3, True), (128, 128, 64, 8, 4, True)]
SHAPES = {"q/o": (4096, 4096, 4096), "k/v": (4096, 4096, 1024), "gate/up": (4096, 4096, 14336),
          "down": (4096, 14336, 4096)}


def gpu_ms(fn, reps: int = 20) -> float:
    """Median GPU ms of one ``fn()``, from CUDA-graph replays of ``reps`` back-to-back calls."""
    return graph_ms(fn, torch.device(dev), iters_per_graph=reps, replays=5)


def cfg_of(tile: tuple, base: str = "fused", db: str = "mm", xa: str = "loop") -> dict:
    bm, bn, bk, w, st, tma = tile
    return {"base": base, "bytes": 4096, "num_warps": 8, "block_m": bm, "block_n": bn, "block_k": bk,
            "gemm_warps": w, "stages": st, "group_m": 8, "db": db, "xa": xa, "tma": tma}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def probe(name: str, m: int, k: int, n: int, r: int = 16) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = (torch.randn(n, k, device=dev) / k ** 0.5).to(dt)
    a = (torch.randn(r, k, device=dev) / k ** 0.5).to(dt)
    b = (torch.randn(n, r, device=dev) * 0.1).to(dt)
    dy = torch.randn(m, n, device=dev, dtype=dt)
    xa = x @ a.t()
    out, dx = torch.empty(m, n, device=dev, dtype=dt), torch.empty(m, k, device=dev, dtype=dt)
    rows = []
    fwd = gpu_ms(lambda: torch.mm(x, w.t(), out=out))
    bwd = gpu_ms(lambda: torch.mm(dy, w, out=dx))
    base = fwd + bwd
    rows.append({"shape": name, "what": "cublas base fwd+dX", "ms": base, "fwd": fwd, "bwd": bwd})
    ref_out = x.float() @ w.float().t() + 2.0 * (x.float() @ a.float().t()) @ b.float().t()
    dyb = dy.float() @ b.float()
    ref_dx = dy.float() @ w.float() + 2.0 * dyb @ a.float()
    ref_da, ref_db = 2.0 * dyb.t() @ x.float(), 2.0 * dy.float().t() @ xa.float()
    for tile in TILES:
        cfg = cfg_of(tile)
        tag = "x".join(map(str, tile[:3])) + f" w{tile[3]} s{tile[4]}" + (" tma" if tile[5] else "")
        try:
            f_ms = gpu_ms(lambda c=cfg: L._launch(x, w, c, forward=True, lora_f1=a, lora_f2=b, alpha=2.0, left_out=xa))
            plain = gpu_ms(lambda c=cfg: L._launch(x, w, c, forward=True, left=xa, lora_f2=b, alpha=2.0, out=out))
            b_ms = gpu_ms(lambda c=cfg: L._launch(dy, w, c, forward=False, lora_f1=b, lora_f2=a, alpha=2.0, e=x, g=xa,
                                            out=dx))
            b_noG = gpu_ms(lambda c=cfg: L._launch(dy, w, c, forward=False, lora_f1=b, lora_f2=a, alpha=2.0, e=x,
                                             out=dx))
            fr = L._launch(x, w, cfg, forward=True, lora_f1=a, lora_f2=b, alpha=2.0, left_out=torch.empty_like(xa))
            br = L._launch(dy, w, cfg, forward=False, lora_f1=b, lora_f2=a, alpha=2.0, e=x, g=xa)
            errs = {"out": rel(fr.out, ref_out), "xa": rel(fr.left, xa.float()), "dx": rel(br.out, ref_dx),
                    "da": rel(2.0 * br.e_part.sum(0), ref_da), "db": rel(2.0 * br.g_part.sum(0), ref_db)}
            rows.append({"shape": name, "what": f"fused {tag}", "fwd": f_ms, "fwd_lin_only": plain, "bwd": b_ms,
                         "bwd_no_db": b_noG, "ms": f_ms + b_ms, "x_base": (f_ms + b_ms) / base, "errors": errs})
        except Exception as exc:  # noqa: BLE001 - a config that fails to compile or launch is reported, not fatal
            rows.append({"shape": name, "what": f"fused {tag}", "error": repr(exc)[:300]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def whole(name: str, m: int, k: int, n: int, r: int = 16) -> list[dict]:
    """lora_linear forward+backward through autograd (x, A, B need grad), per config, vs base GEMMs."""
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(n, k, device=dev) / k ** 0.5).to(dt)
    a = (torch.randn(r, k, device=dev) / k ** 0.5).to(dt).requires_grad_()
    b = (torch.randn(n, r, device=dev) * 0.1).to(dt).requires_grad_()
    dy = torch.randn(m, n, device=dev, dtype=dt)
    rows = []
    configs = [("cublas", L.CONFIGS[1])] + [
        ("fused " + "x".join(map(str, t[:3])) + f" w{t[3]} s{t[4]} xa={xa} db={db}", cfg_of(t, db=db, xa=xa))
        for t in TILES[:4] for xa, db in (("loop", "mm"), ("mm", "mm"), ("loop", "fused"))]
    for tag, cfg in configs:
        def step(cfg=cfg):
            y = L.lora_linear(x, w, a, b, 2.0, config=cfg)
            torch.autograd.grad(y, (x, a, b), dy)
        try:
            rows.append({"shape": name, "what": f"lora_linear {tag}", "ms": gpu_ms(step, reps=10)})
        except Exception as exc:  # noqa: BLE001
            rows.append({"shape": name, "what": f"lora_linear {tag}", "error": repr(exc)[:300]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    rows = []
    for name in args.shapes.split(","):
        rows += probe(name, *SHAPES[name])
        rows += whole(name, *SHAPES[name])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
