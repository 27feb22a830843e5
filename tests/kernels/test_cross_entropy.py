"""The Triton cross-entropy kernel against the op's reference (forward and gradient), under the
interpreter on CPU, plus ahead-of-time compilation of every config for sm_90."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from slipstream.kernels.cross_entropy import CONFIGS, KERNELS, accepts, cross_entropy
from slipstream.ops.cross_entropy import SPEC, reference
from slipstream.registry import check_signature
from tests.helpers import aot_compile_sm90, assert_matches_reference

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16]
SAMPLE_LABELS = [s.label for s in SPEC.samples(CPU, torch.float32, "small")]


def make(n: int, v: int, dtype: torch.dtype, *, reduction: str = "mean", softcap: float | None = None,
         scale: float = 1.0, ignore_every: int = 4, label_dtype: torch.dtype = torch.int64) -> tuple:
    logits = (torch.randn(n, v) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), dtype=label_dtype)
    labels[::ignore_every] = -100
    return (logits, labels, -100, reduction, softcap, scale)


def row_strided(logits: torch.Tensor, *rest):
    """Call the kernel on a differentiable view with row stride V + 5 (not contiguous)."""
    view = F.pad(logits, (0, 5))[:, : logits.shape[1]]
    assert not view.is_contiguous() and view.stride(1) == 1
    return cross_entropy(view, *rest)


def column_major(logits: torch.Tensor, *rest):
    view = logits.t().contiguous().t()
    assert view.stride(0) == 1 or logits.shape[1] == 1
    return cross_entropy(view, *rest)


# ----------------------------------------------------------------------------- the op's samples
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", range(len(SAMPLE_LABELS)), ids=SAMPLE_LABELS)
def test_spec_samples(dtype, index):
    sample = SPEC.samples(CPU, dtype, "small")[index]
    assert accepts(*sample.args)
    assert_matches_reference(SPEC, cross_entropy, sample.args)


def test_spec_sample_float16():
    sample = next(s for s in SPEC.samples(CPU, torch.float16, "small") if "odd" in s.label)
    assert_matches_reference(SPEC, cross_entropy, sample.args)


# ----------------------------------------------------------------------------- every config
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_config(config):
    # V spans several blocks of even the largest config, with a ragged tail
    v = 2 * 16384 + 77
    fn = functools.partial(cross_entropy, config=config)
    assert_matches_reference(SPEC, fn, make(3, v, torch.bfloat16, ignore_every=3))
    assert_matches_reference(SPEC, fn, make(2, v, torch.float32, reduction="none", softcap=20.0, scale=0.7))


# ----------------------------------------------------------------------------- odd inputs
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_softcap_and_scale(dtype, reduction):
    assert_matches_reference(SPEC, cross_entropy, make(9, 777, dtype, reduction=reduction, softcap=4.0,
                                                       scale=1.7))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(dtype, reduction):
    args = make(5, 129, dtype, reduction=reduction, ignore_every=1)
    assert_matches_reference(SPEC, cross_entropy, args)
    out = cross_entropy(*args)
    assert torch.all(out == 0) and out.dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_rows(reduction):
    assert_matches_reference(SPEC, cross_entropy, make(0, 50, torch.float32, reduction=reduction))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_valid_row(dtype):
    assert_matches_reference(SPEC, cross_entropy, make(1, 1001, dtype, ignore_every=2))


def test_vocab_of_one_and_edge_labels():
    assert_matches_reference(SPEC, cross_entropy, make(4, 1, torch.float32, ignore_every=3))
    logits, labels, *rest = make(6, 4099, torch.bfloat16)
    labels[:] = torch.tensor([0, 4098, 4097, 0, 4098, 1])
    assert_matches_reference(SPEC, cross_entropy, (logits, labels, *rest))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_inf_logits(dtype):
    """Masked vocabulary entries (-inf), including a whole first block of a row."""
    logits, labels, *rest = make(4, 5000, dtype, ignore_every=3)
    logits[0, :4096] = float("-inf")
    logits[1, ::7] = float("-inf")
    labels[0], labels[1] = 4500, 3
    fn = functools.partial(cross_entropy, config=CONFIGS[2])  # 4096-wide blocks
    assert CONFIGS[2]["block"] == 4096
    assert_matches_reference(SPEC, fn, (logits, labels, *rest))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", [row_strided, column_major], ids=["row-strided", "column-major"])
def test_non_contiguous_logits(dtype, layout):
    assert_matches_reference(SPEC, layout, make(7, 515, dtype, reduction="sum"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_int32_labels_and_other_ignore_index(reduction):
    logits, labels, _, *rest = make(11, 300, torch.bfloat16, reduction=reduction, label_dtype=torch.int32)
    labels[labels == -100] = 7  # now a real class, while ignore_index=3 masks others
    labels[::3] = 3
    args = (logits, labels, 3, *rest)
    assert accepts(*args)
    assert_matches_reference(SPEC, cross_entropy, args)


def test_forward_only_matches_reference():
    args = make(6, 333, torch.bfloat16, softcap=8.0)
    assert_matches_reference(SPEC, cross_entropy, args, grads=False)


def test_unit_grad_output_and_input_untouched():
    """``loss.backward()`` (grad_output exactly 1: the scaling kernel skips) gives the true gradient,
    and the user's logits are never written."""
    logits, labels, *rest = make(13, 1234, torch.float32, softcap=6.0, scale=0.9)
    x = logits.clone().requires_grad_(True)
    cross_entropy(x, labels, *rest).backward()
    x64 = logits.double().requires_grad_(True)
    reference(x64, labels, *rest).backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-7)
    assert torch.equal(x.detach(), logits)


