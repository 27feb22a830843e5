"""The fused LoRA linear (dense and 4-bit bases) against the op's reference, forward and backward.

Every check goes through :func:`tests.helpers.assert_matches_reference`: float64 truth, the op's
per-dtype tolerance, every gradient that is asked for. Inputs are fresh random tensors.
"""

from __future__ import annotations

import functools

import pytest
import torch

from slipstream.dispatch.verify import errors
from slipstream.kernels import lora as lora_kernels
from slipstream.kernels.lora import (
    CONFIGS,
    KERNELS,
    accepts,
    accepts_group,
    lora_linear,
    lora_linear_group,
    lora_linear_group_op,
)
from slipstream.ops._spec import MATMUL_TOLERANCES
from slipstream.ops.lora_linear import SPEC, reference
from slipstream.ops.lora_linear_group import SPEC as GROUP_SPEC
from slipstream.ops.lora_linear_group import flat_args
from slipstream.quant import QuantizedWeight, quantize_nf4
from tests.helpers import aot_compile_sm90, assert_matches_reference

CPU = torch.device("cpu")
TRITON_CONFIGS = [c for c in CONFIGS if c["base"] == "triton"]
FUSED_CONFIGS = [c for c in CONFIGS if c["base"] == "fused"]
# the registered fused configs and the option they leave out: dY @ B accumulated in the dX GEMM's main loop
FUSED_VARIANTS = [*FUSED_CONFIGS, {**FUSED_CONFIGS[-1], "dyb": "loop"}]
FUSED_IDS = ["xa-mm-dyb-mm", "xa-loop-dyb-mm", "xa-loop-dyb-loop"]


def make_args(rows: int | tuple, k: int, n: int, r: int, dtype: torch.dtype, *,
              adapter: torch.dtype | None = None, base: str = "dense", bias: bool = False,
              weight_dtype: torch.dtype | None = None, scaling: float = 2.0) -> tuple:
    """Fresh (x, weight, A, B, scaling, bias); ``base``: dense | nf4 | bnb-nf4 | bnb-fp4 | bnb-nf4-single."""
    shape = rows if isinstance(rows, tuple) else (rows,)
    x = torch.randn(*shape, k).to(dtype)
    w = torch.randn(n, k) * k ** -0.5
    if base == "dense":
        weight = w.to(weight_dtype or dtype)
    elif base == "nf4":
        weight = QuantizedWeight(**{**quantize_nf4(w).__dict__, "dtype": dtype})
    else:
        functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
        _, quant_type, *rest = base.split("-")
        packed, state = functional.quantize_4bit(w, quant_type=quant_type, compress_statistics=not rest,
                                                 blocksize=64)
        weight = QuantizedWeight(**{**QuantizedWeight.from_bnb(packed, state).__dict__, "dtype": dtype})
    ad = adapter or dtype
    a = (torch.randn(r, k) * k ** -0.5).to(ad)
    b = (torch.randn(n, r) * r ** -0.5).to(ad)
    bias_t = (torch.randn(n) * 0.1).to(dtype) if bias else None
    return x, weight, a, b, scaling, bias_t


def with_config(config: dict | None):
    return lambda *args: lora_linear(*args, config=config)


def frozen_base(args: tuple, *, x: bool = True, bias: bool = False) -> tuple:
    """The LoRA training case: ``x``, ``A``, ``B`` (and optionally ``bias``) require grad, ``W`` does not."""
    xx, w, a, b, s, bb = args
    return (xx.requires_grad_(x), w, a.requires_grad_(), b.requires_grad_(), s,
            None if bb is None else bb.requires_grad_(bias))


# ----------------------------------------------------------------------------- the op's own samples
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_spec_samples(dtype):
    """Every small sample (dense and NF4 bases), all differentiable inputs requiring grad."""
    for sample in SPEC.samples(CPU, dtype, "small"):
        assert accepts(*sample.args), sample
        assert_matches_reference(SPEC, lora_linear, sample.args)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_config(config):
    fn = with_config(config)
    assert_matches_reference(SPEC, fn, make_args(13, 40, 27, 3, torch.bfloat16, bias=True))
    assert_matches_reference(SPEC, fn, frozen_base(make_args(9, 64, 33, 4, torch.bfloat16, base="bnb-nf4")),
                             grads=False)
    assert_matches_reference(SPEC, fn, frozen_base(make_args(7, 64, 16, 5, torch.float32, base="nf4")),
                             grads=False)


