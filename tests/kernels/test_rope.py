"""The Triton RoPE kernel against the op's reference (fp64 truth, per-dtype tolerance), forward and
backward, under Triton's CPU interpreter; plus ahead-of-time compilation for sm_90."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels import rope as kmod
from slipstream.ops.rope import SPEC
from tests.helpers import aot_compile_sm90, assert_matches_reference

CPU = torch.device("cpu")


def _fn(config: dict | None = None):
    return lambda q, k, cos, sin, pos: kmod.rope(q, k, cos, sin, pos, config=config)


def _tables(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style cos/sin (halves equal) of random angles, of ``shape`` (..., D)."""
    angles = torch.rand(*shape[:-1], shape[-1] // 2) * 6.283
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qk(b: int, hq: int, hk: int, s: int, d: int, dtype: torch.dtype = torch.float32):
    return torch.randn(b, hq, s, d, dtype=dtype), torch.randn(b, hk, s, d, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("label", [s.label for s in SPEC.samples(CPU, torch.float32, "small")])
def test_spec_samples(dtype: torch.dtype, label: str) -> None:
    sample = next(s for s in SPEC.samples(CPU, dtype, "small") if s.label == label)
    assert_matches_reference(SPEC, _fn(), sample.args)


def test_float16_sample() -> None:
    sample = SPEC.samples(CPU, torch.float16, "small")[0]
    assert_matches_reference(SPEC, _fn(), sample.args)


@pytest.mark.parametrize("config", kmod.CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_config(config: dict) -> None:
    # 20 q heads / 4 k heads: several head tiles per token for the smaller block_heads.
    q, k = _qk(2, 20, 4, 5, 32, torch.bfloat16)
    cos, sin = _tables((2, 5, 32), torch.bfloat16)
    assert_matches_reference(SPEC, _fn(config), (q, k, cos, sin, None))


@pytest.mark.parametrize("layout", ["(B,S,D)", "(1,S,D)", "(S,D)"])
def test_cos_sin_layouts(layout: str) -> None:
    b, s, d = 3, 6, 16
    shape = {"(B,S,D)": (b, s, d), "(1,S,D)": (1, s, d), "(S,D)": (s, d)}[layout]
    cos, sin = _tables(shape)  # per-batch tables differ in the (B,S,D) case
    q, k = _qk(b, 4, 2, s, d)
    assert_matches_reference(SPEC, _fn(), (q, k, cos, sin, None))


@pytest.mark.parametrize("batch_positions", [True, False], ids=["pos(B,S)", "pos(1,S)"])
def test_position_ids(batch_positions: bool) -> None:
    b, s, d, p = 2, 9, 12, 40
    cos, sin = _tables((p, d))
    pos = torch.randint(0, p, (b if batch_positions else 1, s))
    q, k = _qk(b, 3, 1, s, d)
    assert_matches_reference(SPEC, _fn(kmod.CONFIGS[2]), (q, k, cos, sin, pos))


def test_packed_int32_positions_bf16_table() -> None:
    lengths = [4, 1, 6]
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(torch.int32)
    cos, sin = _tables((max(lengths), 8), torch.bfloat16)
    q, k = _qk(1, 6, 2, sum(lengths), 8, torch.bfloat16)
    assert_matches_reference(SPEC, _fn(), (q, k, cos, sin, pos))


def test_arbitrary_tables_backward_is_exact_transpose() -> None:
    """cos/sin whose halves differ (not a rotation): backward must still be the exact adjoint."""
    q, k = _qk(1, 2, 2, 7, 10)
    cos, sin = torch.randn(7, 10), torch.randn(7, 10)
    assert_matches_reference(SPEC, _fn(), (q, k, cos, sin, None))


def test_hf_layout_and_strided_inputs() -> None:
    """q/k as HF makes them ((B, S, H, D) transposed to (B, H, S, D)), a strided head dim (copied),
    a batch-broadcast cos/sin (stride 0), and a strided incoming gradient."""

    def fn(q, k, cos, sin, pos):
        q_hf = q.transpose(1, 2).contiguous().transpose(1, 2)
        k_strided = torch.stack([k, k.detach()], dim=-1)[..., 0]  # head dim stride 2
        cos_b = cos[:1].expand(q.shape[0], -1, -1)
        sin_b = sin[:1].expand(q.shape[0], -1, -1)
        qo, ko = kmod.rope(q_hf, k_strided, cos_b, sin_b, pos)
        d = qo.shape[-1]
        return torch.cat([qo, qo.detach()], -1)[..., :d], ko

    q, k = _qk(2, 4, 2, 5, 8)
    cos, sin = _tables((1, 5, 8))
    assert_matches_reference(SPEC, fn, (q, k, cos.expand(2, -1, -1), sin.expand(2, -1, -1), None))


@pytest.mark.parametrize("which", ["q", "k"])
def test_single_grad(which: str) -> None:
    q, k = _qk(1, 4, 2, 3, 8)
    q.requires_grad_(which == "q")
    k.requires_grad_(which == "k")
    cos, sin = _tables((3, 8))
    assert_matches_reference(SPEC, _fn(), (q, k, cos, sin, None), grads=False)


def test_no_tokens() -> None:
    q, k = _qk(1, 2, 1, 0, 8)
    cos, sin = _tables((0, 8))
    assert_matches_reference(SPEC, _fn(), (q, k, cos, sin, None))


def test_accepts() -> None:
    q, k = _qk(1, 2, 1, 3, 8)
    cos, sin = _tables((3, 8))
    assert kmod.accepts(q, k, cos, sin, None)
    assert not kmod.accepts(q.double(), k.double(), cos, sin, None)
    assert not kmod.accepts(q, k.half(), cos, sin, None)
    assert not kmod.accepts(q, k, cos, sin, torch.zeros(1, 3))  # float positions


def test_kernels_entry() -> None:
    (kernel,) = kmod.KERNELS
    assert (kernel.op, kernel.name) == ("rope", "rope")
    assert 2 <= len(kernel.configs) <= 5


def test_aot_compiles_for_sm90() -> None:
    """Every unit of the first config compiles for sm_90."""
    aot_compile_sm90("from slipstream.kernels.rope import KERNELS\nk = KERNELS[0]\nunits = k.aot(k.configs[0])")
