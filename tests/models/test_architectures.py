"""Every supported family: accelerated == unaccelerated (forward, loss, LoRA grads), packing, padding,
the report, and deaccelerate. Tolerances: see ``tests/models/tiny.py``."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from slipstream.models import (
    accelerate,
    attention_fallbacks,
    deaccelerate,
    report_of,
    reset_attention_fallbacks,
)
from tests.models.tiny import ARCHS, EXPECTED, FWD_TOL, GRAD_TOL, build, ids, rel, with_lora

ARCH_NAMES = list(ARCHS)


@pytest.fixture(scope="module", params=ARCH_NAMES)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def base(arch):
    return build(arch)


@pytest.fixture(scope="module")
def pair(base):
    """(baseline, accelerated) without LoRA."""
    fast = copy.deepcopy(base)
    report = accelerate(fast)
    return base, fast, report


@pytest.fixture(scope="module")
def lora_pair(base):
    slow = with_lora(base)
    fast = copy.deepcopy(slow)
    report = accelerate(fast)
    return slow, fast, report


def forward_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x, labels=x, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_forward_logits_match(pair):
    slow, fast, _ = pair
    x = ids(2, 14)
    with torch.no_grad():
        ref = slow(input_ids=x, use_cache=False).logits
        got = fast(input_ids=x, use_cache=False).logits
    assert rel(got, ref) < FWD_TOL


def test_loss_and_grads_match(pair):
    slow, fast, _ = pair
    x = ids(2, 14, seed=1)
    ref, ref_grads = forward_and_grads(slow, x)
    got, got_grads = forward_and_grads(fast, x)
    assert got.logits is None  # the fused loss path never builds logits
    assert rel(got.loss, ref.loss) < FWD_TOL
    assert ref_grads.keys() == got_grads.keys()
    worst = max(rel(got_grads[n], ref_grads[n]) for n in ref_grads)
    assert worst < GRAD_TOL


def test_lora_forward_loss_and_grads_match(lora_pair):
    slow, fast, report = lora_pair
    x = ids(2, 14, seed=2)
    with torch.no_grad():
        assert (
            rel(fast(input_ids=x, use_cache=False).logits, slow(input_ids=x, use_cache=False).logits)
            < FWD_TOL
        )
    ref, ref_grads = forward_and_grads(slow, x)
    got, got_grads = forward_and_grads(fast, x)
    assert rel(got.loss, ref.loss) < FWD_TOL
    lora_names = [n for n in ref_grads if "lora_" in n]
    assert lora_names and set(lora_names) == {n for n in got_grads if "lora_" in n}
    assert max(rel(got_grads[n], ref_grads[n]) for n in lora_names) < GRAD_TOL


def test_num_items_in_batch_sums(pair):
    slow, fast, _ = pair
    x = ids(2, 10, seed=3)
    labels = x.clone()
    labels[0, :4] = -100
    ref = slow(input_ids=x, labels=labels, num_items_in_batch=torch.tensor(11), use_cache=False).loss
    got = fast(input_ids=x, labels=labels, num_items_in_batch=torch.tensor(11), use_cache=False).loss
    assert rel(got, ref) < FWD_TOL


def test_report_lists_modules(arch, pair, lora_pair):
    _, fast, report = pair
    expected = EXPECTED[arch]
    counts = report.counts()
    act = "geglu" if "geglu" in expected else "swiglu"
    assert counts["rms_norm"] == expected["rms_norm"]
    assert counts[act] == expected[act]
    assert counts["attention"] == 2 and counts["rope"] == 2
    assert counts["linear_cross_entropy"] == 1
    assert "lora_linear" not in counts
    assert report.skipped == ()
    assert "model.layers.0.self_attn" in report.modules("attention")
    assert "model.norm" in report.modules("rms_norm")
    assert report_of(fast) is report
    text = str(report)
    assert f"{expected['rms_norm']} rms_norm" in text and "not accelerated: nothing" in text
    lora_report = lora_pair[2]
    assert lora_report.counts()["lora_linear"] == expected["lora"]
    assert all(".lora_" not in m for m in lora_report.modules("lora_linear"))


def packed_inputs(lengths, seed=5):
    seqs = [ids(1, n, seed=seed + i) for i, n in enumerate(lengths)]
    row = torch.cat(seqs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = row.clone()
    start = 0
    for n in lengths:
        labels[0, start] = -100  # the previous sequence's last token must not predict this one
        start += n
    return seqs, row, pos, labels


def test_packed_sequences_match_separate(pair):
    slow, fast, _ = pair
    lengths = [5, 3, 7]
    seqs, row, pos, labels = packed_inputs(lengths)
    with torch.no_grad():
        packed = fast(input_ids=row, position_ids=pos, use_cache=False).logits[0]
        alone = [slow(input_ids=s, use_cache=False).logits[0] for s in seqs]
    assert rel(packed, torch.cat(alone)) < FWD_TOL
    # per-token loss: the packed row's summed loss equals the separate sequences' summed losses
    n_items = sum(n - 1 for n in lengths)
    got = fast(
        input_ids=row, position_ids=pos, labels=labels, num_items_in_batch=n_items, use_cache=False
    ).loss
    ref = sum(slow(input_ids=s, labels=s, use_cache=False).loss * (s.shape[1] - 1) for s in seqs) / n_items
    assert rel(got, ref) < FWD_TOL
    # the data collator's flash-attention kwargs give the same
    cu = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    with torch.no_grad():
        via_cu = fast(
            input_ids=row,
            position_ids=pos,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=7,
            max_length_k=7,
            use_cache=False,
        ).logits[0]
    assert rel(via_cu, torch.cat(alone)) < FWD_TOL


def test_packed_rows_in_a_batch(pair):
    slow, fast, _ = pair
    seqs_a, row_a, pos_a, _ = packed_inputs([4, 6], seed=20)
    seqs_b, row_b, pos_b, _ = packed_inputs([7, 3], seed=30)
    with torch.no_grad():
        packed = fast(
            input_ids=torch.cat([row_a, row_b]), position_ids=torch.cat([pos_a, pos_b]), use_cache=False
        ).logits
        alone_a = torch.cat([slow(input_ids=s, use_cache=False).logits[0] for s in seqs_a])
        alone_b = torch.cat([slow(input_ids=s, use_cache=False).logits[0] for s in seqs_b])
    assert rel(packed[0], alone_a) < FWD_TOL and rel(packed[1], alone_b) < FWD_TOL


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_matches_eager(pair, side):
    slow, fast, _ = pair
    x = ids(2, 12, seed=7)
    mask = torch.ones(2, 12, dtype=torch.long)
    if side == "right":
        mask[1, 8:] = 0
    else:
        mask[1, :5] = 0
    reset_attention_fallbacks()
    with torch.no_grad():
        ref = slow(input_ids=x, attention_mask=mask, use_cache=False).logits
        got = fast(input_ids=x, attention_mask=mask, use_cache=False).logits
    valid = mask.bool()
    assert rel(got[valid], ref[valid]) < FWD_TOL
    assert attention_fallbacks() == {}  # contiguous padding is un-padded, not a fallback


def test_deaccelerate_restores(arch, base):
    model = copy.deepcopy(base)
    modeling = sys.modules[type(model).__module__]
    before = modeling.apply_rotary_pos_emb  # other accelerated models of this family may hold the swap
    accelerate(model)
    assert hasattr(modeling.apply_rotary_pos_emb, "__slipstream_original__")
    assert model.config._attn_implementation == "slipstream"
    assert deaccelerate(model) is True
    assert modeling.apply_rotary_pos_emb is before
    assert model.config._attn_implementation == "eager"
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert report_of(model) is None and deaccelerate(model) is False
    x = ids(1, 9, seed=11)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=x, use_cache=False).logits, base(input_ids=x, use_cache=False).logits
        )
