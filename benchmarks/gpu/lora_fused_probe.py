"""GPU time of the LoRA linear pieces at Llama-3.1-8B shapes (bf16, r=16, 4096 tokens): cuBLAS base
GEMMs, the Triton GEMM with LoRA fused into its main loop (``kernels.lora._launch``) per tile config,
and whole ``lora_linear`` forward+backward per config, each against the base GEMM pair (x @ W.T, dY @ W).

GPU ms come from CUDA-graph replays (no host overhead, no L2 flush between calls), as the op
benchmark's ``GPU ms (graph)`` column. Usage: python3 benchmarks/gpu/lora_fused_probe.py [--json F]
"""
from __future__ import annotations

import argparse
import json
import statistics

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


def cfg_of(tile: tuple, base: str = "fused", db: str = "mm", xa: str = "loop", dyb: str = "loop") -> dict:
    bm, bn, bk, w, st, tma = tile
    return {"base": base, "bytes": 4096, "num_warps": 8, "block_m": bm, "block_n": bn, "block_k": bk,
            "gemm_warps": w, "stages": st, "group_m": 8, "db": db, "xa": xa, "dyb": dyb, "tma": tma}


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


ROUNDS = 3
WHOLE_CONFIGS = [("loop", "loop"), ("mm", "mm"), ("loop", "mm")]  # (xa, dyb) on the 128x256x64 s4 tile


def paired(name: str, what: str, base_fn, fn) -> dict:
    """``fn`` timed right after the base GEMM pair, ``ROUNDS`` times: the ratio of each adjacent pair,
    so that the GPU's clock drifting over a run (seen: 5-10 %) does not enter the ratio."""
    pairs = []
    for _ in range(ROUNDS):
        base = gpu_ms(base_fn, reps=10)
        pairs.append((gpu_ms(fn, reps=10), base))
    ms_, bases = zip(*pairs, strict=True)
    return {"shape": name, "what": what, "ms": statistics.median(ms_), "base_ms": statistics.median(bases),
            "x_base": statistics.median(m / b for m, b in pairs)}


def _run_configs(name: str, label: str, base_fn, step_of) -> list[dict]:
    configs = [("cublas", L.CONFIGS[1])] + [
        (f"fused 128x256x64 w8 s4 xa={xa} dyb={dyb}", cfg_of(TILES[1], xa=xa, dyb=dyb)) for xa, dyb in WHOLE_CONFIGS]
    rows = []
    for tag, cfg in configs:
        try:
            rows.append(paired(name, f"{label} {tag}", base_fn, step_of(cfg)))
        except Exception as exc:  # noqa: BLE001 - a config that fails is reported, not fatal
            rows.append({"shape": name, "what": f"{label} {tag}", "error": repr(exc)[:300]})
        print(json.dumps(rows[-1]), flush=True)
    bases = [r["base_ms"] for r in rows if "base_ms" in r]
    return [{"shape": name, "what": "cublas base fwd+dX", "ms": statistics.median(bases) if bases else None}, *rows]


def whole(name: str, m: int, k: int, n: int, r: int = 16) -> list[dict]:
    """lora_linear forward+backward through autograd (x, A, B need grad), per config, vs base GEMMs."""
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(n, k, device=dev) / k ** 0.5).to(dt)
    a = (torch.randn(r, k, device=dev) / k ** 0.5).to(dt).requires_grad_()
    b = (torch.randn(n, r, device=dev) * 0.1).to(dt).requires_grad_()
    dy = torch.randn(m, n, device=dev, dtype=dt)
    xd = x.detach()

    def step_of(cfg):
        def step():
            y = L.lora_linear(x, w, a, b, 2.0, config=cfg)
            torch.autograd.grad(y, (x, a, b), dy)
        return step

    return _run_configs(name, "lora_linear", lambda: (torch.mm(xd, w.t()), torch.mm(dy, w)), step_of)


GROUPS = {"q+k+v": (4096, 4096, (4096, 1024, 1024)), "gate+up": (4096, 4096, (14336, 14336))}


def group(name: str, m: int, k: int, ns: tuple, r: int = 16) -> list[dict]:
    """lora_linear_group forward+backward per config, vs the members' base GEMM pairs (cuBLAS)."""
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
    ws = [(torch.randn(n, k, device=dev) / k ** 0.5).to(dt) for n in ns]
    a_s = [(torch.randn(r, k, device=dev) / k ** 0.5).to(dt).requires_grad_() for _ in ns]
    b_s = [(torch.randn(n, r, device=dev) * 0.1).to(dt).requires_grad_() for n in ns]
    dys = [torch.randn(m, n, device=dev, dtype=dt) for n in ns]
    xd = x.detach()

    def step_of(cfg):
        def step():
            ys = L.lora_linear_group(x, ws, a_s, b_s, [2.0] * len(ns), config=cfg)
            torch.autograd.grad(ys, (x, *a_s, *b_s), dys)
        return step

    def base():
        for w, d in zip(ws, dys, strict=True):
            torch.mm(xd, w.t())
            torch.mm(d, w)

    return _run_configs(name, "lora_linear_group", base, step_of)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--whole-only", action="store_true", help="only lora_linear fwd+bwd per config")
    parser.add_argument("--groups", default="", help="also time these groups: " + ",".join(GROUPS))
    args = parser.parse_args()
    rows = []
    for name in args.shapes.split(","):
        if not args.whole_only:
            rows += probe(name, *SHAPES[name])
        rows += whole(name, *SHAPES[name])
    for name in filter(None, args.groups.split(",")):
        rows += group(name, *GROUPS[name])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
