"""LoRA projections sharing an input run as one ``lora_linear_group`` call (q/k/v lazily, gate/up in the MLP).

Groups on vs off are compared on tiny Llama and Qwen2 models (Qwen2: biases on q/k/v) in fp32.
With the ops forced to their references (this package's conftest) the group's reference is the
per-projection reference, so the forward is bit-identical and only autograd's accumulation order of
``dX`` differs: losses within ``1e-6`` and LoRA gradients within ``1e-5`` norm-wise (a few fp32 ulps
over a 2-layer model). With the backends' fused group entry (``cublas`` base: plain torch GEMMs,
no interpreter) summation order differs too: the package's fp32 tolerances (``FWD_TOL`` 1e-5,
``GRAD_TOL`` 1e-4) apply.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import slipstream.ops as ops
from slipstream.dispatch import forced
from slipstream.models import accelerate, deaccelerate, report_of
from slipstream.models import lora_groups as groups
from slipstream.train.offload import apply_checkpointing
from tests.models.tiny import FWD_TOL, GRAD_TOL, build, ids, rel, with_lora

LOSS_TOL, LORA_GRAD_TOL = 1e-6, 1e-5


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}


def pair(arch: str) -> tuple[nn.Module, nn.Module]:
    """The same LoRA model twice: accelerated with groups, and without."""
    model = with_lora(build(arch))
    on, off = copy.deepcopy(model), copy.deepcopy(model)
    accelerate(on)
    accelerate(off, lora_groups=False)
    return on, off


def train_steps(model: nn.Module, steps: int = 3, seed: int = 0) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A few AdamW steps on fixed batches; the losses and the last step's LoRA gradients."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        x = ids(2, 11, seed=seed + step)
        opt.zero_grad()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        losses.append(float(loss.detach()))
        grads = lora_grads(model)
        opt.step()
    return losses, grads


def assert_same_training(on: nn.Module, off: nn.Module, loss_tol: float, grad_tol: float) -> None:
    l_on, g_on = train_steps(on)
    l_off, g_off = train_steps(off)
    assert all(abs(a - b) <= loss_tol * abs(b) for a, b in zip(l_on, l_off, strict=True)), (l_on, l_off)
    assert g_on.keys() == g_off.keys() and g_on
    worst = max(rel(g_on[n], g_off[n]) for n in g_off)
    assert worst <= grad_tol, worst


class Spy:
    """Counts calls of ``ops.lora_linear`` and ``ops.lora_linear_group`` (looked up at call time)."""

    def __init__(self, monkeypatch):
        self.calls = {"lora_linear": 0, "lora_linear_group": 0}
        self.outputs: list[weakref.ref] = []
        for name in self.calls:
            real = getattr(ops, name)

            def spy(*args, _real=real, _name=name, **kwargs):
                self.calls[_name] += 1
                out = _real(*args, **kwargs)
                if _name == "lora_linear_group":
                    self.outputs += [weakref.ref(o) for o in out]
                return out

            monkeypatch.setattr(ops, name, spy)


# ----------------------------------------------------------------------------- real models
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_groups_train_like_separate_projections(arch, monkeypatch):
    on, off = pair(arch)
    report = report_of(on)
    assert [g.detail for g in report.groups] == ["q_proj+k_proj+v_proj grouped", "gate_proj+up_proj grouped"] * 2
    assert "lora_linear_group: 2 x q_proj+k_proj+v_proj grouped, 2 x gate_proj+up_proj grouped" in str(report)
    assert report.counts() == report_of(off).counts()  # the layers are still lora_linear mappings
    assert not report_of(off).groups and any("groups off" in n for n in report_of(off).notes)
    spy = Spy(monkeypatch)
    x = ids(1, 7)
    on(input_ids=x, labels=x).loss.backward()
    # per layer: one q/k/v group and one gate/up group; o_proj and down_proj alone
    assert spy.calls == {"lora_linear_group": 4, "lora_linear": 4}
    attn = on.base_model.model.model.layers[0].self_attn
    group = attn.__dict__[groups.ATTR]
    assert group.hits == 2 and group.misses == 0 and group.stashes == [None] * 3 and group.depth == 0
    spy.calls.update(dict.fromkeys(spy.calls, 0))
    off(input_ids=x, labels=x).loss.backward()
    assert spy.calls == {"lora_linear_group": 0, "lora_linear": 14}
    on.zero_grad()
    assert_same_training(on, off, LOSS_TOL, LORA_GRAD_TOL)


def test_fused_group_entry_trains_like_separate_projections():
    """The backends' group entry (one x @ cat(A).T, one dX LoRA GEMM), not only its reference."""
    pytest.importorskip("slipstream_nvidia", reason="the Triton kernels are registered by a backend package")
    on, off = pair("qwen2")
    with forced("lora_linear_group", "nvidia.lora_linear_group"), forced("lora_linear", "nvidia.lora_linear"):
        assert_same_training(on, off, FWD_TOL, GRAD_TOL)


