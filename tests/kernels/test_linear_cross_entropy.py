"""The chunked linear + cross-entropy kernel against the op's reference (forward and every
gradient), under the interpreter on CPU, plus its memory contract and ahead-of-time compilation."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import slipstream.kernels.linear_cross_entropy as lce
from slipstream.kernels.linear_cross_entropy import CONFIGS, KERNELS, accepts, linear_cross_entropy
from slipstream.ops.linear_cross_entropy import SPEC
from slipstream.registry import check_signature
from tests.helpers import aot_compile_sm90, assert_matches_reference

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16]
SAMPLE_LABELS = [s.label for s in SPEC.samples(CPU, torch.float32, "small")]


def make(n: int, h: int, v: int, dtype: torch.dtype, *, bias: bool = False, reduction: str = "mean",
         softcap: float | None = None, scale: float = 1.0, ignore_every: int = 5,
         hidden_grad: bool = True, weight_grad: bool = True, label_dtype: torch.dtype = torch.int64) -> tuple:
    """Inputs with the requires_grad flags as given (the oracle then runs with ``grads=False``)."""
    hidden = torch.randn(n, h).to(dtype).requires_grad_(hidden_grad)
    weight = (torch.randn(v, h) * h ** -0.5).to(dtype).requires_grad_(weight_grad)
    b = (torch.randn(v) * 0.1).to(dtype).requires_grad_(weight_grad) if bias else None
    labels = torch.randint(0, v, (n,), dtype=label_dtype)
    labels[::ignore_every] = -100
    return (hidden, weight, labels, b, -100, reduction, softcap, scale)


def chunked(rows: int, **extra):
    return functools.partial(linear_cross_entropy, config={**CONFIGS[0], "chunk_rows": rows, **extra})


# ----------------------------------------------------------------------------- the op's samples
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", range(len(SAMPLE_LABELS)), ids=SAMPLE_LABELS)
def test_spec_samples_all_trainable(dtype, index):
    sample = SPEC.samples(CPU, dtype, "small")[index]
    assert accepts(*sample.args)
    assert_matches_reference(SPEC, linear_cross_entropy, sample.args)  # hidden, weight, bias all need grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", range(len(SAMPLE_LABELS)), ids=SAMPLE_LABELS)
def test_spec_samples_frozen_weight(dtype, index):
    hidden, weight, *rest = SPEC.samples(CPU, dtype, "small")[index].args
    args = (hidden.requires_grad_(True), weight, *rest)
    assert_matches_reference(SPEC, chunked(4), args, grads=False)


def test_spec_sample_float16():
    sample = next(s for s in SPEC.samples(CPU, torch.float16, "small") if "bias" in s.label)
    assert_matches_reference(SPEC, linear_cross_entropy, sample.args)


# ----------------------------------------------------------------------------- configs and chunks
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_config(config):
    v = 2 * 16384 + 77  # several blocks of the CE row kernel for every config
    fn = functools.partial(linear_cross_entropy, config=config)
    assert_matches_reference(SPEC, fn, make(3, 8, v, torch.bfloat16, bias=True, ignore_every=3), grads=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows", [5, 16])
def test_several_chunks_trainable_weight_and_bias(dtype, reduction, rows):
    args = make(37, 24, 301, dtype, bias=True, reduction=reduction)
    assert_matches_reference(SPEC, chunked(rows), args, grads=False)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_row_per_chunk(reduction):
    args = make(7, 16, 130, torch.bfloat16, bias=True, reduction=reduction)
    assert_matches_reference(SPEC, chunked(1), args, grads=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_frozen_weight_each_reduction(dtype, reduction):
    args = make(21, 16, 257, dtype, reduction=reduction, weight_grad=False, softcap=7.0)
    assert_matches_reference(SPEC, chunked(8), args, grads=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_only_trainable(dtype):
    args = make(10, 16, 99, dtype, bias=True, hidden_grad=False)
    assert_matches_reference(SPEC, chunked(3), args, grads=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softcap_and_scale(dtype, reduction):
    args = make(12, 20, 500, dtype, reduction=reduction, softcap=3.0, scale=1.6, bias=True)
    assert_matches_reference(SPEC, chunked(5), args, grads=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(dtype, reduction):
    args = make(6, 8, 64, dtype, reduction=reduction, ignore_every=1, bias=True)
    assert_matches_reference(SPEC, chunked(4), args, grads=False)
    assert torch.all(linear_cross_entropy(*args) == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_rows(reduction):
    assert_matches_reference(SPEC, linear_cross_entropy, make(0, 8, 33, torch.float32, reduction=reduction),
                             grads=False)


def test_single_valid_row():
    assert_matches_reference(SPEC, linear_cross_entropy, make(1, 16, 1001, torch.bfloat16, ignore_every=2),
                             grads=False)


def test_no_gradients_wanted():
    args = make(9, 16, 200, torch.bfloat16, hidden_grad=False, weight_grad=False, bias=True)
    assert_matches_reference(SPEC, chunked(4), args, grads=False)


def test_int32_labels_and_non_contiguous_inputs():
    hidden, weight, labels, *rest = make(15, 12, 211, torch.bfloat16, label_dtype=torch.int32,
                                         reduction="sum")

    def strided(h, w, *more):
        h_view = F.pad(h, (0, 3))[:, : h.shape[1]]  # row stride H + 3
        w_view = w.t().contiguous().t()  # column-major weight
        assert not h_view.is_contiguous() and not w_view.is_contiguous()
        return linear_cross_entropy(h_view, w_view, *more, config={**CONFIGS[0], "chunk_rows": 4})

    args = (hidden, weight, labels, *rest)
    assert accepts(*args)
    assert_matches_reference(SPEC, strided, args, grads=False)


def test_weight_grad_slabs(monkeypatch):
    """The bounded-temporary fallback for the fp32 weight-gradient sum, with several V slabs."""
    monkeypatch.setattr(lce, "SLAB_BYTES", 1)  # -> 256-row slabs
    args = make(9, 8, 999, torch.bfloat16, bias=True)
    assert_matches_reference(SPEC, chunked(4), args, grads=False)


# ----------------------------------------------------------------------------- memory contract
def test_memory_stays_chunked_and_frozen_weight_allocates_no_grad(monkeypatch):
    n, h, v, rows = 40, 16, 300, 8
    shapes: list[tuple[int, ...]] = []
    for name in ("empty", "zeros", "empty_like"):
        real = getattr(torch, name)

        def spy(*a, _real=real, **kw):
            out = _real(*a, **kw)
            shapes.append(tuple(out.shape))
            return out

        monkeypatch.setattr(torch, name, spy)
    hidden, weight, labels, *rest = make(n, h, v, torch.bfloat16, weight_grad=False)
    hidden.requires_grad_(True)
    linear_cross_entropy(hidden, weight, labels, *rest, config={**CONFIGS[0], "chunk_rows": rows}).backward()
    monkeypatch.undo()
    assert (rows, v) in shapes  # the chunk buffer
    assert all(s[-1] != v or s[0] <= rows for s in shapes if len(s) == 2), shapes  # never N x V
    assert (v, h) not in shapes  # no weight-gradient buffer for a frozen weight
    assert weight.grad is None and hidden.grad is not None


def test_no_grad_mode_allocates_no_gradients(monkeypatch):
    hidden, weight, labels, *rest = make(6, 8, 40, torch.float32, bias=True)
    shapes: list[tuple[int, ...]] = []
    for name in ("empty_like", "zeros"):
        real = getattr(torch, name)

        def spy(*a, _real=real, **kw):
            out = _real(*a, **kw)
            shapes.append(tuple(out.shape))
            return out

        monkeypatch.setattr(torch, name, spy)
    with torch.no_grad():
        out = linear_cross_entropy(hidden, weight, labels, *rest)
    monkeypatch.undo()
    assert not shapes and not out.requires_grad


def test_second_backward_is_refused():
    hidden, weight, labels, *rest = make(4, 8, 20, torch.float32)
    loss = linear_cross_entropy(hidden, weight, labels, *rest)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_accepts(monkeypatch):
    args = make(4, 8, 20, torch.float32, bias=True)
    hidden, weight, labels, bias, *rest = args
    assert accepts(*args)
    assert not accepts(hidden.double(), weight.double(), labels, None, *rest)
    assert not accepts(hidden, weight.bfloat16(), labels, bias, *rest)
    assert not accepts(hidden, weight[:, :5], labels, bias, *rest)
    assert not accepts(hidden, weight, labels, bias[:3], *rest)
    assert not accepts(hidden, weight, labels.float(), bias, *rest)
    assert not accepts(hidden, weight, labels, bias, -100, "max", None, 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not accepts(*args)


def test_kernel_record():
    (kernel,) = KERNELS
    assert kernel.op == SPEC.name and kernel.name == "linear_cross_entropy" and kernel.configs == CONFIGS
    check_signature(SPEC.parameters, kernel.fn, wants_config=True, name=kernel.name)
    assert {c["chunk_rows"] for c in CONFIGS} == {512, 1024}  # bounded memory: <= 1024 x V logits


# ----------------------------------------------------------------------------- ahead of time
def test_aot_units_compile_for_sm90():
    """Every distinct unit of every config compiles for sm_90."""
    aot_compile_sm90("from slipstream.kernels.linear_cross_entropy import KERNELS\n"
                     "units = [u for k in KERNELS for c in k.configs for u in k.aot(c)]")
