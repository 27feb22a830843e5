"""Which Triton tile configs make the LoRA GEMM's base product as fast as cuBLAS (GPU diagnostic).

Times ``kernels.lora._launch`` with the LoRA term given (``left``: only the epilogue's rank-r product
on top of the base GEMM) for each tile config, forward (``x @ W.T``, W read K-major) and backward
(``dY @ W``, W read N-major: the dX form that session 8 found 14-25 % behind cuBLAS), against
cuBLAS's plain ``mm`` at Llama-3.1-8B shapes, bf16, 4096 tokens. GPU ms from CUDA-graph replays.
Usage on the device: python3 benchmarks/gpu/gemm_tiles.py [--json F] [--shapes q/o,k/v]
"""
from __future__ import annotations

import argparse
import json

import torch

from slipstream.dispatch.graph_timing import graph_ms
from slipstream.kernels import lora as L

DEV, DT = "cuda", torch.bfloat16
SHAPES = {"q/o": (4096, 4096, 4096), "k/v": (4096, 4096, 1024), "gate/up": (4096, 4096, 14336),
          "down": (4096, 14336, 4096)}  # (M tokens, K in, N out)
# (block_m, block_n, block_k, warps, stages)
TILES = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
         (128, 128, 64, 4, 5), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (128, 64, 64, 4, 6),
         (256, 64, 64, 8, 4), (64, 256, 64, 4, 4), (128, 256, 32, 8, 5), (256, 128, 32, 8, 5),
         (128, 128, 128, 8, 3), (64, 128, 64, 4, 5)]


def ms(fn) -> float:
    return graph_ms(fn, torch.device(DEV), iters_per_graph=10, replays=5)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def run(name: str, m: int, k: int, n: int, r: int = 16) -> list[dict]:
    torch.manual_seed(0)
    x, dy = torch.randn(m, k, device=DEV, dtype=DT), torch.randn(m, n, device=DEV, dtype=DT)
    w = (torch.randn(n, k, device=DEV) / k ** 0.5).to(DT)
    a, b = (torch.randn(r, k, device=DEV) / k ** 0.5).to(DT), (torch.randn(n, r, device=DEV) * 0.1).to(DT)
    xa, dyb = x @ a.t(), dy @ b
    ref_fwd = x.float() @ w.float().t() + xa.float() @ b.float().t()
    ref_bwd = dy.float() @ w.float() + dyb.float() @ a.float()
    rows = [{"shape": name, "what": "cublas", "fwd": ms(lambda: torch.mm(x, w.t())),
             "bwd": ms(lambda: torch.mm(dy, w))}]
    print(json.dumps(rows[0]), flush=True)
    for bm, bn, bk, warps, stages in TILES:
        cfg = {"block_m": bm, "block_n": bn, "block_k": bk, "gemm_warps": warps, "stages": stages, "group_m": 8,
               "tma": True}
        row = {"shape": name, "what": f"{bm}x{bn}x{bk} w{warps} s{stages}"}
        for direction, fn, ref in (
                ("fwd", lambda c=cfg: L._launch(x, w, c, forward=True, left=xa, lora_f2=b, alpha=1.0).out, ref_fwd),
                ("bwd", lambda c=cfg: L._launch(dy, w, c, forward=False, left=dyb, lora_f2=a, alpha=1.0).out,
                 ref_bwd)):
            try:
                row[f"{direction}_err"] = rel(fn(), ref)
                row[direction] = ms(fn)
                row[f"{direction}_x_cublas"] = row[direction] / rows[0][direction]
            except Exception as exc:  # noqa: BLE001 - a config the GPU can't run is reported, not fatal
                row[f"{direction}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    rows = [r for s in args.shapes.split(",") for r in run(s, *SHAPES[s])]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
