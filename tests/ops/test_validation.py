"""Every public op rejects bad calls with an error that names the offending argument.

Calls go through ``slipstream.ops.<name>``: validation is the first thing the dispatcher does.
A second device is simulated with ``meta`` tensors (validation must never touch the data).
"""

from __future__ import annotations

import pytest
import torch

import slipstream.ops as ops
from slipstream.quant import quantize_nf4


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype) if dtype.is_floating_point \
        else torch.zeros(*shape, dtype=dtype, device=device)


META = "meta"
X, W = t(4, 32), t(32)
Q, K, C = t(1, 4, 6, 16), t(1, 2, 6, 16), t(6, 16)
LOGITS, LABELS = t(5, 40), torch.randint(0, 40, (5,))
HID, LMW = t(5, 24), t(40, 24)
LX, LW, LA, LB = t(3, 32), t(48, 32), t(4, 32), t(48, 4)

CASES = [
    # ------------------------------------------------------------------ rms_norm
    ("rms_norm wrong weight size", ops.rms_norm, (X, t(31)), ValueError, r"`weight` must have shape \(H,\)"),
    ("rms_norm 2-D weight", ops.rms_norm, (X, t(1, 32)), ValueError, r"`weight` must have shape"),
    ("rms_norm int x", ops.rms_norm, (t(4, 32, dtype=torch.int64), W), TypeError, r"`x` must be a floating-point"),
    ("rms_norm fp64 x", ops.rms_norm, (X.double(), W), TypeError, r"`x` has dtype torch.float64; supported"),
    ("rms_norm fp8 weight", ops.rms_norm, (X, W.to(torch.float8_e4m3fn)), TypeError, r"`weight` has dtype"),
    ("rms_norm list x", ops.rms_norm, ([[1.0]], W), TypeError, r"`x` must be a torch.Tensor, got list"),
    ("rms_norm weight on meta", ops.rms_norm, (X, t(32, device=META)), ValueError, r"`weight` on meta"),
    ("rms_norm eps 0", ops.rms_norm, (X, W, 0.0), ValueError, r"`eps` must be > 0"),
    # ------------------------------------------------------------------ rope
    ("rope k head dim", ops.rope, (Q, t(1, 2, 6, 8), C, C), ValueError, r"`k` \(1, 2, 6, 8\) must match `q`"),
    ("rope k seq len", ops.rope, (Q, t(1, 2, 5, 16), C, C), ValueError, r"`k` .* must match `q` .* in B, S and D"),
    ("rope odd head dim", ops.rope, (t(1, 2, 6, 15), t(1, 2, 6, 15), t(6, 15), t(6, 15)), ValueError,
     r"head dim D must be even, got 15"),
    ("rope 3-D q", ops.rope, (t(4, 6, 16), K, C, C), ValueError, r"`q` and `k` must be \(B, H, S, D\)"),
    ("rope cos/sin mismatch", ops.rope, (Q, K, C, t(7, 16)), ValueError, r"`cos` \(6, 16\) and `sin` \(7, 16\)"),
    ("rope cos wrong shape", ops.rope, (Q, K, t(6, 8), t(6, 8)), ValueError, r"`cos`/`sin` must be \(1, 6, 16\)"),
    ("rope table needs 2-D", ops.rope, (Q, K, t(1, 6, 16), t(1, 6, 16), torch.zeros(1, 6, dtype=torch.long)),
     ValueError, r"with `position_ids`, `cos`/`sin` must be a \(P, 16\) table"),
    ("rope position_ids shape", ops.rope, (Q, K, t(20, 16), t(20, 16), torch.zeros(1, 5, dtype=torch.long)),
     ValueError, r"`position_ids` must be \(1, 6\)"),
    ("rope float position_ids", ops.rope, (Q, K, t(20, 16), t(20, 16), torch.zeros(1, 6)), TypeError,
     r"`position_ids` must be an integer tensor"),
    ("rope int q", ops.rope, (t(1, 4, 6, 16, dtype=torch.int32), K, C, C), TypeError, r"`q` must be a floating"),
    ("rope sin dtype", ops.rope, (Q, K, C, C.double()), TypeError, r"`sin` has dtype torch.float64"),
    ("rope k on meta", ops.rope, (Q, t(1, 2, 6, 16, device=META), C, C), ValueError, r"`k` on meta"),
    ("rope position_ids on meta", ops.rope,
     (Q, K, t(20, 16), t(20, 16), torch.zeros(1, 6, dtype=torch.long, device=META)), ValueError,
     r"`position_ids` on meta"),
    # ------------------------------------------------------------------ swiglu / geglu
    ("swiglu shape", ops.swiglu, (t(3, 8), t(3, 9)), ValueError, r"`gate` \(3, 8\) and `up` \(3, 9\) must have one"),
    ("swiglu dtype", ops.swiglu, (t(3, 8), t(3, 8, dtype=torch.bfloat16)), TypeError,
     r"`gate` \(torch.float32\) and `up` \(torch.bfloat16\) must have one dtype"),
    ("swiglu int up", ops.swiglu, (t(3, 8), t(3, 8, dtype=torch.int64)), TypeError, r"`up` must be a floating"),
    ("swiglu fp64", ops.swiglu, (t(3, 8).double(), t(3, 8).double()), TypeError, r"`gate` has dtype torch.float64"),
    ("swiglu up on meta", ops.swiglu, (t(3, 8), t(3, 8, device=META)), ValueError, r"`up` on meta"),
    ("geglu approximate", ops.geglu, (t(3, 8), t(3, 8), "tanhh"), ValueError,
     r"`approximate` must be one of \('none', 'tanh'\), got 'tanhh'"),
    ("geglu approximate None", ops.geglu, (t(3, 8), t(3, 8), None), ValueError, r"`approximate` must be one of"),
    ("geglu shape", ops.geglu, (t(3, 8), t(2, 8)), ValueError, r"`gate` \(3, 8\) and `up` \(2, 8\)"),
    # ------------------------------------------------------------------ cross_entropy
    ("ce 3-D logits", ops.cross_entropy, (t(2, 5, 40), LABELS), ValueError, r"`logits` must be \(N, V\)"),
    ("ce labels shape", ops.cross_entropy, (LOGITS, torch.zeros(6, dtype=torch.long)), ValueError,
     r"`labels` must have shape \(5,\), got \(6,\)"),
    ("ce labels 2-D", ops.cross_entropy, (LOGITS, torch.zeros(1, 5, dtype=torch.long)), ValueError,
     r"`labels` must have shape \(5,\)"),
    ("ce float labels", ops.cross_entropy, (LOGITS, torch.zeros(5)), TypeError, r"`labels` must be"),
    ("ce int16 labels", ops.cross_entropy, (LOGITS, torch.zeros(5, dtype=torch.int16)), TypeError,
     r"`labels` must be int64 or int32, got torch.int16"),
    ("ce reduction", ops.cross_entropy, (LOGITS, LABELS, -100, "avg"), ValueError,
     r"`reduction` must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    ("ce softcap", ops.cross_entropy, (LOGITS, LABELS, -100, "mean", 0.0), ValueError, r"`softcap` must be > 0"),
    ("ce int logits", ops.cross_entropy, (LOGITS.long(), LABELS), TypeError, r"`logits` must be a floating"),
    ("ce labels on meta", ops.cross_entropy, (LOGITS, LABELS.to(META)), ValueError, r"`labels` on meta"),
    # ------------------------------------------------------------------ linear_cross_entropy
    ("lce weight H", ops.linear_cross_entropy, (HID, t(40, 25), LABELS), ValueError,
     r"need `hidden` \(N, H\) and `weight` \(V, H\); got hidden \(5, 24\), weight \(40, 25\)"),
    ("lce 3-D hidden", ops.linear_cross_entropy, (t(1, 5, 24), LMW, LABELS), ValueError, r"need `hidden` \(N, H\)"),
    ("lce weight dtype", ops.linear_cross_entropy, (HID, LMW.bfloat16(), LABELS), TypeError,
     r"`weight` \(torch.bfloat16\) must have `hidden`'s dtype"),
    ("lce bias shape", ops.linear_cross_entropy, (HID, LMW, LABELS, t(39)), ValueError, r"`bias` must be \(40,\)"),
    ("lce labels shape", ops.linear_cross_entropy, (HID, LMW, LABELS[:4]), ValueError,
     r"`labels` must have shape \(5,\)"),
    ("lce reduction", ops.linear_cross_entropy, (HID, LMW, LABELS, None, -100, "batchmean"), ValueError,
     r"`reduction` must be one of"),
    ("lce weight on meta", ops.linear_cross_entropy, (HID, LMW.to(META), LABELS), ValueError, r"`weight` on meta"),
    # ------------------------------------------------------------------ lora_linear
    ("lora x features", ops.lora_linear, (t(3, 31), LW, LA, LB, 2.0), ValueError,
     r"`x` has 31 features but `weight` is \(48, 32\)"),
    ("lora lora_a shape", ops.lora_linear, (LX, LW, t(4, 33), LB, 2.0), ValueError,
     r"need `lora_a` \(r, 32\) and `lora_b` \(48, r\); got \(4, 33\) and \(48, 4\)"),
    ("lora lora_b rank", ops.lora_linear, (LX, LW, LA, t(48, 5), 2.0), ValueError,
     r"need `lora_a` \(r, 32\) and `lora_b` \(48, r\); got \(4, 32\) and \(48, 5\)"),
    ("lora lora_b N", ops.lora_linear, (LX, LW, LA, t(47, 4), 2.0), ValueError, r"`lora_b` \(48, r\)"),
    ("lora adapter dtypes", ops.lora_linear, (LX, LW, LA, LB.bfloat16(), 2.0), TypeError,
     r"`lora_a` \(torch.float32\) and `lora_b` \(torch.bfloat16\) must share a dtype"),
    ("lora bias shape", ops.lora_linear, (LX, LW, LA, LB, 2.0, t(32)), ValueError, r"`bias` must be \(48,\)"),
    ("lora 3-D weight", ops.lora_linear, (LX, t(1, 48, 32), LA, LB, 2.0), ValueError, r"`weight` must be \(N, K\)"),
    ("lora int x", ops.lora_linear, (LX.long(), LW, LA, LB, 2.0), TypeError, r"`x` must be a floating"),
    ("lora fp64 lora_a", ops.lora_linear, (LX, LW, LA.double(), LB.double(), 2.0), TypeError,
     r"`lora_a` has dtype torch.float64"),
    ("lora lora_b on meta", ops.lora_linear, (LX, LW, LA, LB.to(META), 2.0), ValueError, r"`lora_b` on meta"),
    ("lora quantized K", ops.lora_linear, (t(3, 31), quantize_nf4(LW), LA, LB, 2.0), ValueError,
     r"`x` has 31 features"),
    ("lora x on meta, 4-bit weight", ops.lora_linear, (LX.to(META), quantize_nf4(LW), LA.to(META), LB.to(META), 1.0),
     ValueError, r"`weight` on cpu"),
    # ------------------------------------------------------------------ lora_linear_group
    ("group one projection", ops.lora_linear_group, (LX, [LW], [LA], [LB], [2.0]), ValueError,
     r"need 2 to 3 projections"),
    ("group missing scaling", ops.lora_linear_group, (LX, [LW, LW], [LA, LA], [LB, LB], [2.0]), ValueError,
     r"got 2 weights, 2 lora_a, 2 lora_b, 1 scalings"),
    ("group x features", ops.lora_linear_group, (t(3, 31), [LW, LW], [LA, LA], [LB, LB], [2.0, 1.0]), ValueError,
     r"`x` has 31 features but `weight0` is \(48, 32\)"),
    ("group lora_b1 rank", ops.lora_linear_group, (LX, [LW, LW], [LA, LA], [LB, t(48, 5)], [2.0, 1.0]), ValueError,
     r"need `lora_a1` \(r, 32\) and `lora_b1` \(48, r\); got \(4, 32\) and \(48, 5\)"),
    ("group bias2 shape", ops.lora_linear_group, (LX, [LW, LW, LW], [LA] * 3, [LB] * 3, [1.0] * 3, [None, None, t(3)]),
     ValueError, r"`bias2` must be \(48,\)"),
    ("group adapter dtypes", ops.lora_linear_group, (LX, [LW, LW], [LA, LA], [LB, LB.bfloat16()], [1.0, 1.0]),
     TypeError, r"`lora_a1` \(torch.float32\) and `lora_b1` \(torch.bfloat16\) must share a dtype"),
    ("group scaling type", ops.lora_linear_group, (LX, [LW, LW], [LA, LA], [LB, LB], [1.0, "2"]), TypeError,
     r"`scaling1` must be a number, got str"),
    ("group int x", ops.lora_linear_group, (LX.long(), [LW, LW], [LA, LA], [LB, LB], [1.0, 1.0]), TypeError,
     r"`x` must be a floating"),
    ("group weight2 on meta", ops.lora_linear_group, (LX, [LW, LW, LW.to(META)], [LA] * 3, [LB] * 3, [1.0] * 3),
     ValueError, r"`weight2` on meta"),
    ("group quantized K", ops.lora_linear_group, (t(3, 31), [quantize_nf4(LW), LW], [LA, LA], [LB, LB], [1.0, 1.0]),
     ValueError, r"`x` has 31 features"),
    # ------------------------------------------------------------------ attention
    ("attn Hq % Hk", ops.attention, (t(1, 6, 5, 8), t(1, 4, 5, 8), t(1, 4, 5, 8)), ValueError,
     r"query heads \(6\) must be a multiple of key/value heads \(4\)"),
    ("attn k/v shapes", ops.attention, (t(1, 4, 5, 8), t(1, 2, 5, 8), t(1, 2, 6, 8)), ValueError,
     r"`k` \(1, 2, 5, 8\) and `v` \(1, 2, 6, 8\) must be \(B=1, Hk, S=5, D=8\)"),
    ("attn k head dim", ops.attention, (t(1, 4, 5, 8), t(1, 2, 5, 16), t(1, 2, 5, 16)), ValueError,
     r"must be \(B=1, Hk, S=5, D=8\)"),
    ("attn 3-D q", ops.attention, (t(4, 5, 8), t(1, 2, 5, 8), t(1, 2, 5, 8)), ValueError,
     r"`q` must be \(B, H, S, D\)"),
    ("attn dtypes", ops.attention, (t(1, 4, 5, 8), t(1, 2, 5, 8).bfloat16(), t(1, 2, 5, 8)), TypeError,
     r"q, k, v must share a dtype"),
    ("attn int v", ops.attention, (t(1, 4, 5, 8), t(1, 2, 5, 8), t(1, 2, 5, 8).long()), TypeError,
     r"`v` must be a floating"),
    ("attn cu_seqlens with B>1", ops.attention,
     (t(2, 4, 5, 8), t(2, 2, 5, 8), t(2, 2, 5, 8), True, None, None, None, torch.tensor([0, 5], dtype=torch.int32)),
     ValueError, r"packed sequences need B == 1 and `cu_seqlens` \(nseq \+ 1,\); got B=2"),
    ("attn cu_seqlens 2-D", ops.attention,
     (t(1, 4, 5, 8), t(1, 2, 5, 8), t(1, 2, 5, 8), True, None, None, None, torch.tensor([[0, 5]])),
     ValueError, r"`cu_seqlens` \(nseq \+ 1,\)"),
    ("attn float cu_seqlens", ops.attention,
     (t(1, 4, 5, 8), t(1, 2, 5, 8), t(1, 2, 5, 8), True, None, None, None, torch.tensor([0.0, 5.0])),
     TypeError, r"`cu_seqlens` must be an integer tensor"),
    ("attn window 0", ops.attention, (t(1, 4, 5, 8), t(1, 2, 5, 8), t(1, 2, 5, 8), True, None, 0), ValueError,
     r"`sliding_window` must be >= 1"),
    ("attn softcap", ops.attention, (t(1, 4, 5, 8), t(1, 2, 5, 8), t(1, 2, 5, 8), True, None, None, -1.0),
     ValueError, r"`softcap` must be > 0"),
    ("attn v on meta", ops.attention, (t(1, 4, 5, 8), t(1, 2, 5, 8), t(1, 2, 5, 8, device=META)), ValueError,
     r"`v` on meta"),
]


@pytest.mark.parametrize("fn,args,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_public_op_rejects_bad_call_naming_the_argument(fn, args, exc, match):
    with pytest.raises(exc, match=match) as info:
        fn(*args)
    assert str(info.value).startswith(f"{fn.__name__}:"), "every message starts with the op's name"


def test_every_op_has_validation_cases():
    assert {c[1].__name__ for c in CASES} == set(ops.SPECS)


def test_validation_happens_before_any_compute():
    """Meta tensors on one device would compute fine: a device mix must be refused up front."""
    with pytest.raises(ValueError, match="one device"):
        ops.swiglu(t(2, 4, device=META), t(2, 4))
    assert ops.rms_norm(t(2, 8, device=META), t(8, device=META)).device.type == META


def test_spec_tolerance_unknown_dtype_is_clear():
    with pytest.raises(TypeError, match=r"rms_norm: dtype torch.int32 is not supported"):
        ops.spec("rms_norm").tolerance(torch.int32)
    with pytest.raises(KeyError, match="unknown op 'rmsnorm'; known ops: rms_norm"):
        ops.spec("rmsnorm")
