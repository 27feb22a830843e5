"""The op specs' own inputs: ``samples`` are valid calls, ``fresh`` keeps a call's signature and budget.

``fresh`` feeds the dispatcher's verification: inputs that differ from the call in dtype,
requires_grad, device or weight format would verify a kernel on a path the call never takes.
"Real" (Llama-8B-sized) samples are built on the ``meta`` device: shapes only, no memory.
"""

from __future__ import annotations

import pytest
import torch

import slipstream.ops as ops
from slipstream.quant import QuantizedWeight
from tests.helpers import judge

SPECS = ops.SPECS
DEVICE = torch.device("cpu")


def _tensors(args):
    return [(i, a) for i, a in enumerate(args) if isinstance(a, (torch.Tensor, QuantizedWeight))]


def bounded_size(name: str, args: tuple) -> tuple[int, int]:
    """(the size ``fresh`` bounds, the size of one row of it: the least it can shrink to)."""
    if name == "rms_norm":
        return args[0].numel(), args[0].shape[-1]
    if name == "rope":
        b, hq, s, d = args[0].shape
        return args[0].numel(), hq * d
    if name in ("swiglu", "geglu"):
        return args[0].numel(), args[0].shape[-1]
    if name == "cross_entropy":
        return args[0].numel(), args[0].shape[1]
    if name == "linear_cross_entropy":
        v = args[1].shape[0]
        return args[0].shape[0] * v, v  # the logits chunk
    if name == "lora_linear":
        n, k = args[1].shape
        return args[0].numel() // k * max(n, k), max(n, k)
    if name == "lora_linear_group":
        k = args[0].shape[-1]
        widest = max(k, *(args[i].shape[0] for i in (1, 6, 11) if args[i] is not None))
        return args[0].numel() // k * widest, widest
    if name == "attention":
        b, hq, s, _ = args[0].shape
        return b * hq * s * s, b * hq  # the score matrix
    raise AssertionError(name)


def assert_fresh_like(name: str, args: tuple, new: tuple, budget: int | None) -> None:
    spec = SPECS[name]
    assert len(new) == len(args)
    for i, (a, b) in enumerate(zip(args, new, strict=True)):
        pname = spec.parameters[i]
        if a is None:
            assert b is None, f"{name}.{pname}: fresh invented a tensor"
            continue
        if isinstance(a, QuantizedWeight):
            assert isinstance(b, QuantizedWeight), pname
            assert (b.quant_type, b.blocksize, b.double_quant, b.dtype, b.shape) == (
                a.quant_type, a.blocksize, a.double_quant, a.dtype, a.shape), f"{name}.{pname}: weight format"
            assert torch.equal(b.code.cpu(), a.code.cpu()) if a.device.type != "meta" else True
            assert b.packed.shape == a.packed.shape and b.absmax.dtype == a.absmax.dtype
            assert b.packed is not a.packed
            continue
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor), pname
            assert b.dtype == a.dtype, f"{name}.{pname}: dtype {b.dtype} != {a.dtype}"
            assert b.device == a.device, f"{name}.{pname}: device"
            assert b.requires_grad == a.requires_grad, f"{name}.{pname}: requires_grad"
            assert b.is_leaf, f"{name}.{pname}: fresh tensors are leaves"
            if a.is_floating_point() and a.numel() and a.device.type != "meta":
                assert b.data_ptr() != a.data_ptr() and torch.isfinite(b).all()
            continue
        assert b == a, f"{name}.{pname}: non-tensor argument changed: {a!r} -> {b!r}"
    spec.check(new)  # a valid call
    if budget is not None:
        size, row = bounded_size(name, new)
        assert size <= max(budget, row), f"{name}: fresh size {size} > budget {budget}"
        assert size > 0 or bounded_size(name, args)[0] == 0
    else:
        assert spec.check(new) == spec.check(args), f"{name}: full-size fresh inputs change the dispatch key"


