"""The Triton RMSNorm kernel against the op's reference (fp64 truth, per-dtype tolerance), forward and
backward, under Triton's CPU interpreter; plus ahead-of-time compilation for sm_90."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels import rms_norm as kmod
from slipstream.ops.rms_norm import SPEC
from tests.helpers import aot_compile_sm90, assert_matches_reference

CPU = torch.device("cpu")


def _fn(config: dict | None = None):
    return lambda x, w, eps, offset: kmod.rms_norm(x, w, eps, offset, config=config)


def _sample_ids(dtype: torch.dtype) -> list[str]:
    return [s.label for s in SPEC.samples(CPU, dtype, "small")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("label", _sample_ids(torch.float32))
def test_spec_samples(dtype: torch.dtype, label: str) -> None:
    sample = next(s for s in SPEC.samples(CPU, dtype, "small") if s.label == label)
    assert_matches_reference(SPEC, _fn(), sample.args)


def test_float16_sample() -> None:
    sample = SPEC.samples(CPU, torch.float16, "small")[2]  # odd 7x1000
    assert_matches_reference(SPEC, _fn(), sample.args)


@pytest.mark.parametrize("config", kmod.CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_config(config: dict) -> None:
    # 37 rows of H = 96: several rows per tile (block // 128) and a ragged last tile.
    x = torch.randn(37, 96, dtype=torch.bfloat16)
    w = (torch.randn(96) * 0.5 + 1.0).to(torch.bfloat16)
    assert_matches_reference(SPEC, _fn(config), (x, w, 1e-6, 0.0))


def test_three_d_gemma_offset() -> None:
    x = torch.randn(2, 5, 200)
    w = torch.randn(200) * 0.5
    assert_matches_reference(SPEC, _fn(kmod.CONFIGS[1]), (x, w, 1e-5, 1.0))


def test_non_contiguous_inputs_and_grad() -> None:
    """x as a column slice (row stride != H: read in place) and as a transposed view (copied);
    the incoming gradient as a column slice too."""

    def fn(x, w, eps, offset):
        h = x.shape[-1]
        sliced = torch.cat([x, x.detach()], -1)[..., :h]  # row stride 2H, unit column stride
        y1 = kmod.rms_norm(sliced, w, eps, offset)
        y2 = kmod.rms_norm(x.transpose(0, 1).contiguous().transpose(0, 1), w, eps, offset)
        y = (y1 + y2) * 0.5
        return torch.cat([y, y.detach()], -1)[..., :h]  # backward sees a strided dy

    x = torch.randn(6, 50)
    w = torch.randn(50) * 0.5 + 1.0
    assert_matches_reference(SPEC, fn, (x, w, 1e-6, 0.0))


def test_large_hidden() -> None:
    x = torch.randn(3, 16384, dtype=torch.bfloat16)
    w = (torch.randn(16384) * 0.5 + 1.0).to(torch.bfloat16)
    assert_matches_reference(SPEC, _fn(kmod.CONFIGS[2]), (x, w, 1e-6, 0.0))


def test_mixed_dtypes_fp32_weight() -> None:
    x = torch.randn(9, 64, dtype=torch.bfloat16)
    w = torch.randn(64) * 0.5 + 1.0
    assert_matches_reference(SPEC, _fn(), (x, w, 1e-6, 0.0))


@pytest.mark.parametrize("which", ["x", "weight"])
def test_single_grad(which: str) -> None:
    x = torch.randn(11, 72).requires_grad_(which == "x")
    w = (torch.randn(72) * 0.5 + 1.0).requires_grad_(which == "weight")
    assert_matches_reference(SPEC, _fn(), (x, w, 1e-6, 0.0), grads=False)


def test_persistent_backward_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer backward programs than tiles: each program strides over several tiles and the dw
    partials of several programs are summed."""
    monkeypatch.setattr(kmod, "_bwd_programs", lambda device, n_tiles, warps, weight_grad: min(n_tiles, 3))
    x = torch.randn(45, 130)
    w = torch.randn(130) * 0.5 + 1.0
    assert_matches_reference(SPEC, _fn({"num_warps": 4, "block": 512}), (x, w, 1e-6, 0.0))


def test_accepts() -> None:
    x, w = torch.randn(2, 8), torch.randn(8)
    assert kmod.accepts(x, w, 1e-6, 0.0)
    assert not kmod.accepts(x.double(), w.double(), 1e-6, 0.0)
    big = torch.empty(1, kmod.MAX_H + 2)
    assert not kmod.accepts(big, torch.empty(kmod.MAX_H + 2))


def test_kernels_entry() -> None:
    (kernel,) = kmod.KERNELS
    assert (kernel.op, kernel.name) == ("rms_norm", "rms_norm")
    assert 2 <= len(kernel.configs) <= 5


def test_aot_compiles_for_sm90() -> None:
    """Every unit of the first config compiles for sm_90."""
    aot_compile_sm90("from slipstream.kernels.rms_norm import KERNELS\nk = KERNELS[0]\nunits = k.aot(k.configs[0])")
