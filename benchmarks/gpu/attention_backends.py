"""Which attention kernel runs at long sequence lengths, and what each costs (H100, bf16, causal, GQA).

Times forward and forward+backward of torch SDPA's own choice (``enable_gqa``), SDPA pinned to each
backend, and the raw flash / cuDNN operators that ``train.attention_stash`` can call (forward with
log-sum-exp, backward from it), at B=1, 32 query heads, 8 K/V heads, head dim 128.
Usage: python3 benchmarks/gpu/attention_backends.py [--seqs 16384,65536] [--json F]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from slipstream.train import attention_stash as stash


def ms(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def run(seq: int) -> list[dict]:
    torch.manual_seed(0)
    q = torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 8, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)
    rows = []

    def sdpa(backend=None):
        def fwd():
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return fwd

    cases = {"sdpa auto": sdpa(), "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
             "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)}
    for name, fwd in cases.items():
        try:
            f = ms(lambda fwd=fwd: fwd())
            fb = ms(lambda fwd=fwd: torch.autograd.grad(fwd(), (q, k, v), dout))
            rows.append({"seq": seq, "case": name, "fwd_ms": f, "fwd_bwd_ms": fb})
        except Exception as exc:  # noqa: BLE001 - a backend refusing these inputs is a result
            rows.append({"seq": seq, "case": name, "error": str(exc).splitlines()[0][:200]})
        print(json.dumps(rows[-1]), flush=True)
    for kernel in stash.KERNELS:
        try:
            kept = stash.forward_with(kernel, q.detach(), k.detach(), v.detach(), True, None)
            f = ms(lambda kernel=kernel: stash.forward_with(kernel, q.detach(), k.detach(), v.detach(), True, None))
            b = ms(lambda kernel=kernel, kept=kept: stash.backward_with(kernel, dout, q, k, v, kept, True, None))
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            err = float((kept.out.float() - ref.float()).norm() / ref.float().norm())
            rows.append({"seq": seq, "case": f"stash {kernel}", "fwd_ms": f, "bwd_ms": b, "rel_err_out": err})
        except Exception as exc:  # noqa: BLE001
            rows.append({"seq": seq, "case": f"stash {kernel}", "error": str(exc).splitlines()[0][:200]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="16384,65536")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [r for s in args.seqs.split(",") for r in run(int(s))]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
