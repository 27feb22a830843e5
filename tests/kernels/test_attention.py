"""The Triton FlashAttention kernel against the ``attention`` reference, forward and backward.

Runs under Triton's CPU interpreter (set by conftest), so shapes are small; the tiny test-only
config makes short sequences span many tiles, which exercises the masked / unmasked tile ranges,
the sliding-window skip and the packed-sequence block table the way long sequences do on a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slipstream.kernels import attention as fa
from slipstream.ops.attention import SPEC, allowed_mask
from tests.helpers import aot_compile_sm90, assert_matches_reference

CPU = torch.device("cpu")
TINY = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2,
        "BWD_BLOCK_OUTER": 32, "BWD_BLOCK_INNER": 16, "bwd_num_warps": 4, "bwd_num_stages": 2}


def kernel(config: dict | None = None):
    """The kernel bound to one config, with the op's signature."""
    def fn(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None, cu_seqlens=None):
        return fa.attention(q, k, v, causal, scale, sliding_window, softcap, cu_seqlens, config=config)
    return fn


def make(b: int, hq: int, hk: int, s: int, d: int, dtype: torch.dtype = torch.float32, *, causal: bool = True,
         scale: float | None = None, window: int | None = None, softcap: float | None = None,
         packed: list[int] | None = None) -> tuple:
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.float32).to(dtype) for h in (hq, hk, hk))
    cu = None
    if packed is not None:
        assert sum(packed) == s and b == 1
        cu = torch.tensor([0, *torch.tensor(packed).cumsum(0).tolist()], dtype=torch.int32)
    return (q, k, v, causal, scale, window, softcap, cu)


def check(args: tuple, config: dict | None = None) -> None:
    assert fa.accepts(*args)
    assert_matches_reference(SPEC, kernel(config), args)


# ----------------------------------------------------------------------------- the op's own samples
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_spec_samples(dtype):
    for sample in SPEC.samples(CPU, dtype, "small"):
        check(sample.args)


def test_float16_sample():
    check(make(1, 4, 2, 29, 32, torch.float16, window=9))


