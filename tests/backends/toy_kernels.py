"""Test-only portable kernels: exercise the backends' tuning spaces and the compile matrix without
depending on which real kernels exist yet. Never registered outside tests.

* ``toy_swiglu``: elementwise, no ``tl.dot`` (a memory-bound row kernel's space).
* ``toy_gemm``: a tiled ``tl.dot`` kernel for ``lora_linear``'s base GEMM (MFMA/WMMA/DPAS options,
  LDS-sized tiles). Its last config (512x128x64 tiles: 80 KiB of operands per buffer) fits CDNA4's
  160 KiB with 2 stages and no 64 KiB family at all.
* ``BROKEN``: a kernel whose ``aot`` raises, to check that the compile matrix fails loudly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels import PortableKernel
from slipstream.kernels._aot import AotUnit, ptr


@triton.jit
def _toy_swiglu_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


SWIGLU_CONFIGS = [{"num_warps": 4, "BLOCK": 1024}, {"num_warps": 8, "BLOCK": 4096},
                  {"num_warps": 32, "BLOCK": 8192}]


def toy_swiglu(gate: torch.Tensor, up: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """Forward-only elementwise SwiGLU (test kernel)."""
    cfg = config or SWIGLU_CONFIGS[0]
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    n = g.numel()
    grid = (triton.cdiv(n, cfg["BLOCK"]),)
    _toy_swiglu_kernel[grid](g, u, y, n, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return y


def toy_swiglu_aot(config: dict, dtype: torch.dtype = torch.bfloat16) -> list[AotUnit]:
    p = ptr(dtype)
    sig = {"G": p, "U": p, "Y": p, "n": "i32", "BLOCK": "constexpr"}
    return [AotUnit("toy_swiglu", _toy_swiglu_kernel, sig,
                    {"BLOCK": config["BLOCK"]}, {"num_warps": config["num_warps"]})]


@triton.jit
def _toy_gemm_kernel(A, B, C, M, N, K, stride_am, stride_bn, stride_cm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * stride_am + (k0 + rk)[None, :],
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        b = tl.load(B + rn[None, :] * stride_bn + (k0 + rk)[:, None],
                    mask=(rn[None, :] < N) & ((k0 + rk)[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


GEMM_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 512, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
]


def toy_lora_linear(x, weight, lora_a, lora_b, scaling, bias=None, config: dict | None = None):
    """Test kernel: the fused LoRA linear in plain torch (only its AOT GEMM unit is compiled)."""
    out = x @ weight.t() + scaling * ((x @ lora_a.t()) @ lora_b.t())
    return out if bias is None else out + bias


def toy_gemm_aot(config: dict, dtype: torch.dtype = torch.bfloat16) -> list[AotUnit]:
    p = ptr(dtype)
    sig = {"A": p, "B": p, "C": p, "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_bn": "i32",
           "stride_cm": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    consts = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    options = {"num_warps": config["num_warps"], "num_stages": config.get("num_stages", 2)}
    return [AotUnit("toy_gemm", _toy_gemm_kernel, sig, consts, options)]


def _broken_aot(config: dict) -> list[AotUnit]:
    raise RuntimeError("this test kernel's aot always fails")


KERNELS = [
    PortableKernel(op="swiglu", name="toy_swiglu", fn=toy_swiglu, configs=SWIGLU_CONFIGS, aot=toy_swiglu_aot,
                   description="test-only elementwise kernel"),
    PortableKernel(op="lora_linear", name="toy_gemm", fn=toy_lora_linear, configs=GEMM_CONFIGS,
                   aot=toy_gemm_aot,
                   description="test-only tl.dot kernel"),
]

BROKEN = [
    PortableKernel(op="swiglu", name="toy_broken", fn=toy_swiglu, configs=SWIGLU_CONFIGS[:1], aot=_broken_aot,
                   description="test-only kernel whose aot raises"),
]
