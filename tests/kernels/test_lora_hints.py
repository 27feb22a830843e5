"""``ops.hints.output_values_unused`` in the fused LoRA kernel: the forward skips the base GEMM and the
LoRA epilogue, the backward is unchanged (every gradient bit-identical to the normal call, up to the
summation order of ``x @ A.T`` where the normal call fuses it into the base GEMM)."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels import lora as lora_kernels
from slipstream.kernels.lora import CONFIGS, lora_linear
from slipstream.ops.hints import output_values_are_unused, output_values_unused
from slipstream.quant import QuantizedWeight, quantize_nf4


def _args(rows: int, k: int, n: int, r: int, nf4: bool, gen: torch.Generator) -> tuple:
    x = torch.randn(rows, k, generator=gen).requires_grad_()
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    weight = QuantizedWeight(**{**quantize_nf4(w).__dict__, "dtype": torch.float32}) if nf4 else w
    a = (torch.randn(r, k, generator=gen) * 0.1).requires_grad_()
    b = (torch.randn(n, r, generator=gen) * 0.1).requires_grad_()
    return x, weight, a, b


def _grads(x, weight, a, b, dy, config, *, unused: bool):
    with output_values_unused(unused):
        out = lora_linear(x, weight, a, b, 1.5, config=config)
    return out, torch.autograd.grad(out, (x, a, b), dy)


SMALL_TILES = {"block_m": 16, "block_n": 32, "block_k": 32, "gemm_warps": 4, "stages": 2}
_FUSED = [c for c in CONFIGS if c["base"] == "fused"]
# whole tiles at test sizes: the registered fused configs, and dY @ B in the dX main loop (an option they leave out)
FUSED_SMALL = [{**c, **SMALL_TILES} for c in (*_FUSED, {**_FUSED[-1], "dyb": "loop"})]
FUSED_IDS = ["xa-mm-dyb-mm", "xa-loop-dyb-mm", "xa-loop-dyb-loop"]


@pytest.mark.parametrize("config", [CONFIGS[0], next(c for c in CONFIGS if c["base"] == "triton"), *FUSED_SMALL],
                         ids=["cublas", "triton", *(f"fused-{i}" for i in FUSED_IDS)])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_unused_output_skips_the_forward_gemm_and_keeps_gradients(monkeypatch, config, nf4):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    x, weight, a, b = _args(32, 64, 96, 8, nf4, gen)  # whole tiles for FUSED_SMALL: the fused kernels run
    dy = torch.randn(32, 96, generator=gen)
    out, expected = _grads(x, weight, a, b, dy, config, unused=False)

    def no_forward_gemm(*args, **kwargs):
        raise AssertionError("the base GEMM ran although the output values are unused")

    launch = lora_kernels._launch

    def backward_launch_only(*args, forward: bool, **kwargs):
        if forward:
            no_forward_gemm()
        return launch(*args, forward=forward, **kwargs)

    monkeypatch.setattr(lora_kernels, "_base_plus_lora", no_forward_gemm)
    monkeypatch.setattr(lora_kernels, "_launch", backward_launch_only)
    skipped, got = _grads(x, weight, a, b, dy, config, unused=True)
    assert skipped.shape == out.shape and skipped.dtype == out.dtype
    # with "xa": "loop" the normal call computes xa = x @ A.T inside its forward GEMM's main loop; skipping
    # that GEMM, xa comes from a plain GEMM instead: the same fp32 sums in another order (dB: ulps)
    exact = config["base"] != "fused" or config.get("xa") == "mm"
    for g, e in zip(got, expected, strict=True):
        scale = e.abs().max().item()  # fp32: ~1e-6 of the tensor's largest entry
        torch.testing.assert_close(g, e, rtol=0 if exact else 1e-5, atol=0 if exact else 2e-6 * scale)


def test_hint_is_scoped_and_per_thread():
    import threading

    assert not output_values_are_unused()
    seen = []
    with output_values_unused():
        assert output_values_are_unused()
        worker = threading.Thread(target=lambda: seen.append(output_values_are_unused()))
        worker.start()
        worker.join()
        with output_values_unused(False):
            assert not output_values_are_unused()
        assert output_values_are_unused()
    assert not output_values_are_unused()
    assert seen == [False]  # the dispatcher's tuning thread never sees the hint


@pytest.mark.parametrize("config", FUSED_SMALL, ids=FUSED_IDS)
def test_expiring_input_takes_the_fused_dx(config):
    """``inputs_expire_in_backward``: the fused backward writes dX over x (an op's output), reading each
    x tile for dA before storing the dX tile there; gradients as without the hint, and a second
    backward through the same graph fails instead of reading gradients as activations."""
    from slipstream.ops.hints import inputs_expire_in_backward

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    x0, weight, a, b = _args(32, 64, 96, 8, False, gen)  # whole tiles: the fused kernels run
    dy = torch.randn(32, 96, generator=gen)

    def run(expire: bool):
        x = x0 * 1.0  # produced by an op, as a layer's activation is
        with inputs_expire_in_backward(expire):
            out = lora_linear(x, weight, a, b, 1.5, config=config)
        grads = torch.autograd.grad(out, (x0, a, b), dy, retain_graph=True)
        return x, out, grads

    _, _, expected = run(False)
    x, out, got = run(True)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    torch.testing.assert_close(x, got[0])  # x's memory now holds dX (d(x0 * 1) = dX)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, (x0, a, b), dy)
