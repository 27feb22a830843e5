"""Edge cases through the public dispatched functions (``slipstream.ops.<name>``).

Whatever implementation the dispatcher picks on this machine (on a CPU-only machine with
``TRITON_INTERPRET=1``: the backends' Triton kernels run by the interpreter, a plugin candidate
like ``template.swiglu``, or the reference), the result must equal the reference, forward and
gradients: within ``REL`` = 1e-5 norm-wise in fp32, the fp32 elementwise tolerance of the op
specs (a kernel may reduce in blocks, so bit-equality is not the contract).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slipstream.ops as ops
from slipstream.dispatch import call
from slipstream.ops.lora_linear_group import flat_args
from slipstream.quant import quantize_nf4
from tests.helpers import assert_matches_reference
from tests.ops._compare import assert_no_worse, assert_tight

REF = {name: spec.reference for name, spec in ops.SPECS.items()}
REL = 1e-5


def group(*args):
    """``lora_linear_group`` called with its flat (slot) arguments, like its reference, through the dispatcher."""
    return call(ops.spec("lora_linear_group"), args)


FLAT = {"lora_linear_group": group}  # ops whose public function takes another argument form


def rg(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_()


# ----------------------------------------------------------------------------------------- 0 rows
def zero_row_calls():
    return {
        "rms_norm": (ops.rms_norm, (rg(torch.randn(0, 32)), rg(torch.randn(32)), 1e-6, 0.0)),
        "rope": (ops.rope, (rg(torch.randn(2, 4, 0, 16)), rg(torch.randn(2, 2, 0, 16)), torch.randn(0, 16),
                            torch.randn(0, 16), None)),
        "swiglu": (ops.swiglu, (rg(torch.randn(0, 24)), rg(torch.randn(0, 24)))),
        "geglu": (ops.geglu, (rg(torch.randn(0, 24)), rg(torch.randn(0, 24)), "tanh")),
        "cross_entropy": (ops.cross_entropy, (rg(torch.randn(0, 50)), torch.zeros(0, dtype=torch.long))),
        "linear_cross_entropy": (ops.linear_cross_entropy, (rg(torch.randn(0, 16)), rg(torch.randn(50, 16)),
                                                            torch.zeros(0, dtype=torch.long))),
        "lora_linear": (ops.lora_linear, (rg(torch.randn(0, 32)), torch.randn(24, 32), rg(torch.randn(4, 32)),
                                          rg(torch.randn(24, 4)), 2.0)),
        "lora_linear_group": (group, flat_args(rg(torch.randn(0, 32)), [torch.randn(24, 32), torch.randn(8, 32)],
                                               [rg(torch.randn(4, 32)), rg(torch.randn(2, 32))],
                                               [rg(torch.randn(24, 4)), rg(torch.randn(8, 2))], [2.0, 0.5],
                                               [None, rg(torch.randn(8))])),
        "attention": (ops.attention, (rg(torch.randn(1, 4, 0, 8)), rg(torch.randn(1, 2, 0, 8)),
                                      rg(torch.randn(1, 2, 0, 8)))),
    }


@pytest.mark.parametrize("name", list(ops.SPECS))
def test_zero_rows(name):
    fn, args = zero_row_calls()[name]
    out = fn(*args)
    want = REF[name](*args)
    for o, w in zip(out if isinstance(out, tuple) else (out,), want if isinstance(want, tuple) else (want,),
                    strict=True):
        assert o.shape == w.shape and o.dtype == w.dtype
        assert torch.isfinite(o).all()
    if name in ("cross_entropy", "linear_cross_entropy"):
        assert out.item() == 0.0  # mean over no tokens is 0, like an all-ignored batch
    assert_tight(fn, REF[name], args, rel=REL)


# ----------------------------------------------------------------------------------------- 1 row
def test_one_row_equals_that_row_of_a_batch():
    """Row independence: each op's 1-row result is the same row of a many-row call."""
    x, w = torch.randn(9, 40), torch.randn(40)
    torch.testing.assert_close(ops.rms_norm(x[4:5], w), ops.rms_norm(x, w)[4:5], rtol=1e-6, atol=1e-6)
    g, u = torch.randn(9, 33), torch.randn(9, 33)
    torch.testing.assert_close(ops.swiglu(g[2:3], u[2:3]), ops.swiglu(g, u)[2:3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ops.geglu(g[2:3], u[2:3]), ops.geglu(g, u)[2:3], rtol=1e-6, atol=1e-6)
    z, labels = torch.randn(9, 70), torch.randint(0, 70, (9,))
    per_token = ops.cross_entropy(z, labels, reduction="none")
    torch.testing.assert_close(ops.cross_entropy(z[6:7], labels[6:7]), per_token[6], rtol=1e-6, atol=1e-6)
    h, lw = torch.randn(9, 16), torch.randn(70, 16)
    torch.testing.assert_close(ops.linear_cross_entropy(h[6:7], lw, labels[6:7]),
                               ops.linear_cross_entropy(h, lw, labels, reduction="none")[6], rtol=1e-6, atol=1e-6)
    lx, lwt, a, b = torch.randn(9, 32), torch.randn(20, 32), torch.randn(4, 32), torch.randn(20, 4)
    torch.testing.assert_close(ops.lora_linear(lx[0:1], lwt, a, b, 2.0), ops.lora_linear(lx, lwt, a, b, 2.0)[0:1],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(ops.SPECS))
def test_one_row_forward_and_backward(name):
    calls = {
        "rms_norm": (torch.randn(1, 33), torch.randn(33), 1e-6, 1.0),
        "rope": (torch.randn(1, 3, 1, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 8), torch.randn(1, 8), None),
        "swiglu": (torch.randn(1, 17), torch.randn(1, 17)),
        "geglu": (torch.randn(1, 17), torch.randn(1, 17), "none"),
        "cross_entropy": (torch.randn(1, 7), torch.tensor([3])),
        "linear_cross_entropy": (torch.randn(1, 16), torch.randn(33, 16), torch.tensor([32])),
        "lora_linear": (torch.randn(1, 16), torch.randn(24, 16), torch.randn(2, 16), torch.randn(24, 2), 0.5),
        "lora_linear_group": flat_args(torch.randn(1, 16),
                                       [torch.randn(24, 16), torch.randn(8, 16), torch.randn(8, 16)],
                                       [torch.randn(2, 16), torch.randn(3, 16), torch.randn(1, 16)],
                                       [torch.randn(24, 2), torch.randn(8, 3), torch.randn(8, 1)], [0.5, 1.0, 2.0],
                                       [torch.randn(24), None, torch.randn(8)]),
        "attention": (torch.randn(1, 2, 1, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)),
    }
    spec = ops.SPECS[name]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 and n in spec.differentiable else a for n, a in zip(spec.parameters, calls[name], strict=False))
    fn = FLAT.get(name) or getattr(ops, name)
    assert_tight(fn, REF[name], args, rel=REL)
    assert_matches_reference(spec, fn, args)  # and the dispatcher's own oracle agrees