def test_env_opt_out(monkeypatch):
    monkeypatch.setenv(groups.ENV, "0")
    report = accelerate(with_lora(build("llama")))
    assert not report.groups and any(groups.ENV in n for n in report.notes)
    monkeypatch.setenv(groups.ENV, "1")
    assert accelerate(with_lora(build("llama")), lora_groups=False).groups == ()


@pytest.mark.parametrize("policy", [True, "lean", "offload"])
def test_checkpointing_policies(policy):
    on, off = pair("llama")
    for model in (on, off):
        apply_checkpointing(model, policy, force_offload=True, verbose=False)
    assert_same_training(on, off, LOSS_TOL, LORA_GRAD_TOL)
    group = on.base_model.model.model.layers[1].self_attn.__dict__[groups.ATTR]
    assert group.misses == 0 and group.stashes == [None] * 3 and group.depth == 0


def test_eval_no_grad_inference_and_disabled_adapters():
    on, off = pair("qwen2")
    x = ids(2, 8, seed=3)
    on.eval()
    off.eval()
    with torch.no_grad():
        assert torch.equal(on(input_ids=x).logits, off(input_ids=x).logits)
        with on.disable_adapter(), off.disable_adapter():
            assert torch.equal(on(input_ids=x).logits, off(input_ids=x).logits)
    on.merge_adapter()
    off.merge_adapter()
    with torch.no_grad():
        assert rel(on(input_ids=x).logits, off(input_ids=x).logits) < FWD_TOL


def test_deepcopy_and_deaccelerate():
    on, _ = pair("llama")
    twin = copy.deepcopy(on)
    attn, twin_attn = (m.base_model.model.model.layers[0].self_attn for m in (on, twin))
    assert twin_attn.__dict__[groups.ATTR].layers[0] is twin_attn.q_proj  # the copy groups its own layers
    x = ids(1, 6)
    with torch.no_grad():
        assert torch.equal(twin(input_ids=x).logits, on(input_ids=x).logits)
    assert deaccelerate(twin)
    assert groups.ATTR not in twin_attn.__dict__ and not twin_attn._forward_hooks and not twin_attn._forward_pre_hooks
    assert groups.ATTR in attn.__dict__ and len(attn._forward_hooks) == 1  # the original keeps its hooks
    assert deaccelerate(on) and not attn._forward_hooks and not attn._forward_pre_hooks


# ----------------------------------------------------------------------------- the lazy stash
class Attn(nn.Module):
    """q/k/v called like transformers' attention; ``mode`` varies what k_proj and v_proj get."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.mode = "same"

    def forward(self, h: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        h = h * 1.0  # a non-leaf: may be modified in place
        if self.mode == "k first":
            k = self.k_proj(h)
            return torch.cat((self.q_proj(h), k, self.v_proj(h)), dim=-1)
        q = self.q_proj(h)
        if self.mode == "q only":
            return q
        if self.mode == "bumped":
            h.add_(0.0)  # same values, new version: the stash must not be trusted
        k = self.k_proj(other if self.mode == "other" else h)
        v = self.v_proj(h)
        return torch.cat((q, k, v), dim=-1)


def attn_pair(targets=("q_proj", "k_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    slow = get_peft_model(Attn(), LoraConfig(r=4, target_modules=list(targets), lora_dropout=0.0,
                                              init_lora_weights=False))
    fast = copy.deepcopy(slow)
    report = accelerate(fast)
    assert [g.detail for g in report.groups] == ["+".join(targets) + " grouped"]
    return slow, fast, fast.base_model.model.__dict__[groups.ATTR]


def test_peft_default_targets_group_q_and_v(monkeypatch):
    """peft's default Llama targets (q_proj, v_proj): a pair around the plain k_proj."""
    slow, fast, group = attn_pair(("q_proj", "v_proj"))
    spy = Spy(monkeypatch)
    h = torch.randn(5, 16, requires_grad=True)
    assert rel(fast(h), slow(h)) < FWD_TOL
    assert spy.calls == {"lora_linear_group": 1, "lora_linear": 0} and (group.hits, group.misses) == (1, 0)


