"""The Triton NF4/FP4 dequantisation equals ``QuantizedWeight.dequantize`` bit for bit.

Weights come from slipstream's own ``quantize_nf4`` and from real bitsandbytes (NF4 and FP4, with
and without double quantisation), including odd N or K (absmax blocks straddling rows, a partial
last block) and every output dtype.
"""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels import nf4
from slipstream.quant import QuantizedWeight, quantize_nf4
from tests.helpers import aot_compile_sm90

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (N, K): N*K must be even (two codes per byte); odd N, odd K, a partial last block, one block.
SHAPES = [(48, 64), (33, 64), (64, 33), (7, 90), (1, 64), (96, 256)]


def bnb_weight(w: torch.Tensor, quant_type: str, double: bool, blocksize: int) -> QuantizedWeight:
    functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    packed, state = functional.quantize_4bit(w, quant_type=quant_type, compress_statistics=double,
                                             blocksize=blocksize)
    return QuantizedWeight.from_bnb(packed, state)


def assert_bitwise(qw: QuantizedWeight, dtype: torch.dtype, config: dict | None = None) -> None:
    got = nf4.dequantize(qw, dtype, config=config)
    want = qw.dequantize(dtype)
    assert got.shape == want.shape == tuple(qw.shape) and got.dtype == dtype
    mismatch = got.view(-1).view(torch.int8 if dtype != torch.float32 else torch.int32) != \
        want.view(-1).view(torch.int8 if dtype != torch.float32 else torch.int32)
    assert not bool(mismatch.any()), (
        f"{int(mismatch.sum())} elements differ; worst {(got.float() - want.float()).abs().max().item():.3e}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_slipstream_quantised_bitwise(shape, blocksize):
    w = torch.randn(shape) * shape[1] ** -0.5
    qw = quantize_nf4(w, blocksize)
    for dtype in OUT_DTYPES:
        assert_bitwise(qw, dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [True, False], ids=["double_quant", "single_quant"])
@pytest.mark.parametrize("shape", [(33, 64), (64, 33), (40, 70), (96, 256)])
def test_bitsandbytes_quantised_bitwise(quant_type, double, shape):
    w = torch.randn(shape) * 0.05
    qw = bnb_weight(w, quant_type, double, 64)
    assert qw.double_quant == double and qw.quant_type == quant_type
    for dtype in OUT_DTYPES:
        assert_bitwise(qw, dtype)


@pytest.mark.parametrize("blocksize", [128, 256])
def test_bitsandbytes_other_blocksizes(blocksize):
    qw = bnb_weight(torch.randn(24, 96), "nf4", True, blocksize)
    assert_bitwise(qw, torch.bfloat16)
    assert_bitwise(qw, torch.float32)


def test_matches_bitsandbytes_dequantize():
    """Our meaning (``QuantizedWeight.dequantize``) is bitsandbytes' own dequantisation."""
    functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    w = torch.randn(40, 70)
    packed, state = functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    got = nf4.dequantize(QuantizedWeight.from_bnb(packed, state), torch.float32)
    assert torch.equal(got, functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("config", [{"bytes": 32, "num_warps": 1}, {"bytes": 256, "num_warps": 2},
                                   {"bytes": 2048, "num_warps": 4}, {"bytes": 4096, "num_warps": 8}])
def test_every_program_size(config):
    """Many programs (each a whole number of blocks, the last one masked) or a single one."""
    qw = bnb_weight(torch.randn(130, 64) * 0.1, "nf4", True, 64)
    assert_bitwise(qw, torch.bfloat16, config)
    assert_bitwise(quantize_nf4(torch.randn(33, 64), 64), torch.float32, config)


def test_writes_into_given_buffer():
    qw = quantize_nf4(torch.randn(16, 64))
    buf = torch.full((16, 64), float("nan"), dtype=torch.bfloat16)
    out = nf4.dequantize(qw, torch.bfloat16, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(out, qw.dequantize(torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        nf4.dequantize(qw, torch.bfloat16, out=torch.empty(16, 64))


def test_default_dtype_is_the_weights():
    qw = QuantizedWeight(**{**quantize_nf4(torch.randn(8, 64)).__dict__, "dtype": torch.float16})
    assert nf4.dequantize(qw).dtype == torch.float16


def test_rejects_what_it_cannot_read():
    q = quantize_nf4(torch.randn(8, 96), 96)  # blocksize not a power of two
    assert not nf4.supports(q)
    with pytest.raises(ValueError, match="blocksize 96"):
        nf4.dequantize(q, torch.float32)
    with pytest.raises(TypeError, match="output dtype"):
        nf4.dequantize(quantize_nf4(torch.randn(8, 64)), torch.float64)
    assert nf4.supports(quantize_nf4(torch.randn(8, 64)))


def test_aot_compiles_for_hopper():
    results = aot_compile_sm90(
        "from slipstream.kernels import nf4\n"
        "units = [u for c in ({'bytes': 2048, 'num_warps': 4}, {'bytes': 4096, 'num_warps': 8}) "
        "for u in nf4.aot_units(c)]")
    assert len(results) == 8