def test_no_grad_mode_writes_no_gradient(monkeypatch):
    logits, labels, *rest = make(5, 77, torch.float32)
    x = logits.requires_grad_(True)
    shapes: list[tuple[int, ...]] = []
    real = torch.empty

    def spy(*a, **kw):
        out = real(*a, **kw)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "empty", spy)
    with torch.no_grad():
        out = cross_entropy(x, labels, *rest)
    monkeypatch.undo()
    assert (5, 77) not in shapes and not out.requires_grad
    torch.testing.assert_close(out, reference(logits.detach().double(), labels, *rest).float())


def test_second_backward_is_refused():
    logits, labels, *rest = make(3, 40, torch.float32)
    x = logits.requires_grad_(True)
    loss = cross_entropy(x, labels, *rest)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_accepts(monkeypatch):
    logits, labels, *rest = make(4, 10, torch.float32)
    assert accepts(logits, labels, *rest)
    assert not accepts(logits.double(), labels, *rest)
    assert not accepts(logits[None], labels, *rest)
    assert not accepts(logits[:, :0], labels, *rest)
    assert not accepts(logits, labels.float(), *rest)
    assert not accepts(logits, labels[:3], *rest)
    assert not accepts(logits, labels, -100, "max", None, 1.0)
    assert not accepts(logits, labels, -100, "mean", -1.0, 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not accepts(logits, labels, *rest)  # CPU tensors need the interpreter


def test_kernel_record():
    (kernel,) = KERNELS
    assert kernel.op == SPEC.name and kernel.name == "cross_entropy" and kernel.configs == CONFIGS
    check_signature(SPEC.parameters, kernel.fn, wants_config=True, name=kernel.name)
    for config in CONFIGS:
        assert kernel.aot(config), config


# ----------------------------------------------------------------------------- ahead of time
def test_aot_units_compile_for_sm90():
    """Every distinct unit of every config compiles for sm_90."""
    aot_compile_sm90("from slipstream.kernels.cross_entropy import KERNELS\n"
                     "units = [u for k in KERNELS for c in k.configs for u in k.aot(c)]")
