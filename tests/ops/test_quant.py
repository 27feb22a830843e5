"""``QuantizedWeight`` reads bitsandbytes' 4-bit layout exactly; ``quantize_nf4`` is bnb's NF4.

Oracle note: bitsandbytes 0.50.2's *native CPU* ``dequantize_4bit`` kernel is wrong when absmax
blocks straddle weight rows (``K % blocksize != 0``, e.g. (64, 64) with blocksize 128: errors of
~1.0 where the format allows ~0.3). bnb's own portable implementation (the torch code its CPU
op falls back to for odd shapes, documented there as matching the C++/CUDA kernels) has the
right meaning. So every shape is compared exactly with that portable implementation, and with the
public ``dequantize_4bit`` on the shapes where the CPU kernel is valid (``K % blocksize == 0``,
which is every real LLM projection).
"""

from __future__ import annotations

import pytest
import torch

from slipstream.quant import NF4_CODE, QuantizedWeight, quantize_nf4

bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")

# (N, K): odd N and K, K below / not a multiple of the block size, blocks straddling rows
SHAPES = [(33, 70), (7, 18), (1, 130), (64, 64), (3, 1000), (129, 2), (5, 256), (3, 128), (9, 384)]


def bnb_portable_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' device-independent dequantisation (its default backend), without torch.compile."""
    from bitsandbytes.backends.default import ops as default_ops
    from bitsandbytes.backends.utils import _get_4bit_code

    compiled = default_ops._dequantize_4bit_compute
    compute = getattr(compiled, "__wrapped__", compiled)
    absmax = state.absmax
    if state.nested:  # exactly what bnb.functional.dequantize_4bit does before calling the op
        absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
        if absmax.dtype != torch.float32:
            absmax = absmax.float()
    code = _get_4bit_code(state.quant_type, packed.device)
    flat = packed.reshape(-1).view(torch.uint8)
    return compute(flat, absmax, code, state.blocksize, state.shape, state.dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_equals_bitsandbytes_exactly(quant_type, compress_statistics, blocksize, dtype):
    for shape in SHAPES:
        w = (torch.randn(shape) * torch.rand(shape[0], 1) * 3).to(dtype)  # per-row scale: varied absmax
        packed, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress_statistics,
                                         quant_type=quant_type)
        want = bnb_portable_dequantize(packed, state)
        q = QuantizedWeight.from_bnb(packed, state)
        assert (q.quant_type, q.blocksize, q.double_quant, q.dtype, q.shape) == (
            quant_type, blocksize, compress_statistics, dtype, shape)
        got = q.dequantize()
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want), f"{shape}: max diff {(got.float() - want.float()).abs().max()}"
        if shape[1] % blocksize == 0:  # where bnb's native CPU kernel is valid: the public API, exactly
            assert torch.equal(got, BF.dequantize_4bit(packed, state)), shape
        # the fp32 view is code * absmax before the final rounding
        torch.testing.assert_close(q.dequantize(torch.float32).to(dtype), want, rtol=0, atol=0)


@pytest.mark.parametrize("blocksize", [64, 128])
def test_block_scales_undo_double_quantisation_like_bitsandbytes(blocksize):
    w = torch.randn(40, 96)
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    q = QuantizedWeight.from_bnb(packed, state)
    want = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(q.block_scales(), want.float())
    assert q.absmax.dtype == torch.uint8 and q.nested_blocksize == state.state2.blocksize


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_from_bnb_params4bit_of_a_linear4bit(compress_statistics):
    lin = bnb.nn.Linear4bit(128, 20, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                            compress_statistics=compress_statistics)
    lin.weight = bnb.nn.Params4bit(torch.randn(20, 128).to(torch.bfloat16), requires_grad=False,
                                   quant_type="nf4", compress_statistics=compress_statistics)
    lin = lin.to("cpu")
    q = QuantizedWeight.from_bnb(lin.weight)  # the parameter carries its quant_state
    assert q.packed.data_ptr() == lin.weight.data.data_ptr()  # no copy
    assert q.requires_grad is False and q.device == torch.device("cpu")
    assert torch.equal(q.dequantize(), BF.dequantize_4bit(lin.weight.data, lin.weight.quant_state))
    assert torch.equal(q.dequantize(), bnb_portable_dequantize(lin.weight.data, lin.weight.quant_state))