@pytest.mark.parametrize("mode,hits,misses", [("same", 2, 0), ("other", 1, 1), ("bumped", 0, 2), ("q only", 0, 0),
                                              ("k first", 2, 0)])
def test_stash_falls_back_and_keeps_nothing_alive(mode, hits, misses, monkeypatch):
    slow, fast, group = attn_pair()
    spy = Spy(monkeypatch)
    for model in (slow, fast):
        model.base_model.model.mode = mode
    # an in-place change of h after q_proj saved it can't be backpropagated (by peft either): no_grad there
    grad = mode != "bumped"
    h, other = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)
    with torch.set_grad_enabled(grad):
        ref = slow(h, other)
        out = fast(h, other)
    h_ref = weakref.ref(h)
    gc.collect()
    unused = {"same": [], "other": [1], "bumped": [1, 2], "q only": [1, 2], "k first": []}[mode]  # never served
    assert all(spy.outputs[i]() is None for i in unused), "an unused stash outlived the parent's forward"
    assert spy.calls["lora_linear_group"] == 1
    assert (group.hits, group.misses) == (hits, misses)
    assert group.stashes == [None] * 3 and group.depth == 0  # nothing stashed after the parent's forward
    assert rel(out, ref) < FWD_TOL
    if grad:
        ref.square().sum().backward()
        out.square().sum().backward()
        g_ref = {n: p.grad for n, p in slow.named_parameters() if p.grad is not None}
        g_got = {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}
        assert g_got.keys() == g_ref.keys() and max(rel(g_got[n], g_ref[n]) for n in g_ref) < GRAD_TOL
    del out, h, ref
    gc.collect()
    assert all(r() is None for r in spy.outputs), "a group output outlived its use"
    assert h_ref() is None, "the stash kept its input alive"


def test_eval_no_grad_and_inference_mode_on_the_stash(monkeypatch):
    slow, fast, group = attn_pair()
    spy = Spy(monkeypatch)
    h = torch.randn(4, 16)
    with torch.no_grad():
        assert rel(fast(h), slow(h)) < FWD_TOL
    assert (spy.calls["lora_linear_group"], group.hits) == (1, 2)
    with torch.inference_mode():  # inference tensors have no version counter: no group, each layer alone
        assert rel(fast(h), slow(h)) < FWD_TOL
    assert (spy.calls["lora_linear_group"], group.hits, group.misses) == (1, 2, 0)


def test_no_group_outside_the_parents_forward_or_under_no_grad_mismatch(monkeypatch):
    slow, fast, group = attn_pair()
    spy = Spy(monkeypatch)
    h = torch.randn(2, 16)
    inner = fast.base_model.model
    q = inner.q_proj(h)  # called directly: not inside Attn.forward, so no group and no stash
    assert spy.calls == {"lora_linear_group": 0, "lora_linear": 1} and group.stashes == [None] * 3
    assert rel(q, slow.base_model.model.q_proj(h)) < FWD_TOL
    # a stash made with grad enabled is not served to a call under no_grad (another autograd context)
    group.depth = 1
    try:
        inner.q_proj(h)
        assert group.stashes[1] is not None
        with torch.no_grad():
            inner.k_proj(h)
        assert group.misses == 1 and group.stashes[1] is None
    finally:
        group.depth = 0
        group.clear()
