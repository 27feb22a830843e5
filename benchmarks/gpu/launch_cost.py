"""Host time per call of a few torch ops and a Triton launch on this machine (microseconds).

The lent machines' host CPUs differ between loans; this calibrates a run's host-bound numbers."""

import time

import torch
import triton
import triton.language as tl


@triton.jit
def _copy(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def host_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return elapsed


def main() -> None:
    x = torch.zeros(1024, device="cuda")
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    cases = {
        "view": lambda: a.view(-1),
        "to same dtype": lambda: a.to(torch.bfloat16),
        "empty 64x64": lambda: torch.empty(64, 64, device="cuda"),
        "mm 64x64": lambda: torch.mm(a, a),
        "addmm_ 64x64": lambda: a.addmm_(a, a, beta=0),
        "triton launch": lambda: _copy[(1,)](x, 1024, BLOCK=1024),
        "add": lambda: a + a,
    }
    for name, fn in cases.items():
        print(f"{name:28s} {host_us(fn):6.1f} us host/call", flush=True)


if __name__ == "__main__":
    main()
