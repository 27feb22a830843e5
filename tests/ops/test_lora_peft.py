"""``lora_linear``'s reference against peft's ``lora.Linear`` and ``lora.Linear4bit`` (bitsandbytes, CPU).

The layers are built the way users get them: ``get_peft_model`` with a ``LoraConfig`` (dropout 0,
``init_lora_weights=False`` so B is non-zero), with peft's default ``autocast_adapter_dtype=True``
(adapters upcast to fp32 under a bf16 base). Every tensor the op is differentiable in is swapped
in through ``torch.func.functional_call`` so gradients of x, W, A, B and the bias are compared.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from slipstream.ops import SPECS
from slipstream.quant import QuantizedWeight
from tests.ops._compare import assert_no_worse, assert_tight

peft = pytest.importorskip("peft")

lora_ref = SPECS["lora_linear"].reference


class _Wrap(torch.nn.Module):
    def __init__(self, proj: torch.nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def peft_layer(base: torch.nn.Module, r: int, alpha: int, *, autocast: bool = True, four_bit: bool = False,
               rslora: bool = False):
    model = _Wrap(base)
    if four_bit:
        model.is_loaded_in_4bit = True  # what transformers sets on a bnb-4bit model; peft dispatches on it
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"],
                          init_lora_weights=False, use_rslora=rslora)
    layer = peft.get_peft_model(model, cfg, autocast_adapter_dtype=autocast).base_model.model.proj
    assert float(layer.lora_B["default"].weight.detach().abs().sum()) > 0
    return layer


def _dense_case(shape_x, k, n, r, alpha, *, base_dtype, adapter_dtype, with_bias, autocast=True,
                rslora=False):
    lin = torch.nn.Linear(k, n, bias=with_bias).to(base_dtype)
    layer = peft_layer(lin, r, alpha, autocast=autocast, rslora=rslora)
    if not autocast:
        layer.lora_A["default"].to(adapter_dtype)
        layer.lora_B["default"].to(adapter_dtype)
    assert layer.lora_A["default"].weight.dtype == adapter_dtype
    scaling = layer.scaling["default"]
    assert scaling == pytest.approx(alpha / r ** 0.5 if rslora else alpha / r)
    x = torch.randn(shape_x).to(base_dtype).requires_grad_()
    w = (torch.randn(n, k) * k ** -0.5).to(base_dtype).requires_grad_()
    a = (torch.randn(r, k) * k ** -0.5).to(adapter_dtype).requires_grad_()
    b = (torch.randn(n, r) * r ** -0.5).to(adapter_dtype).requires_grad_()
    bias = (torch.randn(n) * 0.1).to(base_dtype).requires_grad_() if with_bias else None

    def hf(x, w, a, b, bias=None):
        params = {"base_layer.weight": w, "lora_A.default.weight": a, "lora_B.default.weight": b}
        if bias is not None:
            params["base_layer.bias"] = bias
        return functional_call(layer, params, (x,))

    def ours(x, w, a, b, bias=None):
        return lora_ref(x, w, a, b, scaling, bias)

    args = (x, w, a, b) + ((bias,) if with_bias else ())
    names = ("x", "weight", "lora_a", "lora_b", "bias")[: len(args)]
    return ours, hf, args, names


@pytest.mark.parametrize("shape_x,k,n,r,alpha,with_bias", [
    ((7, 40), 40, 27, 4, 8, False),
    ((2, 5, 64), 64, 48, 8, 16, True),
    ((1, 16), 16, 33, 1, 3, True),
])
def test_lora_linear_matches_peft_fp32(shape_x, k, n, r, alpha, with_bias):
    ours, hf, args, names = _dense_case(shape_x, k, n, r, alpha, base_dtype=torch.float32,
                                        adapter_dtype=torch.float32, with_bias=with_bias)
    assert_tight(ours, hf, args, arg_names=names)


def test_lora_linear_matches_peft_rslora_scaling():
    ours, hf, args, names = _dense_case((6, 32), 32, 24, 4, 8, base_dtype=torch.float32,
                                        adapter_dtype=torch.float32, with_bias=False, rslora=True)
    assert_tight(ours, hf, args, arg_names=names)


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_linear_fp32_adapters_under_low_precision_base(base_dtype, with_bias):
    """peft's autocast_adapter_dtype: the LoRA path runs in fp32, result cast back to the base dtype."""
    ours, hf, args, names = _dense_case((3, 9, 48), 48, 40, 8, 16, base_dtype=base_dtype,
                                        adapter_dtype=torch.float32, with_bias=with_bias)
    out = ours(*args)
    assert out.dtype == base_dtype
    # same fp32 sum as peft, one final rounding: equal up to that rounding
    torch.testing.assert_close(out, hf(*args), rtol=0, atol=0)
    assert_no_worse(ours, hf, hf, args, arg_names=names)


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_lora_linear_low_precision_adapters(base_dtype):
    ours, hf, args, names = _dense_case((11, 32), 32, 20, 4, 4, base_dtype=base_dtype,
                                        adapter_dtype=base_dtype, with_bias=True, autocast=False)
    assert_no_worse(ours, hf, hf, args, arg_names=names)


