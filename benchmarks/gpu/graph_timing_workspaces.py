"""Device memory left behind by repeated CUDA-graph timings (GPU diagnostic).

Times a 512^3 bf16 GEMM with ``graph_ms`` 40 times, each on a fresh thread as the tuner does, once
with the library's one side stream and once with a fresh ``torch.cuda.Stream()`` per timing (how
the timer worked before session 9), and prints the allocated bytes each way grew by.
Usage on the device: python3 benchmarks/gpu/graph_timing_workspaces.py
"""
from __future__ import annotations

import threading

import torch

from slipstream.dispatch import graph_timing


def grown_mib(times: int = 40) -> float:
    a = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)

    def once() -> None:
        worker = threading.Thread(target=lambda: graph_timing.graph_ms(lambda: a @ b, torch.device("cuda")))
        worker.start()
        worker.join()

    once()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(times):
        once()
    torch.cuda.synchronize()
    return (torch.cuda.memory_allocated() - before) / 2**20


def main() -> None:
    print(f"one side stream: +{grown_mib():.0f} MiB after 40 timings", flush=True)
    graph_timing._side_stream = torch.cuda.Stream  # the old behaviour: a fresh stream per timing
    print(f"a fresh stream per timing: +{grown_mib():.0f} MiB after 40 timings", flush=True)


if __name__ == "__main__":
    main()