# ----------------------------------------------------------------------------------------- non-contiguous
def test_non_contiguous_inputs():
    """Transposed / sliced views (HF's q is a transpose of the projection; gate/up are slices of one matmul)."""
    def check(fn, ref, args):
        assert any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in args)
        assert_tight(fn, lambda *xs: ref(*(x.contiguous() if isinstance(x, torch.Tensor) else x for x in xs)),
                     args, rel=REL)

    check(ops.rms_norm, REF["rms_norm"], (rg(torch.randn(48, 6).t()), rg(torch.randn(96)[::2]), 1e-6, 0.0))
    proj = torch.randn(2, 7, 6, 16)  # (B, S, H, D) as the q/k projection views it
    q = rg(proj[:, :, :4].transpose(1, 2))  # (B, H, S, D), non-contiguous
    k = rg(proj[:, :, 4:].transpose(1, 2))
    ang = torch.randn(7, 8)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    check(ops.rope, REF["rope"], (q, k, cos.t().contiguous().t(), sin, None))
    gate_up = torch.randn(5, 3, 2 * 40)
    gate, up = gate_up.chunk(2, dim=-1)
    check(ops.swiglu, REF["swiglu"], (rg(gate), rg(up)))
    check(ops.geglu, REF["geglu"], (rg(gate), rg(up), "tanh"))
    wide = torch.randn(12, 130)
    labels = torch.randint(0, 100, (6,))
    check(ops.cross_entropy, REF["cross_entropy"], (rg(wide[::2, :100]), labels))
    check(ops.cross_entropy, REF["cross_entropy"], (rg(wide[::2, :100]), labels, -100, "none"))
    check(ops.linear_cross_entropy, REF["linear_cross_entropy"],
          (rg(torch.randn(16, 6).t()), rg(torch.randn(16, 100).t()), torch.randint(0, 100, (12,))[::2]))
    x = torch.randn(4, 9, 64)[:, 1:, :32]
    check(ops.lora_linear, REF["lora_linear"],
          (rg(x), rg(torch.randn(32, 24).t()), rg(torch.randn(32, 4).t()), rg(torch.randn(4, 24).t()), 2.0,
           rg(torch.randn(48)[::2])))
    qkv = torch.randn(1, 11, 8, 16)  # fused qkv projection viewed (B, S, Hq + 2 Hk, D)
    check(ops.attention, REF["attention"],
          (rg(qkv[:, :, :4].transpose(1, 2)), rg(qkv[:, :, 4:6].transpose(1, 2)), rg(qkv[:, :, 6:].transpose(1, 2))))