# ----------------------------------------------------------------------------- features and odd shapes
CASES = {
    "non-causal": (dict(b=2, hq=2, hk=2, s=40, d=32, causal=False), None),
    "non-causal window": (dict(b=1, hq=2, hk=1, s=70, d=16, causal=False, window=9), TINY),
    "gqa group 4 D64": (dict(b=1, hq=8, hk=2, s=48, d=64), None),
    "gqa group 8": (dict(b=1, hq=8, hk=1, s=20, d=16), TINY),
    "D128 S33": (dict(b=1, hq=2, hk=1, s=33, d=128), None),
    "D24 S not multiple": (dict(b=2, hq=2, hk=1, s=45, d=24), TINY),
    "D256": (dict(b=1, hq=2, hk=1, s=21, d=256), None),
    "window no softcap": (dict(b=1, hq=2, hk=2, s=70, d=16, window=17), TINY),
    "window 1": (dict(b=1, hq=2, hk=1, s=40, d=16, window=1), TINY),
    "window wider than S": (dict(b=1, hq=2, hk=1, s=40, d=16, window=100), TINY),
    "softcap no window": (dict(b=1, hq=4, hk=2, s=50, d=32, softcap=1.5, scale=0.3), TINY),
    "packed with length-1": (dict(b=1, hq=4, hk=2, s=70, d=16, packed=[7, 1, 30, 1, 31]), TINY),
    "packed non-causal": (dict(b=1, hq=2, hk=1, s=40, d=16, causal=False, packed=[1, 20, 19]), TINY),
    "packed window softcap": (dict(b=1, hq=2, hk=1, s=60, d=32, window=6, softcap=3.0, packed=[25, 1, 34]),
                              TINY),
    "B3 S1": (dict(b=3, hq=2, hk=1, s=1, d=16), None),
    "S a multiple of every block": (dict(b=2, hq=4, hk=2, s=64, d=16), TINY),
    "even S window": (dict(b=1, hq=2, hk=1, s=64, d=16, window=24), TINY),
    "llama-like H16/4 D128": (dict(b=1, hq=16, hk=4, s=17, d=128), None),
    "gemma2-like D256 window softcap": (dict(b=1, hq=4, hk=2, s=40, d=256, window=16, softcap=50.0), None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_case(case, dtype):
    shape, config = CASES[case]
    check(make(**shape, dtype=dtype), config)


@pytest.mark.parametrize("index", range(len(fa.CONFIGS)))
def test_every_config_spans_tiles(index):
    """Each shipped config on a sequence longer than its blocks (masked and unmasked tiles)."""
    check(make(1, 2, 1, 150, 32, torch.bfloat16), fa.CONFIGS[index])


def test_default_config_long_even_sequence():
    """S a multiple of the default config's blocks: the unmasked loads / stores (EVEN_*) path."""
    check(make(1, 2, 1, 256, 16, torch.bfloat16))


def test_every_config_packed_window():
    for config in fa.CONFIGS:
        check(make(1, 2, 1, 140, 16, window=70, packed=[60, 1, 79]), config)


def test_non_contiguous_inputs():
    """(B, S, H, D) projections viewed as (B, H, S, D), like transformers passes them."""
    q, k, v = (torch.randn(2, 37, h, 24).transpose(1, 2) for h in (4, 2, 2))
    assert not q.is_contiguous()
    check((q, k, v, True, None, 11, None, None), TINY)


def test_packed_bounds_as_reference_reads_them():
    """cu_seqlens not covering S: the reference makes positions past cu[-1] one more segment."""
    q, k, v, *_ = make(1, 2, 1, 30, 16)
    check((q, k, v, True, None, None, None, torch.tensor([0, 9, 10, 21], dtype=torch.int32)), TINY)


def test_grad_of_q_only():
    q, k, v, *rest = make(1, 2, 1, 20, 16)
    q.requires_grad_(True)
    out = fa.attention(q, k, v, *rest, config=TINY)
    (dq,) = torch.autograd.grad(out, q, torch.ones_like(out))
    q64 = q.detach().double().requires_grad_(True)
    ref = SPEC.reference(q64, k.double(), v.double(), *rest)
    (dq64,) = torch.autograd.grad(ref, q64, torch.ones_like(ref))
    assert torch.allclose(dq.double(), dq64, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- host-side pieces
def test_block_table_covers_every_block_once():
    bounds = torch.tensor([0, 5, 5, 6, 40, 77], dtype=torch.int32)  # includes an empty segment
    table, n = fa._block_table(bounds, 77, 16)
    seen = set()
    for seg, blk in zip(table[0].tolist(), table[1].tolist(), strict=True):
        if seg >= 0:
            assert blk * 16 < int(bounds[seg + 1] - bounds[seg])
            seen.add((seg, blk))
    expected = {(i, j) for i in range(5) for j in range(-(-int(bounds[i + 1] - bounds[i]) // 16))}
    assert seen == expected and n >= len(expected)


def test_plan_adapts_blocks():
    cfg = fa.CONFIGS[0]
    p = fa.plan(cfg, 128, torch.bfloat16)
    assert (p.block_m, p.block_n, p.num_stages, p.block_d) == (128, 64, 3, 128)
    big = fa.plan(cfg, 256, torch.bfloat16)
    assert big.block_d == 256 and big.block_m <= 64 and big.block_n <= 32 and big.num_stages <= 2
    f32 = fa.plan(cfg, 128, torch.float32)
    assert f32.block_n == 32 and f32.bwd_inner == 16 and f32.num_stages <= 2
    amd = fa.plan(cfg, 128, torch.bfloat16, vendor="amd")
    assert amd.block_n <= 64 and amd.num_stages <= 2 and amd.bwd_stages <= 2 and amd.bwd_warps <= 4
    rocm = fa.plan({**cfg, "waves_per_eu": 2, "kpack": 2}, 128, torch.bfloat16)  # a ROCm-derived config
    assert rocm == dataclasses.replace(amd, extra=(("waves_per_eu", 2), ("kpack", 2)))
    assert rocm.fwd_options["waves_per_eu"] == 2 and rocm.bwd_options["kpack"] == 2
    assert fa.plan(cfg, 24, torch.bfloat16).block_d == 32 and fa.plan(cfg, 8, torch.float16).block_d == 16


def test_accepts():
    q, k, v, *rest = make(1, 4, 2, 8, 16)
    assert fa.accepts(q, k, v, *rest)
    assert not fa.accepts(q, k.half(), v.half(), *rest)
    assert not fa.accepts(q.double(), k.double(), v.double(), *rest)
    big = torch.randn(1, 2, 4, 512)
    assert not fa.accepts(big, big, big)
    assert not fa.accepts(q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16))
    two = torch.randn(2, 4, 8, 16)
    assert not fa.accepts(two, two, two, True, None, None, None, torch.tensor([0, 8], dtype=torch.int32))
    assert not fa.accepts(q, k, v, True, None, 0)
    assert not fa.accepts(torch.randn(1, 4, 0, 16), torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 16))


def test_allowed_mask_meaning_matches_kernel_docs():
    """Sanity of the semantics the kernel implements: window W sees keys i - W < j <= i."""
    ok = allowed_mask(6, CPU, True, 2, None)
    assert ok[5].nonzero().flatten().tolist() == [4, 5]


# ----------------------------------------------------------------------------- ahead of time
def test_aot_units_compile_for_sm90():
    """Every kernel of the default config compiles for Hopper."""
    results = aot_compile_sm90("from slipstream.kernels.attention import CONFIGS, aot\nunits = aot(CONFIGS[0])")
    assert {name for name, _, _ in results} == {"attention_fwd", "attention_bwd_delta", "attention_bwd_dkdv",
                                               "attention_bwd_dq"}