def test_lora_linear_bf16_adapters_under_fp32_base_keep_fp32_base():
    """peft adds ``result (fp32) + update (bf16)`` in fp32: the base product must not be rounded to bf16."""
    ours, hf, args, names = _dense_case((9, 64), 64, 32, 4, 8, base_dtype=torch.float32,
                                        adapter_dtype=torch.bfloat16, with_bias=True, autocast=False)
    assert_tight(ours, hf, args, arg_names=names)


# ----------------------------------------------------------------------------------------- 4-bit
bnb = pytest.importorskip("bitsandbytes")


def bnb_linear4bit(k: int, n: int, *, quant_type: str, compress_statistics: bool, dtype: torch.dtype,
                   with_bias: bool, blocksize: int = 64):
    """A bitsandbytes Linear4bit quantised on the CPU (bnb >= 0.48 quantises/dequantises there)."""
    lin = bnb.nn.Linear4bit(k, n, bias=with_bias, compute_dtype=dtype, quant_type=quant_type,
                            compress_statistics=compress_statistics)
    w = torch.randn(n, k) * k ** -0.5
    lin.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type=quant_type,
                                   blocksize=blocksize, compress_statistics=compress_statistics)
    if with_bias:
        lin.bias = torch.nn.Parameter((torch.randn(n) * 0.1).to(dtype))
    lin = lin.to("cpu")  # triggers the quantisation
    assert lin.weight.bnb_quantized and lin.weight.quant_state.dtype == dtype
    return lin


def _qlora_case(quant_type, compress_statistics, dtype, with_bias, *, k=64, n=40, r=8, alpha=16, rows=(2, 7)):
    base = bnb_linear4bit(k, n, quant_type=quant_type, compress_statistics=compress_statistics, dtype=dtype,
                          with_bias=with_bias)
    layer = peft_layer(base, r, alpha, four_bit=True)
    assert type(layer).__name__ == "Linear4bit" and type(layer).__module__ == "peft.tuners.lora.bnb"
    scaling = layer.scaling["default"]
    qw = QuantizedWeight.from_bnb(base.weight)
    assert qw.quant_type == quant_type and qw.double_quant == compress_statistics
    adapter = layer.lora_A["default"].weight.dtype
    assert adapter == torch.float32  # autocast_adapter_dtype
    x = torch.randn(*rows, k).to(dtype).requires_grad_()
    a = (torch.randn(r, k) * k ** -0.5).requires_grad_()
    b = (torch.randn(n, r) * r ** -0.5).requires_grad_()
    bias = base.bias.detach().clone().requires_grad_() if with_bias else None

    def hf(x, a, b, bias=None):
        params = {"lora_A.default.weight": a, "lora_B.default.weight": b}
        if bias is not None:
            params["base_layer.bias"] = bias
        return functional_call(layer, params, (x,))

    def ours(x, a, b, bias=None):
        return lora_ref(x, qw, a, b, scaling, bias)

    w_exact = qw.dequantize(torch.float32)  # code * absmax, the weight both sides round to `dtype`

    def truth(x, a, b, bias=None):  # fp64 meaning of the quantised layer (x.dtype == float64 here)
        w = w_exact.to(x.dtype)
        out = x @ w.T + ((x @ a.T) @ b.T) * scaling
        return out if bias is None else out + bias

    args = (x, a, b) + ((bias,) if with_bias else ())
    names = ("x", "lora_a", "lora_b", "bias")[: len(args)]
    return ours, hf, truth, args, names


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
def test_lora_linear_matches_peft_linear4bit_fp32(quant_type, compress_statistics):
    ours, hf, _, args, names = _qlora_case(quant_type, compress_statistics, torch.float32, True)
    assert_tight(ours, hf, args, arg_names=names)


@pytest.mark.parametrize("quant_type,compress_statistics,with_bias", [
    ("nf4", True, False), ("nf4", False, True), ("fp4", True, True)])
def test_lora_linear_matches_peft_linear4bit_bf16(quant_type, compress_statistics, with_bias):
    """QLoRA: bf16 compute over NF4/FP4, fp32 adapters.

    peft's Linear4bit rounds the fp32 LoRA update to bf16 *before* adding it to the bf16 base
    result; the reference adds in fp32 and rounds once, so it is at least as close to fp64.
    """
    ours, hf, truth, args, names = _qlora_case(quant_type, compress_statistics, torch.bfloat16, with_bias)
    errs = assert_no_worse(ours, hf, truth, args, arg_names=names)
    assert errs["out0"][0] < 1e-2


def test_quantized_weight_dtype_differs_from_x():
    """A bf16-quantised weight used with fp32 activations: the reference dequantises straight to fp32.

    bitsandbytes dequantises to the weight's own dtype (bf16) and then casts; so bnb's weight is
    code*absmax rounded to bf16 while ours is code*absmax exactly: a deliberate, more precise,
    difference of at most one bf16 rounding of each weight.
    """
    base = bnb_linear4bit(64, 24, quant_type="nf4", compress_statistics=True, dtype=torch.bfloat16,
                          with_bias=False)
    qw = QuantizedWeight.from_bnb(base.weight)
    x = torch.randn(5, 64)
    zeros_a, zeros_b = torch.zeros(2, 64), torch.zeros(24, 2)
    ours = lora_ref(x, qw, zeros_a, zeros_b, 1.0)
    exact = x.double() @ qw.dequantize(torch.float32).double().T
    bnb_out = bnb.matmul_4bit(x, base.weight.t(), quant_state=base.weight.quant_state)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(bnb_out, ours, rtol=2e-2, atol=2e-2)