def test_non_contiguous_quantized_lora_input():
    w = quantize_nf4(torch.randn(24, 64) * 0.1)
    x = torch.randn(64, 6).t()
    args = (rg(x), w, rg(torch.randn(4, 64)), rg(torch.randn(24, 4)), 1.5)
    assert_tight(ops.lora_linear, lambda x, *r: REF["lora_linear"](x.contiguous(), *r), args, rel=REL)


# ----------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_label_ignored(reduction):
    logits = torch.randn(6, 40, requires_grad=True)
    labels = torch.full((6,), -100)
    loss = ops.cross_entropy(logits, labels, -100, reduction)
    assert torch.equal(loss.detach(), torch.zeros(()) if reduction != "none" else torch.zeros(6))
    (g,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.equal(g, torch.zeros_like(g))
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    loss = ops.linear_cross_entropy(h, w, labels, None, -100, reduction, 5.0)
    assert torch.isfinite(loss).all() and not loss.detach().abs().sum()
    gh, gw = torch.autograd.grad(loss.sum(), (h, w))
    assert not gh.abs().sum() and not gw.abs().sum()


def test_custom_ignore_index_and_int32_labels():
    logits = torch.randn(5, 12, requires_grad=True)
    labels = torch.tensor([0, 11, 4, 0, 7], dtype=torch.int32)
    got = ops.cross_entropy(logits, labels, 0)
    want = F.cross_entropy(logits, labels.long(), ignore_index=0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- big vocab
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_262144_two_rows(dtype):
    v = 262144  # Gemma 3
    logits = (torch.randn(2, v) * 3).to(dtype).requires_grad_()
    labels = torch.tensor([v - 1, 12345])

    def torch_ce(z, labels=labels):
        return F.cross_entropy(z.float(), labels)

    if dtype == torch.float32:
        assert_tight(lambda z: ops.cross_entropy(z, labels), torch_ce, (logits,), rel=REL)
        with torch.no_grad():  # Gemma-2-style cap at this vocabulary, per token
            capped = ops.cross_entropy(logits, labels, -100, "none", 30.0)
        torch.testing.assert_close(capped, F.cross_entropy(30.0 * torch.tanh(logits.detach() / 30.0), labels,
                                                           reduction="none"), rtol=1e-5, atol=1e-5)
    else:
        assert_no_worse(lambda z: ops.cross_entropy(z, labels), torch_ce, torch_ce, (logits,))


def test_linear_cross_entropy_vocab_262144_two_rows():
    v, h = 262144, 8
    hidden = torch.randn(2, h, requires_grad=True)
    weight = (torch.randn(v, h) * h ** -0.5).requires_grad_()
    labels = torch.tensor([7, v - 2])
    assert_tight(lambda x, w: ops.linear_cross_entropy(x, w, labels),
                 lambda x, w: F.cross_entropy(x @ w.T, labels), (hidden, weight), rel=REL)


# ----------------------------------------------------------------------------------------- attention S=1
@pytest.mark.parametrize("window,softcap", [(None, None), (1, 3.0)])
def test_attention_single_token(window, softcap):
    """One token attends only to itself: out == v (per GQA group), dq == dk == 0, dv == sum over the group."""
    q = torch.randn(2, 6, 1, 8, requires_grad=True)
    k = torch.randn(2, 2, 1, 8, requires_grad=True)
    v = torch.randn(2, 2, 1, 8, requires_grad=True)
    out = ops.attention(q, k, v, True, None, window, softcap)
    torch.testing.assert_close(out, v.detach().repeat_interleave(3, dim=1), rtol=0, atol=1e-7)
    go = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go)
    assert dq.abs().max() < 1e-6 and dk.abs().max() < 1e-6
    torch.testing.assert_close(dv, go.reshape(2, 2, 3, 1, 8).sum(2), rtol=1e-6, atol=1e-6)


def test_attention_single_token_packed_sequences():
    """Packed length-1 sequences only see themselves even without a causal mask."""
    q = torch.randn(1, 2, 4, 8)
    k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    cu = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    torch.testing.assert_close(ops.attention(q, k, v, False, None, None, None, cu), v, rtol=0, atol=1e-6)


def test_rope_position_zero_is_identity():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = torch.ones(1, 8), torch.zeros(1, 8)
    got_q, got_k = ops.rope(q, k, cos, sin)
    assert torch.equal(got_q, q) and torch.equal(got_k, k)
