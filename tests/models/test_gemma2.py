"""Gemma 2: sliding window on alternating layers, attention-logit and final-logit soft-caps honoured."""

from __future__ import annotations

import copy

import torch

from slipstream.models import accelerate, attention_fallbacks, reset_attention_fallbacks
from tests.models.tiny import FWD_TOL, GEMMA2_SOFTCAPS, build, ids, rel


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def test_window_and_softcaps_are_honoured():
    slow = build("gemma2")
    cfg = slow.config
    assert cfg.sliding_window == 4 and cfg.layer_types[0] == "sliding_attention"
    fast = copy.deepcopy(slow)
    report = accelerate(fast)
    x = ids(2, 16, seed=3)  # 16 tokens >> window 4
    reset_attention_fallbacks()
    assert rel(logits(fast, x), logits(slow, x)) < FWD_TOL
    assert attention_fallbacks() == {}
    details = {m.module: m.detail for m in report.accelerated if m.op == "attention"}
    assert "sliding window 4" in details["model.layers.0.self_attn"]
    assert "sliding window" not in details["model.layers.1.self_attn"]
    assert "softcap 0.8" in details["model.layers.1.self_attn"]
    assert "final softcap 1.5" in report.accelerated[-1].detail

    # the loss path applies the final soft-cap to the logits it never materialises
    ref = slow(input_ids=x, labels=x, use_cache=False).loss
    got = fast(input_ids=x, labels=x, use_cache=False)
    assert got.logits is None and rel(got.loss, ref) < FWD_TOL

    # the test is sensitive: each feature changes the result by far more than the tolerance
    for change in (
        dict(sliding_window=64),
        dict(attn_logit_softcapping=None),
        dict(final_logit_softcapping=None),
    ):
        other = build("gemma2", **{**GEMMA2_SOFTCAPS, **change})
        assert rel(logits(other, x), logits(slow, x)) > 1e3 * FWD_TOL, change


def test_packed_window_stays_inside_each_sequence():
    slow = build("gemma2")
    fast = copy.deepcopy(slow)
    accelerate(fast)
    seqs = [ids(1, n, seed=40 + n) for n in (9, 2, 7)]
    row = torch.cat(seqs, dim=1)
    pos = torch.cat([torch.arange(s.shape[1]) for s in seqs]).unsqueeze(0)
    packed = fast(input_ids=row, position_ids=pos, use_cache=False).logits[0].detach()
    alone = torch.cat([logits(slow, s)[0] for s in seqs])
    assert rel(packed, alone) < FWD_TOL