def cases(size: str, dtypes=None):
    for name, spec in SPECS.items():
        for dtype in dtypes or spec.dtypes:
            yield pytest.param(name, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("name,dtype", list(cases("small")))
def test_small_samples_pass_check_and_fresh_keeps_their_signature(name, dtype):
    spec = SPECS[name]
    samples = spec.samples(DEVICE, dtype, "small")
    described = {(s.label, *(a for a in s.args if not isinstance(a, (torch.Tensor, QuantizedWeight))))
                 for s in samples}
    assert len(samples) >= 2 and len(described) == len(samples), "samples are told apart by label and flags"
    for sample in samples:
        assert len(sample.args) == len(spec.parameters), sample
        key = spec.check(sample.args)
        assert hash(key) == hash(spec.check(sample.args))
        assert spec.dtype_of(sample.args) == dtype
        for budget in (None, 1 << 16, 100):
            assert_fresh_like(name, sample.args, spec.fresh(sample.args, budget), budget)


@pytest.mark.parametrize("name,dtype", list(cases("real", dtypes=(torch.bfloat16,))))
def test_real_samples_pass_check_and_fresh_bounds_them(name, dtype):
    """Llama-8B-sized samples, as shapes only: valid calls, and verification inputs within budget."""
    spec = SPECS[name]
    meta = torch.device("meta")
    for sample in spec.samples(meta, dtype, "real"):
        spec.check(sample.args)
        for budget in (1 << 16, 1 << 22):
            assert_fresh_like(name, sample.args, spec.fresh(sample.args, budget), budget)


@pytest.mark.parametrize("name", list(SPECS))
def test_reference_passes_its_own_oracle_on_small_samples(name):
    """The verifier's fp64 truth and the reference in fp32/bf16 agree on every small sample."""
    spec = SPECS[name]
    for dtype in (torch.float32, torch.bfloat16):
        for sample in spec.samples(DEVICE, dtype, "small"):
            verdict = judge(spec, spec.reference, sample.args)
            assert verdict.ok, f"{name} {sample}: {verdict.reason}"
            assert all(e <= spec.tolerance(dtype).rel for e in verdict.errors.values()), (sample, verdict.errors)


def test_samples_cover_the_features_the_ops_advertise():
    small = {name: spec.samples(DEVICE, torch.float32, "small") for name, spec in SPECS.items()}
    assert any(s.args[3] == 1.0 for s in small["rms_norm"])  # Gemma offset
    assert any(s.args[0].shape[0] == 0 for s in small["rms_norm"])  # 0 rows
    assert any(s.args[4] is not None for s in small["rope"])  # packed position ids
    assert any(s.args[0].shape[1] != s.args[1].shape[1] for s in small["rope"])  # GQA
    assert {s.args[2] for s in small["geglu"]} == {"none", "tanh"}
    ce = small["cross_entropy"]
    assert {s.args[3] for s in ce} == {"mean", "sum", "none"}
    assert any(s.args[4] is not None for s in ce) and any(s.args[5] != 1.0 for s in ce)
    assert any(bool((s.args[1] == -100).all()) for s in ce)  # every label ignored
    assert any(s.args[0].shape[1] == 262144 for s in ce)
    assert any(s.args[3] is not None for s in small["linear_cross_entropy"])  # bias
    lora = SPECS["lora_linear"].samples(DEVICE, torch.bfloat16, "small")
    assert any(isinstance(s.args[1], QuantizedWeight) for s in lora)
    assert any(s.args[2].dtype == torch.float32 for s in lora)  # fp32 adapters under a bf16 base
    group = SPECS["lora_linear_group"].samples(DEVICE, torch.bfloat16, "small")
    assert {s.args[11] is None for s in group} == {True, False}  # pairs (gate/up) and triples (q/k/v)
    assert any(isinstance(s.args[1], QuantizedWeight) for s in group)
    assert any(s.args[2].dtype == torch.float32 for s in group)
    assert any(s.args[5] is not None and s.args[15] is not None for s in group)  # biases (Qwen2 q/k/v)
    assert any(s.args[0].shape[0] == 1 for s in group)
    att = small["attention"]
    assert any(s.args[5] is not None and s.args[6] is not None for s in att)  # window + softcap
    assert any(s.args[7] is not None for s in att) and any(s.args[0].shape[2] == 1 for s in att)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
def test_fresh_keeps_a_bitsandbytes_weight_format(quant_type, compress_statistics):
    """Verification of a QLoRA call must run on the call's weight format (FP4 / double-quantised too)."""
    bf = pytest.importorskip("bitsandbytes.functional")
    packed, state = bf.quantize_4bit(torch.randn(48, 128).to(torch.bfloat16) * 0.05, blocksize=64,
                                     compress_statistics=compress_statistics, quant_type=quant_type)
    w = QuantizedWeight.from_bnb(packed, state)
    x = torch.randn(10, 128, dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(8, 128, requires_grad=True)
    b = torch.randn(48, 8, requires_grad=True)
    args = (x, w, a, b, 2.0, None)
    spec = SPECS["lora_linear"]
    for budget in (None, 1 << 16, 300):
        new = spec.fresh(args, budget)
        assert_fresh_like("lora_linear", args, new, budget)
        deq = new[1].dequantize(torch.float32)
        assert torch.isfinite(deq).all() and 0 < deq.abs().max() < 10
        assert len(torch.unique(deq.abs())) > 16  # random codes and scales, not a constant
        assert judge(spec, spec.reference, new).ok