def test_from_bnb_without_quant_state_is_a_clear_error():
    with pytest.raises(ValueError, match="no `quant_state`"):
        QuantizedWeight.from_bnb(torch.zeros(8, dtype=torch.uint8))


def test_odd_element_count_is_rejected_clearly():
    """Documented limitation: N*K must be even (every LLM projection is); bnb pads the last byte."""
    packed, state = BF.quantize_4bit(torch.randn(33, 71), blocksize=64, quant_type="nf4")
    with pytest.raises(ValueError, match=r"N\*K/2"):
        QuantizedWeight.from_bnb(packed, state)
    with pytest.raises(ValueError, match="even element count"):
        quantize_nf4(torch.randn(3, 5))


def test_corrupt_state_is_rejected():
    q = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match="absmax"):
        QuantizedWeight(**{**q.__dict__, "absmax": q.absmax[:-1]})
    with pytest.raises(ValueError, match="16 entries"):
        QuantizedWeight(**{**q.__dict__, "code": q.code[:8]})
    with pytest.raises(ValueError, match="uint8"):
        QuantizedWeight(**{**q.__dict__, "packed": q.packed.float()})


@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", [(64, 256), (33, 70), (1, 130)])
def test_quantize_nf4_is_bitsandbytes_nf4(blocksize, shape):
    """Same codes, same absmax, same layout as ``bnb.functional.quantize_4bit(..., 'nf4')``."""
    w = torch.randn(shape) * 0.05
    q = quantize_nf4(w, blocksize)
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.code, state.code.float())
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.dequantize(), bnb_portable_dequantize(packed, state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_quantize_nf4_round_trip_error_is_bounded(dtype, blocksize):
    """Round-to-nearest code: each element is within half the widest NF4 gap times its block's absmax."""
    w = (torch.randn(37, 100) * torch.rand(37, 1)).to(dtype)
    q = quantize_nf4(w, blocksize)
    deq = q.dequantize()
    assert deq.dtype == dtype and deq.shape == w.shape
    code = torch.tensor(NF4_CODE, dtype=torch.float64)
    half_gap = (code[1:] - code[:-1]).max().item() / 2  # 0.152, between -1 and -0.696
    scales = q.absmax.double().repeat_interleave(blocksize)[: w.numel()].reshape(w.shape)
    err = (w.double() - q.dequantize(torch.float32).double()).abs()
    assert (err <= scales * half_gap * (1 + 1e-6)).all()
    # nearest code, not merely a close one
    normed = (w.double() / scales).reshape(-1, 1)
    best = (normed - code).abs().min(dim=1).values
    picked = (w.double() / scales - q.dequantize(torch.float32).double() / scales).abs().reshape(-1)
    assert (picked <= best + 1e-6).all()
    # and on average far better than the bound: normal weights sit where NF4 codes are dense
    assert (err / scales).mean() < 0.05
    # block maxima are represented exactly (code +-1)
    blocks = w.float().reshape(-1)
    idx = torch.arange(0, w.numel(), blocksize)
    assert torch.equal(q.absmax, torch.stack([blocks[i:i + blocksize].abs().max() for i in idx.tolist()]))


def test_quantize_nf4_zero_block_is_finite():
    w = torch.zeros(2, 64)
    w[1] = torch.randn(64)
    q = quantize_nf4(w)
    deq = q.dequantize()
    assert torch.isfinite(deq).all() and torch.equal(deq[0], torch.zeros(64))
