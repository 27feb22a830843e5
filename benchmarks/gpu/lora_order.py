"""Which order is faster for ``x @ W.T + s * xa @ B.T`` on cuBLAS: base GEMM then LoRA accumulate
(the output read and written once more), or LoRA first and the base GEMM accumulating (beta=1)?"""
import torch

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16


def gpu_ms(fn, reps=50):
    for _ in range(5):
        fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    g.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


def compare(m: int, k: int, n: int, rank: int = 16) -> str:
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
    xa = torch.randn(m, rank, device=dev, dtype=dt)
    b = torch.randn(n, rank, device=dev, dtype=dt)
    out = torch.empty(m, n, device=dev, dtype=dt)
    base = gpu_ms(lambda: torch.mm(x, w.t(), out=out))
    base_first = gpu_ms(lambda: torch.mm(x, w.t(), out=out).addmm_(xa, b.t()))
    lora_first = gpu_ms(lambda: out.addmm_(xa, b.t(), beta=0).addmm_(x, w.t()))
    beta1 = gpu_ms(lambda: out.addmm_(x, w.t()))
    lora_only = gpu_ms(lambda: out.addmm_(xa, b.t(), beta=0))
    return (f"M={m} K={k} N={n}: base {base:.3f}  base beta=1 {beta1:.3f}  lora write {lora_only:.3f}  "
            f"base+lora {base_first:.3f} ({base_first / base:.2f}x)  lora+base(beta=1) {lora_first:.3f} "
            f"({lora_first / base:.2f}x)")


if __name__ == "__main__":
    for shape in ((4096, 4096, 4096), (4096, 4096, 1024), (4096, 4096, 14336), (4096, 14336, 4096)):
        print(compare(*shape), flush=True)