# ----------------------------------------------------------------------------- bases
@pytest.mark.parametrize("base", ["nf4", "bnb-nf4", "bnb-fp4", "bnb-nf4-single"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantised_bases(base, dtype):
    """4-bit bases from slipstream's quantiser and from bitsandbytes; odd N (blocks straddle rows)."""
    args = frozen_base(make_args(6, 64, 33, 4, dtype, base=base, bias=True), bias=True)
    assert_matches_reference(SPEC, lora_linear, args, grads=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_frozen_dense_base(dtype):
    """The LoRA case: no W gradient is asked for (and none computed)."""
    assert_matches_reference(SPEC, lora_linear, frozen_base(make_args(11, 48, 40, 8, dtype)), grads=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dense_weight_requires_grad(dtype):
    """Full fine-tuning of the base: dW = dY.T @ x, also with an fp32 master weight under bf16 x."""
    assert_matches_reference(SPEC, lora_linear, make_args(10, 24, 20, 4, dtype))
    assert_matches_reference(SPEC, lora_linear, make_args(10, 24, 20, 4, dtype, weight_dtype=torch.float32))


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_fp32_adapters_under_low_precision(dtype, base):
    """peft's default: adapters in fp32, activations and base in bf16/fp16."""
    args = make_args(12, 64, 24, 8, dtype, adapter=torch.float32, base=base, bias=True)
    assert_matches_reference(SPEC, lora_linear, frozen_base(args, bias=True), grads=False)
    out = lora_linear(*args)
    assert out.dtype == dtype


def test_low_precision_adapters_under_fp32():
    args = make_args(8, 32, 16, 4, torch.float32, adapter=torch.bfloat16)
    assert_matches_reference(SPEC, lora_linear, args)


# ----------------------------------------------------------------------------- shapes and layouts
@pytest.mark.parametrize("rows", [0, 1, 37, (2, 3), (2, 0, 5)], ids=str)
def test_row_counts_and_leading_dims(rows):
    assert_matches_reference(SPEC, lora_linear, make_args(rows, 40, 26, 3, torch.float32, bias=True))
    assert_matches_reference(SPEC, lora_linear,
                             frozen_base(make_args(rows, 64, 32, 4, torch.bfloat16, base="nf4")), grads=False)


@pytest.mark.parametrize("k,n,r", [(33, 17, 1), (17, 65, 5), (130, 7, 16), (64, 96, 24)])
def test_odd_sizes(k, n, r):
    assert_matches_reference(SPEC, lora_linear, make_args(9, k, n, r, torch.float32, bias=True))
    for config in TRITON_CONFIGS[:1]:
        assert_matches_reference(SPEC, with_config(config), make_args(9, k, n, r, torch.bfloat16, bias=True))


def test_non_contiguous_x():
    x, w, a, b, s, bias = make_args(6, 48, 20, 4, torch.float32, bias=True)
    strided = torch.randn(6, 96)[:, ::2]  # unit stride lost
    transposed = torch.randn(48, 6).t()  # column-major
    sliced = torch.randn(3, 4, 48)[:, 1:3]  # leading dims not mergeable without a copy
    for xx in (strided, transposed, sliced):
        assert not xx.is_contiguous()
        assert_matches_reference(SPEC, lora_linear, (xx, w, a, b, s, bias))
        assert_matches_reference(SPEC, with_config(TRITON_CONFIGS[0]), (xx, w, a, b, s, bias))


def test_only_adapters_require_grad():
    """First layer / frozen embeddings: x needs no gradient, so neither dX nor W is touched."""
    args = frozen_base(make_args(8, 64, 32, 4, torch.bfloat16, base="nf4"), x=False)
    assert_matches_reference(SPEC, lora_linear, args, grads=False)


def test_zero_scaling_and_zero_b():
    """peft initialises B to zero: the output is the base alone, dA is zero, dB is not."""
    x, w, a, b, _, _ = make_args(5, 32, 16, 4, torch.float32)
    b = torch.zeros_like(b)
    assert_matches_reference(SPEC, lora_linear, (x, w, a, b, 2.0, None))
    assert_matches_reference(SPEC, lora_linear, (x, w, a, b.normal_(), 0.0, None))


# ----------------------------------------------------------------------------- memory
def test_saves_no_full_precision_weight():
    """Nothing (N, K)-sized is kept for backward when W is 4-bit: only x, xa (M, r), A and B."""
    n, k, m, r = 96, 128, 8, 4
    x, w, a, b, s, _ = frozen_base(make_args(m, k, n, r, torch.bfloat16, base="nf4"))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lora_linear(x, w, a, b, s)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(m, k), (m, r), (r, k), (n, r)]), shapes
    assert out.grad_fn is not None and len(list(out.grad_fn.next_functions)) <= 7
    out.sum().backward()
    assert x.grad is not None and a.grad is not None and b.grad is not None


# ----------------------------------------------------------------------------- grouped projections
def _judge_group(xs: torch.Tensor, weights, a_s, b_s, scalings, biases, config=None) -> None:
    """Group outputs and every gradient against per-projection reference calls (fp64 truth)."""
    dtype = xs.dtype
    tol = MATMUL_TOLERANCES[dtype]

    def leaves(cast):
        def leaf(t):
            return None if t is None else t.detach().to(cast(t)).requires_grad_(t.requires_grad)
        xx = leaf(xs)
        ws = [w if isinstance(w, QuantizedWeight) else leaf(w) for w in weights]
        return xx, ws, [leaf(a) for a in a_s], [leaf(b) for b in b_s], [leaf(bb) for bb in biases]

    def run(fn, cast):
        xx, ws, aa, bb, bs = leaves(cast)
        outs = fn(xx, ws, aa, bb, bs)
        grads_out = [g.to(o.dtype) for g, o in zip(grad_outputs, outs, strict=True)]
        tensors = [t for t in (xx, *ws, *aa, *bb, *bs) if isinstance(t, torch.Tensor) and t.requires_grad]
        got = torch.autograd.grad(outs, tensors, grads_out, allow_unused=True)
        return [o.detach() for o in outs], [torch.zeros_like(t) if g is None else g for t, g in
                                            zip(tensors, got, strict=True)]

    def per_projection(xx, ws, aa, bb, bs):
        return [reference(xx, w, a, b, s, bias)
                for w, a, b, s, bias in zip(ws, aa, bb, scalings, bs, strict=True)]

    def group(xx, ws, aa, bb, bs):
        return lora_linear_group(xx, ws, aa, bb, scalings, bs, config=config)

    probe = per_projection(*leaves(lambda t: t.dtype))
    grad_outputs = [torch.randn_like(o) for o in probe]
    truth = run(per_projection, lambda t: torch.float64)
    own = run(per_projection, lambda t: t.dtype)
    mine = run(group, lambda t: t.dtype)
    for kind in (0, 1):
        assert len(mine[kind]) == len(truth[kind])
        for i, (m, t, o) in enumerate(zip(mine[kind], truth[kind], own[kind], strict=True)):
            assert m.shape == t.shape and m.dtype == o.dtype, (kind, i, m.shape, m.dtype)
            rel, peak = errors(m, t)
            own_rel, own_peak = errors(o, t)
            assert rel <= max(tol.rel, 2 * own_rel) and peak <= max(tol.peak, 2 * own_peak), (
                f"{'output' if kind == 0 else 'grad'} {i}: {rel:.2e} rel / {peak:.2e} peak")


@pytest.mark.parametrize("config", [None, *TRITON_CONFIGS[:1], *FUSED_CONFIGS[:2]],
                         ids=["cublas", "triton", "fused-xa-mm", "fused-xa-loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_qkv(dtype, config):
    """q/k/v-like: different N, ranks and scalings; one dense, two 4-bit; biases on two."""
    k = 64
    x = torch.randn(2, 5, k).to(dtype).requires_grad_()
    specs = [(48, 4, 2.0, "dense", True), (16, 8, 0.5, "nf4", False), (16, 3, 1.0, "bnb-nf4", True)]
    weights, a_s, b_s, scalings, biases = [], [], [], [], []
    for n, r, s, base, has_bias in specs:
        _, w, a, b, _, bias = frozen_base(make_args(1, k, n, r, dtype, base=base, bias=has_bias), bias=True)
        weights.append(w)
        a_s.append(a)
        b_s.append(b)
        scalings.append(s)
        biases.append(bias)
    _judge_group(x, weights, a_s, b_s, scalings, biases, config)


def test_group_gate_up_fp32_adapters_dense_grad():
    """gate/up-like: bf16 activations with fp32 adapters; one base weight trained (dense dW)."""
    k = 32
    x = torch.randn(7, k).to(torch.bfloat16).requires_grad_()
    w_gate = (torch.randn(40, k) * k ** -0.5).to(torch.bfloat16).requires_grad_()
    w_up = (torch.randn(40, k) * k ** -0.5).to(torch.bfloat16)
    a_s = [(torch.randn(4, k) * k ** -0.5).requires_grad_() for _ in range(2)]
    b_s = [(torch.randn(40, 4) * 0.5).requires_grad_() for _ in range(2)]
    _judge_group(x, [w_gate, w_up], a_s, b_s, [2.0, 2.0], [None, None])


def test_group_single_projection_and_unused_output():
    """One projection equals lora_linear; an output that gets no gradient contributes nothing."""
    x, w, a, b, s, bias = make_args(6, 32, 24, 4, torch.float32, bias=True)
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    (y,) = lora_linear_group(x, [w], [a], [b], [s], [bias])
    torch.testing.assert_close(y, lora_linear(x, w, a, b, s, bias))
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y1, y2 = lora_linear_group(x, [w, w], [a, a2], [b, b2], [s, s], None)
    y1.sum().backward()
    assert torch.count_nonzero(a2.grad) == 0 and torch.count_nonzero(b2.grad) == 0
    assert torch.count_nonzero(b.grad) > 0
    with pytest.raises(ValueError, match="one A, B and scaling per weight"):
        lora_linear_group(x, [w, w], [a], [b], [s])


@pytest.mark.parametrize("config", [None, *TRITON_CONFIGS[:1], *FUSED_CONFIGS[:2]],
                         ids=["cublas", "triton", "fused-xa-mm", "fused-xa-loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_op_entry_matches_its_spec(dtype, config):
    """The registered entry (flat slots) on every small sample of the op: pairs, triples, 1 row, odd
    shapes with biases, NF4 bases, fp32 adapters under bf16; outputs and every gradient."""
    fn = functools.partial(lora_linear_group_op, config=config)
    for sample in GROUP_SPEC.samples(CPU, dtype, "small"):
        assert_matches_reference(GROUP_SPEC, fn, sample.args)


def test_accepts_group_checks_every_slot():
    x, w, a, b, s, _ = make_args(4, 96, 16, 4, torch.bfloat16)
    pair = flat_args(x, [w, w], [a, a], [b, b], [s, s])
    assert accepts_group(*pair)
    odd = quantize_nf4(torch.randn(16, 96), 96)  # blocksize 96: not for the Triton dequantisation
    assert not accepts_group(*flat_args(x, [w, w, odd], [a] * 3, [b] * 3, [s] * 3))
    assert not accepts_group(*flat_args(x, [w, w], [a, a.double()], [b, b.double()], [s, s]))


# ----------------------------------------------------------------------------- peft
class _Wrap(torch.nn.Module):
    def __init__(self, lin: torch.nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _peft_case(base_layer: torch.nn.Module, weight, x: torch.Tensor, rel: float) -> str:
    peft = pytest.importorskip("peft", reason="peft not installed")
    model = peft.get_peft_model(_Wrap(base_layer), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"],
                                                                   lora_dropout=0.0))
    layer = model.base_model.model.lin
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_b.normal_(0, 0.5)  # peft initialises B to zero; make the LoRA path count
    scaling = layer.scaling["default"]
    bias = getattr(layer.get_base_layer(), "bias", None)
    grad = torch.randn(*x.shape[:-1], lora_b.shape[0])

    x_peft = x.detach().clone().requires_grad_()
    y_peft = model(x_peft)
    y_peft.backward(grad.to(y_peft.dtype))
    want = [y_peft.detach(), x_peft.grad, lora_a.grad.clone(), lora_b.grad.clone()]

    a = lora_a.detach().clone().requires_grad_()
    b = lora_b.detach().clone().requires_grad_()
    x_ours = x.detach().clone().requires_grad_()
    y = lora_linear(x_ours, weight, a, b, scaling, None if bias is None else bias.detach())
    y.backward(grad.to(y.dtype))
    got = [y.detach(), x_ours.grad, a.grad, b.grad]
    for name, g, w in zip(("output", "dx", "dA", "dB"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        err = errors(g, w)[0]
        assert err <= rel, f"{name}: {err:.2e} from peft"
    return type(layer).__module__ + "." + type(layer).__name__


def test_peft_lora_linear():
    lin = torch.nn.Linear(48, 40, bias=True)
    _peft_case(lin, lin.weight.detach(), torch.randn(3, 5, 48), rel=1e-5)


def test_peft_lora_linear_bf16_base_fp32_adapters():
    """peft's mixed precision: bf16 base layer, fp32 adapters (its default autocast_adapter_dtype)."""
    lin = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    _peft_case(lin, lin.weight.detach(), torch.randn(9, 64).to(torch.bfloat16),
               rel=MATMUL_TOLERANCES[torch.bfloat16].rel)


def test_peft_bitsandbytes_linear4bit():
    """A bitsandbytes Linear4bit (NF4, double quantised) base under peft, on the CPU."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    lin = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(torch.randn(48, 64) * 0.1, requires_grad=False, quant_type="nf4",
                                   compress_statistics=True)
    try:
        lin = lin.to("cpu")  # quantises the weight
    except Exception as exc:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes cannot quantise on the CPU here: {exc}")
    if getattr(lin.weight, "quant_state", None) is None:
        pytest.skip("bitsandbytes left the Linear4bit weight unquantised on the CPU")
    weight = QuantizedWeight.from_bnb(lin.weight)
    weight = QuantizedWeight(**{**weight.__dict__, "dtype": torch.float32})
    _peft_case(lin, weight, torch.randn(6, 64), rel=1e-5)


# ----------------------------------------------------------------------------- registration
def test_kernel_entry():
    from slipstream.registry import check_signature

    kernel, group = KERNELS
    assert (kernel.op, kernel.name) == ("lora_linear", "lora_linear")
    check_signature(SPEC.parameters, kernel.fn, wants_config=True, name="lora_linear")
    # the group: same tuning space and compiled kernels, the flat-slot signature of its op
    assert (group.op, group.name) == ("lora_linear_group", "lora_linear_group")
    check_signature(GROUP_SPEC.parameters, group.fn, wants_config=True, name="lora_linear_group")
    assert group.configs is kernel.configs and group.aot is kernel.aot
    assert 2 <= len(kernel.configs) <= 6
    for config in kernel.configs:
        units = kernel.aot(config)
        assert units and all(u.name for u in units)
        if config["base"] in ("triton", "fused"):
            assert any(u.fn is lora_kernels._lora_gemm_kernel for u in units)


def test_accepts():
    x, w, a, b, s, bias = make_args(4, 96, 16, 4, torch.bfloat16)
    assert accepts(x, w, a, b, s, bias)
    assert not accepts(x.double(), w, a, b, s, bias)
    assert not accepts(x, quantize_nf4(torch.randn(16, 96), 96), a, b, s, bias)  # blocksize 96
    assert accepts(x, quantize_nf4(torch.randn(16, 96), 32), a, b, s, bias)


def test_aot_units_compile_for_sm90():
    """The dequantisation and every fused-GEMM form (forward with/without bias, backward with/without
    accumulation) compile for sm_90: the first config of each base, every kernel form in a test-sized
    compile time."""
    results = aot_compile_sm90(
        "from slipstream.kernels.lora import KERNELS\nkernel = KERNELS[0]\nfirst = {}\n"
        "for config in kernel.configs:\n    first.setdefault(config['base'], config)\n"
        "units = [u for config in first.values() for u in kernel.aot(config)]")
    assert any("lora_gemm" in name for name, _, _ in results)


# ----------------------------------------------------------------------------- 4-bit bases in row pieces
@pytest.mark.parametrize("base", ["nf4", "bnb-nf4"])  # bnb-nf4: double quantised, cuts follow its nested blocks
def test_row_pieces_dequantise_to_the_whole(monkeypatch, base):
    monkeypatch.setattr(lora_kernels, "DEQUANT_PIECE_BYTES", 24 * 64 * 2)  # ~24 rows of K=64 per piece
    _, qw, *_ = make_args(1, 64, 600, 4, torch.float32, base=base)
    pieces = lora_kernels.row_pieces(qw)
    # single-level blocks of 64 allow a cut after any row; a nested absmax entry covers 256 rows of 64
    assert len(pieces) == (25 if base == "nf4" else 3)
    assert [r0 for r0, _, _ in pieces] == [0, *[r1 for _, r1, _ in pieces[:-1]]] and pieces[-1][1] == 600
    whole = qw.dequantize()
    for r0, r1, piece in pieces:
        assert piece.packed.data_ptr() >= qw.packed.data_ptr()  # a view: no copy of the codes
        torch.testing.assert_close(piece.dequantize(), whole[r0:r1], rtol=0, atol=0)
    assert lora_kernels.row_pieces(qw) is pieces  # cut once per weight


def test_row_pieces_keep_a_weight_whole_when_small_or_uncuttable(monkeypatch):
    _, qw, *_ = make_args(1, 64, 200, 4, torch.float32, base="nf4")
    assert [(r0, r1) for r0, r1, _ in lora_kernels.row_pieces(qw)] == [(0, 200)]  # 25 KiB: under the bound
    monkeypatch.setattr(lora_kernels, "DEQUANT_PIECE_BYTES", 64)
    _, odd, *_ = make_args(1, 33, 64, 4, torch.float32, base="nf4")  # a block of 64 spans rows of 33
    pieces = lora_kernels.row_pieces(odd)
    assert [(r0, r1) for r0, r1, _ in pieces][0][0] == 0 and pieces[-1][1] == 64
    torch.testing.assert_close(torch.cat([p.dequantize() for _, _, p in pieces]), odd.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("config", [None, *TRITON_CONFIGS[:1], *FUSED_CONFIGS[:2]],
                         ids=["cublas", "triton", "fused-xa-mm", "fused-xa-loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_4bit_base_in_pieces_matches_reference(monkeypatch, dtype, config):
    """Forward and every gradient with the base dequantised and multiplied piece by piece."""
    monkeypatch.setattr(lora_kernels, "DEQUANT_PIECE_BYTES", 16 * 64 * 2)
    args = frozen_base(make_args(9, 64, 40, 4, dtype, base="nf4", bias=True), bias=True)
    assert len(lora_kernels.row_pieces(args[1])) > 1
    assert_matches_reference(SPEC, with_config(config), args)
    k = 64
    x = torch.randn(2, 5, k).to(dtype).requires_grad_()
    weights, a_s, b_s = [], [], []
    for n in (40, 24):
        _, w, a, b, _, _ = frozen_base(make_args(1, k, n, 4, dtype, base="nf4"))
        weights.append(w)
        a_s.append(a)
        b_s.append(b)
    _judge_group(x, weights, a_s, b_s, [2.0, 0.5], [None, None], config)


@pytest.mark.parametrize("config", FUSED_VARIANTS, ids=FUSED_IDS)
def test_fused_whole_tiles_take_tensor_descriptors(config, monkeypatch):
    """Shapes that are whole tiles go through TMA tensor descriptors (16-bit only); forward and every
    gradient match the reference, and the descriptors were really built."""
    built = []
    real = lora_kernels.TensorDescriptor

    def counting(*args, **kwargs):
        built.append(kwargs.get("block_shape", args[-1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_kernels, "TensorDescriptor", counting)
    bm, bn = config["block_m"], config["block_n"]
    args = make_args(bm, bn, bn, 8, torch.bfloat16, bias=True)  # M, K, N in whole tiles both ways
    assert_matches_reference(SPEC, with_config(config), args)
    assert len(built) >= 4  # x and W descriptors for the forward and for dX
    built.clear()
    assert_matches_reference(SPEC, with_config(config), make_args(bm, bn, bn, 8, torch.float32))
    assert not built  # fp32 goes through pointer tiles (descriptors would multiply it in TF32)


SMALL_FUSED = [{**c, "block_m": 16, "block_n": 32, "block_k": 32, "gemm_warps": 4, "stages": 2} for c in FUSED_VARIANTS]


@pytest.mark.parametrize("config", SMALL_FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_configs_on_whole_tiles(config, dtype, monkeypatch):
    """With tiles that divide the shapes, the fused kernels run (counted) for one projection (a rank
    that is a multiple of 8, and rank 5, whose B the backward reads column-major) and for a
    q/k/v-like group with different N and ranks, a bias and an NF4 base; outputs and every gradient.
    Partial tiles and ``"db": "fused"`` with rank 5 take the cuBLAS way."""
    launches = []
    real = lora_kernels._launch

    def counting(*args, forward, **kwargs):
        launches.append(forward)
        return real(*args, forward=forward, **kwargs)

    monkeypatch.setattr(lora_kernels, "_launch", counting)
    assert_matches_reference(SPEC, with_config(config), make_args(32, 64, 96, 8, dtype, bias=True))
    assert launches.count(True) == 1 and launches.count(False) == 1
    launches.clear()
    assert_matches_reference(SPEC, with_config(config), make_args(32, 64, 96, 5, dtype, bias=True))
    assert launches.count(True) == 1 and launches.count(False) == 1
    launches.clear()
    # partial row tiles, and the dB partials with a rank that is not a multiple of 8: the cuBLAS way
    assert_matches_reference(SPEC, with_config(config), make_args(33, 64, 96, 8, dtype, bias=True))
    assert_matches_reference(SPEC, with_config({**config, "db": "fused"}), make_args(32, 64, 96, 5, dtype))
    assert not launches
    k = 64
    x = torch.randn(2, 16, k).to(dtype).requires_grad_()
    weights, a_s, b_s, biases = [], [], [], []
    for n, r, base, has_bias in ((64, 8, "dense", True), (32, 16, "nf4", False), (32, 5, "dense", True)):
        _, w, a, b, _, bias = frozen_base(make_args(1, k, n, r, dtype, base=base, bias=has_bias), bias=True)
        weights.append(w)
        a_s.append(a)
        b_s.append(b)
        biases.append(bias)
    _judge_group(x, weights, a_s, b_s, [2.0, 0.5, 1.0], biases, config)
    assert launches.count(True) >= 3 and launches.count(False) >= 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,r", [(70, 96, 50, 8), (1, 40, 33, 4), (13, 40, 27, 3), (64, 96, 64, 16)])
def test_fused_kernel_on_partial_tiles(dtype, m, k, n, r):
    """The kernel's own contract at odd shapes (interpreter): forward with x @ A.T in its main loop,
    backward with dY @ B in the loop, dA and dB partials, accumulation and dX written over x. (Calls
    through lora_linear use it on whole tiles only, see kernels.lora._fused.)"""
    cfg = {"block_m": 32, "block_n": 32, "block_k": 32, "gemm_warps": 4, "stages": 2, "group_m": 2}
    x = torch.randn(m, k).to(dtype)
    w, a = (torch.randn(n, k) * k ** -0.5).to(dtype), (torch.randn(r, k) * k ** -0.5).to(dtype)
    b, bias, dy = torch.randn(n, r).to(dtype), torch.randn(n).to(dtype), torch.randn(m, n).to(dtype)
    f = torch.Tensor.double
    fwd = lora_kernels._launch(x, w, cfg, forward=True, lora_f1=a, lora_f2=b, alpha=0.7,
                               left_out=torch.empty(m, r, dtype=dtype), bias=bias)
    xa = f(x) @ f(a).T
    xs = x.clone()
    bwd = lora_kernels._launch(dy, w, cfg, forward=False, lora_f1=b, lora_f2=a, alpha=0.7, e=xs, g=fwd.left, out=xs)
    dyb = f(dy) @ f(b)
    start = torch.randn(m, k).to(dtype)
    acc = lora_kernels._launch(dy, w, cfg, forward=False, lora_f1=lora_kernels._column_major(b), lora_f2=a,
                               alpha=0.7, out=start.clone(), accumulate=True)
    dx = f(dy) @ f(w) + 0.7 * dyb @ f(a)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: one rounding of each output and of xa / dY @ B
    for got, want in ((fwd.out, f(x) @ f(w).T + 0.7 * xa @ f(b).T + f(bias)), (fwd.left, xa), (bwd.out, dx),
                      (bwd.e_part.sum(0), dyb.T @ f(x)), (bwd.g_part.sum(0), f(dy).T @ f(fwd.left)),
                      (acc.out, dx + f(start))):
        err = float((f(got) - want).abs().max() / want.abs().max())
        assert err < tol, err
