"""Each op's reference against the module transformers actually runs, forward and every gradient.

fp32: within 1e-6 norm-wise relative of HF (see ``_compare`` for why that bound is tight but safe).
bf16: both evaluated against an fp64 run of HF's module; the reference must be at least as close.
Shapes are small and deliberately odd (non-power-of-two features, GQA, packed sequences).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from slipstream.ops import SPECS
from tests.ops._compare import assert_no_worse, assert_tight

transformers = pytest.importorskip("transformers")
from transformers.activations import ACT2FN  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss, fixed_cross_entropy  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    create_causal_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.gemma2 import modeling_gemma2  # noqa: E402
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm  # noqa: E402

LOW = [torch.bfloat16, torch.float16]
rms_ref, rope_ref, swiglu_ref, geglu_ref, ce_ref, lce_ref, attention_ref = (
    SPECS[n].reference
    for n in ("rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "linear_cross_entropy", "attention"))


def both_precisions(ours, hf, hf64, args, names):
    """fp32 tight against HF; then each low dtype against fp64 truth."""
    assert_tight(ours, hf, [a.float() if _is_float(a) else a for a in args], arg_names=names)
    for dt in LOW:
        low = [a.detach().to(dt).requires_grad_(a.requires_grad) if _is_float(a) else a for a in args]
        assert_no_worse(ours, hf, hf64, low, arg_names=names)


def _is_float(a) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


# ----------------------------------------------------------------------------------------- rms_norm
NORMS = [  # (HF class, slipstream offset, how HF initialises the weight around)
    (LlamaRMSNorm, 0.0, 1.0),
    (Qwen3RMSNorm, 0.0, 1.0),
    (GemmaRMSNorm, 1.0, 0.0),
    (Gemma3RMSNorm, 1.0, 0.0),
]


@pytest.mark.parametrize("cls,offset,center", NORMS, ids=[c[0].__name__ for c in NORMS])
@pytest.mark.parametrize("shape,eps", [((3, 5, 96), 1e-6), ((7, 1000), 1e-5), ((1, 33), 1e-6)])
def test_rms_norm_matches_hf(cls, offset, center, shape, eps):
    h = shape[-1]
    x = (torch.randn(shape) * 3).requires_grad_()
    w = (torch.randn(h) * 0.3 + center).requires_grad_()
    module = cls(h, eps=eps)

    def hf(x, w):
        m = module.to(w.dtype)  # a model loaded in bf16 holds its norm weight in bf16
        return functional_call(m, {"weight": w}, (x,))

    def ours(x, w):
        return rms_ref(x, w, eps, offset)

    both_precisions(ours, hf, hf, (x, w), ("x", "weight"))


def test_rms_norm_llama_bf16_is_one_rounding_closer():
    """Llama rounds x_hat to bf16 then multiplies by w in bf16 (two roundings); ours rounds once."""
    x = torch.randn(64, 512).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(512) * 0.3 + 1).to(torch.bfloat16).requires_grad_()
    module = LlamaRMSNorm(512)
    errs = assert_no_worse(lambda x, w: rms_ref(x, w, 1e-6),
                           lambda x, w: functional_call(module.to(w.dtype), {"weight": w}, (x,)),
                           lambda x, w: functional_call(module.to(w.dtype), {"weight": w}, (x,)),
                           (x, w), arg_names=("x", "weight"))
    assert errs["out0"][0] < errs["out0"][1]


# ----------------------------------------------------------------------------------------- rope
def llama_config(hq: int, hk: int, d: int, rope_parameters: dict | None = None):
    kw = {"rope_parameters": rope_parameters} if rope_parameters else {}
    return transformers.LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hk,
                                    head_dim=d, max_position_embeddings=256, **kw)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("rope_parameters", [None, LLAMA3_ROPE], ids=["default", "llama3"])
@pytest.mark.parametrize("b,hq,hk,s,d", [(2, 6, 2, 13, 16), (1, 4, 4, 7, 64), (3, 5, 1, 1, 8)])
def test_rope_matches_hf(rope_parameters, b, hq, hk, s, d):
    rotary = LlamaRotaryEmbedding(llama_config(hq, hk, d, rope_parameters))
    if rope_parameters:
        assert rotary.rope_type == "llama3"
    # positions with an offset: as in a later chunk of a long sequence
    position_ids = (torch.arange(s) + 40).unsqueeze(0).expand(b, s)
    q = torch.randn(b, hq, s, d).requires_grad_()
    k = torch.randn(b, hk, s, d).requires_grad_()
    for dt in (torch.float32, *LOW):
        cos, sin = rotary(q.to(dt), position_ids)  # HF's tables, in the activations' dtype
        assert cos.dtype == dt and cos.shape == (b, s, d)

        def ours(q, k, cos=cos, sin=sin):
            return rope_ref(q, k, cos, sin)

        def hf(q, k, cos=cos, sin=sin):
            return modeling_llama.apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype))

        qd, kd = (t.detach().to(dt).requires_grad_() for t in (q, k))
        if dt == torch.float32:
            assert_tight(ours, hf, (qd, kd), arg_names=("q", "k"))
        else:
            assert_no_worse(ours, hf, hf, (qd, kd), arg_names=("q", "k"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_packed_table_path_equals_gathered_path(dtype):
    """(P, D) table + packed position_ids == HF's per-token cos/sin from the same position ids."""
    lengths = [5, 1, 9, 3]
    d, hq, hk = 16, 4, 2
    rotary = LlamaRotaryEmbedding(llama_config(hq, hk, d, LLAMA3_ROPE))
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    s = pos.shape[1]
    q = torch.randn(1, hq, s, d, dtype=dtype, requires_grad=True)
    k = torch.randn(1, hk, s, d, dtype=dtype, requires_grad=True)
    cos_tok, sin_tok = rotary(q, pos)  # (1, S, D), what HF's model passes to attention
    cos_tab, sin_tab = rotary(q, torch.arange(max(lengths)).unsqueeze(0))  # (1, P, D)
    got = rope_ref(q, k, cos_tab[0], sin_tab[0], pos)
    want = rope_ref(q, k, cos_tok, sin_tok)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(q, k, cos_tok, sin_tok)
    if dtype == torch.float32:
        assert_tight(lambda q, k: rope_ref(q, k, cos_tab[0], sin_tab[0], pos),
                     lambda q, k: modeling_llama.apply_rotary_pos_emb(q, k, cos_tok, sin_tok), (q, k))
    else:  # bf16: HF rounds q*cos and rotate_half(q)*sin separately; ours rounds once
        torch.testing.assert_close(got[0], hf_q, rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(got[1], hf_k, rtol=1e-2, atol=2e-2)
    # the packed tokens restart at position 0: token 5 (start of the 2nd sequence) is unrotated
    torch.testing.assert_close(got[0][:, :, 5], q[:, :, 5].detach(), rtol=0, atol=0)


def test_rope_batch1_position_ids_broadcast_over_batch():
    rotary = LlamaRotaryEmbedding(llama_config(2, 1, 8))
    q, k = torch.randn(3, 2, 6, 8), torch.randn(3, 1, 6, 8)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    cos_tab, sin_tab = rotary(q, torch.arange(3).unsqueeze(0))
    cos, sin = rotary(q, pos.expand(3, 6))
    got = rope_ref(q, k, cos_tab[0], sin_tab[0], pos)
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- gated MLP
@pytest.mark.parametrize("shape", [(2, 7, 96), (1, 11007), (13, 1)])
def test_swiglu_matches_llama_mlp_act(shape):
    act = ACT2FN[llama_config(2, 2, 8).hidden_act]
    assert llama_config(2, 2, 8).hidden_act == "silu"
    gate = (torch.randn(shape) * 3).requires_grad_()
    up = torch.randn(shape).requires_grad_()
    both_precisions(swiglu_ref, lambda g, u: act(g) * u, lambda g, u: act(g) * u, (gate, up),
                    ("gate", "up"))


@pytest.mark.parametrize("hf_name,approximate", [("gelu", "none"), ("gelu_pytorch_tanh", "tanh")])
@pytest.mark.parametrize("shape", [(3, 5, 40), (1, 1001)])
def test_geglu_matches_hf_act(hf_name, approximate, shape):
    act = ACT2FN[hf_name]
    gate = (torch.randn(shape) * 3).requires_grad_()
    up = torch.randn(shape).requires_grad_()
    both_precisions(lambda g, u: geglu_ref(g, u, approximate), lambda g, u: act(g) * u,
                    lambda g, u: act(g) * u, (gate, up), ("gate", "up"))


def test_gemma_mlp_uses_tanh_geglu():
    cfg = transformers.GemmaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16)
    assert cfg.hidden_act == "gelu_pytorch_tanh"
    mlp = transformers.models.gemma.modeling_gemma.GemmaMLP(cfg)
    x = torch.randn(3, 5, 32)
    got = mlp.down_proj(geglu_ref(mlp.gate_proj(x), mlp.up_proj(x), "tanh"))
    torch.testing.assert_close(got, mlp(x), rtol=1e-6, atol=1e-6)


def test_llama_mlp_equals_swiglu_composition():
    cfg = llama_config(2, 2, 16)
    cfg.intermediate_size = 40
    mlp = modeling_llama.LlamaMLP(cfg)
    x = torch.randn(2, 3, 32)
    got = mlp.down_proj(swiglu_ref(mlp.gate_proj(x), mlp.up_proj(x)))
    torch.testing.assert_close(got, mlp(x), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- cross entropy
def _causal_lm_batch(b: int, t: int, v: int, *, ignore_every: int = 4):
    logits = (torch.randn(b, t, v) * 3).requires_grad_()
    labels = torch.randint(0, v, (b, t))
    labels[:, ::ignore_every] = -100  # e.g. prompt tokens masked out
    return logits, labels


def _shift(labels: torch.Tensor) -> torch.Tensor:
    """What the test does for the op: HF's shift, tokens < n predict n, last position ignored."""
    return F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)


@pytest.mark.parametrize("b,t,v", [(2, 9, 50), (1, 17, 1001), (3, 2, 7)])
def test_cross_entropy_matches_hf_causal_lm_loss(b, t, v):
    logits, labels = _causal_lm_batch(b, t, v)

    def ours(z):
        return ce_ref(z.reshape(-1, v), _shift(labels))

    def hf(z):
        return ForCausalLMLoss(z, labels, vocab_size=v)

    both_precisions(ours, hf, hf, (logits,), ("logits",))


def test_cross_entropy_num_items_in_batch_is_sum_over_n():
    """Gradient accumulation: HF divides the summed loss by the tokens of the whole accumulated batch."""
    b, t, v = 2, 11, 37
    logits, labels = _causal_lm_batch(b, t, v)
    n = torch.tensor(53)  # more than this micro-batch's valid tokens

    def ours(z):
        return ce_ref(z.reshape(-1, v), _shift(labels), reduction="sum") / n

    def hf(z):
        return ForCausalLMLoss(z, labels, vocab_size=v, num_items_in_batch=n)

    both_precisions(ours, hf, hf, (logits,), ("logits",))


def test_cross_entropy_shift_labels_kwarg_and_custom_ignore_index():
    b, t, v = 2, 6, 19
    logits = torch.randn(b, t, v, requires_grad=True)
    shift_labels = torch.randint(0, v, (b, t))
    shift_labels[0, 2] = shift_labels[1, 5] = 3  # ignore_index=3 also drops genuine class-3 targets
    assert_tight(lambda z: ce_ref(z.reshape(-1, v), shift_labels.reshape(-1), ignore_index=3),
                 lambda z: ForCausalLMLoss(z, None, vocab_size=v, ignore_index=3, shift_labels=shift_labels),
                 (logits,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,v", [(13, 50), (1, 3), (6, 3001)])
def test_cross_entropy_matches_torch(reduction, n, v):
    logits = (torch.randn(n, v) * 4).requires_grad_()
    labels = torch.randint(0, v, (n,))
    if n > 1:  # (a batch with every label ignored is its own test: torch gives NaN there)
        labels[n // 2] = -100

    def torch_ce(z):
        return F.cross_entropy(z.float(), labels, ignore_index=-100, reduction=reduction)

    both_precisions(lambda z: ce_ref(z, labels, -100, reduction), torch_ce, torch_ce, (logits,),
                    ("logits",))
    # HF's fixed_cross_entropy is the same call
    torch.testing.assert_close(fixed_cross_entropy(logits.detach(), labels),
                               ce_ref(logits.detach(), labels), rtol=1e-6, atol=1e-6)


def test_cross_entropy_int32_labels_equal_int64():
    logits = torch.randn(9, 40)
    labels = torch.randint(0, 40, (9,))
    labels[3] = -100
    torch.testing.assert_close(ce_ref(logits, labels.int()), ce_ref(logits, labels),
                               rtol=0, atol=0)


@pytest.mark.parametrize("cap", [30.0, 2.5])
def test_cross_entropy_softcap_matches_gemma2_final_logit_softcapping(cap):
    """Gemma2ForCausalLM: logits / cap -> tanh -> * cap, in the model dtype, then the HF loss."""
    b, t, v = 2, 7, 300
    logits, labels = _causal_lm_batch(b, t, v)
    logits = (logits.detach() * 10).requires_grad_()  # well into the cap's saturation for cap=2.5

    def gemma2(z):
        z = torch.tanh(z / cap) * cap
        return ForCausalLMLoss(z, labels, vocab_size=v)

    both_precisions(lambda z: ce_ref(z.reshape(-1, v), _shift(labels), softcap=cap), gemma2,
                    gemma2, (logits,), ("logits",))


def test_cross_entropy_scale_then_softcap_order():
    """``scale`` multiplies the logits before the cap (logit_scale models), then the usual CE."""
    z = torch.randn(5, 64, dtype=torch.float64) * 4
    labels = torch.randint(0, 64, (5,))
    want = F.cross_entropy(7.0 * torch.tanh(z * 0.5 / 7.0), labels)
    torch.testing.assert_close(ce_ref(z, labels, softcap=7.0, scale=0.5), want)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    """Deliberate difference from torch: every label ignored -> loss 0.0 and zero grad, torch gives NaN.

    A packed micro-batch whose tokens are all prompt (masked) must not turn the step's loss into NaN.
    """
    logits = torch.randn(4, 32, requires_grad=True)
    labels = torch.full((4,), -100)
    loss = ce_ref(logits, labels)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.equal(g, torch.zeros_like(g))
    assert torch.isnan(F.cross_entropy(logits, labels, ignore_index=-100))  # what torch / HF would return
    assert ce_ref(logits, labels, reduction="sum").item() == 0.0
    assert torch.equal(ce_ref(logits, labels, reduction="none"), torch.zeros(4))


# ----------------------------------------------------------------------------------------- linear CE
@pytest.mark.parametrize("with_bias,softcap", [(False, None), (True, None), (False, 5.0)])
def test_linear_cross_entropy_matches_lm_head_plus_hf_loss(with_bias, softcap):
    b, t, h, v = 2, 9, 24, 257
    hidden = torch.randn(b, t, h).requires_grad_()
    labels = torch.randint(0, v, (b, t))
    labels[:, ::3] = -100
    lm_head = torch.nn.Linear(h, v, bias=with_bias)
    w = (torch.randn(v, h) * h ** -0.5).requires_grad_()
    args = [hidden, w]
    names = ["hidden", "weight"]
    if with_bias:
        args.append((torch.randn(v) * 0.1).requires_grad_())
        names.append("bias")

    def hf(x, w, bias=None):
        params = {"weight": w} | ({"bias": bias} if bias is not None else {})
        logits = functional_call(lm_head, params, (x,))
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return ForCausalLMLoss(logits, labels, vocab_size=v)

    def ours(x, w, bias=None):
        return lce_ref(x.reshape(-1, h), w, _shift(labels), bias, -100, "mean", softcap)

    both_precisions(ours, hf, hf, args, names)


# ----------------------------------------------------------------------------------------- attention
class _AttnModule(torch.nn.Module):
    """What HF's eager attention reads off its ``module`` argument."""

    def __init__(self, hq: int, hk: int, d: int):
        super().__init__()
        self.num_key_value_groups = hq // hk
        self.head_dim = d
        self.training = False


def _eager(fn, module, mask, scale, **kw):
    def run(q, k, v):
        out, _ = fn(module, q, k, v, mask.to(q.dtype) if mask is not None else None, scaling=scale, **kw)
        return out.transpose(1, 2)  # HF returns (B, S, H, D)

    return run


def _llama_mask(b: int, s: int, dtype: torch.dtype, position_ids=None):
    cfg = llama_config(2, 1, 8)
    cfg._attn_implementation = "eager"
    return create_causal_mask(config=cfg, inputs_embeds=torch.zeros(b, s, 1, dtype=dtype),
                              attention_mask=None, past_key_values=None,
                              position_ids=position_ids if position_ids is not None else
                              torch.arange(s).unsqueeze(0).expand(b, s))


@pytest.mark.parametrize("b,hq,hk,s,d", [(2, 4, 2, 13, 16), (1, 6, 1, 31, 24), (2, 3, 3, 1, 8)])
def test_attention_matches_llama_eager(b, hq, hk, s, d):
    module = _AttnModule(hq, hk, d)
    q = torch.randn(b, hq, s, d, requires_grad=True)
    k = torch.randn(b, hk, s, d, requires_grad=True)
    v = torch.randn(b, hk, s, d, requires_grad=True)
    scale = d ** -0.5
    for dt in (torch.float32, *LOW):
        mask = _llama_mask(b, s, dt)
        mask64 = _llama_mask(b, s, torch.float64)
        hf = _eager(modeling_llama.eager_attention_forward, module, mask, scale)
        hf64 = _eager(modeling_llama.eager_attention_forward, module, mask64, scale)

        def ours(q, k, v):
            return attention_ref(q, k, v, True, None)

        args = tuple(t.detach().to(dt).requires_grad_() for t in (q, k, v))
        if dt == torch.float32:
            assert_tight(ours, hf, args, arg_names=("q", "k", "v"))
        else:
            assert_no_worse(ours, hf, hf64, args, arg_names=("q", "k", "v"))


@pytest.mark.parametrize("window,softcap,s", [(4, 2.0, 19), (1, 50.0, 6), (30, 5.0, 12)])
def test_attention_matches_gemma2_eager_sliding_softcap(window, softcap, s):
    hq, hk, d, b = 4, 2, 16, 2
    cfg = transformers.Gemma2Config(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hk,
                                    head_dim=d, sliding_window=window, attn_logit_softcapping=softcap,
                                    query_pre_attn_scalar=24)
    cfg._attn_implementation = "eager"
    module = _AttnModule(hq, hk, d)
    scale = cfg.query_pre_attn_scalar ** -0.5

    def mask_for(dt):
        return create_sliding_window_causal_mask(config=cfg, inputs_embeds=torch.zeros(b, s, 1, dtype=dt),
                                                 attention_mask=torch.ones(b, s, dtype=torch.long),
                                                 past_key_values=None,
                                                 position_ids=torch.arange(s).unsqueeze(0).expand(b, s))

    q = (torch.randn(b, hq, s, d) * 2).requires_grad_()
    k = (torch.randn(b, hk, s, d) * 2).requires_grad_()
    v = torch.randn(b, hk, s, d).requires_grad_()

    def ours(q, k, v):
        return attention_ref(q, k, v, True, scale, cfg.sliding_window, cfg.attn_logit_softcapping)

    for dt in (torch.float32, *LOW):
        hf = _eager(modeling_gemma2.eager_attention_forward, module, mask_for(dt), scale, softcap=softcap)
        hf64 = _eager(modeling_gemma2.eager_attention_forward, module, mask_for(torch.float64), scale,
                      softcap=softcap)
        args = tuple(t.detach().to(dt).requires_grad_() for t in (q, k, v))
        if dt == torch.float32:
            assert_tight(ours, hf, args, arg_names=("q", "k", "v"))
        else:
            assert_no_worse(ours, hf, hf64, args, arg_names=("q", "k", "v"))


def test_attention_non_causal_window_follows_hf_kernel_convention():
    """Non-causal ``sliding_window=W`` is |i - j| < W: the value HF passes to attention kernels.

    HF's bidirectional mask uses the config's half window ``w`` inclusively (|i - j| <= w) and hands
    kernels ``w + 1`` (ModernBERT; flash's ``window_size=(W-1, W-1)``), so ``W = w + 1`` here.
    """
    from transformers.masking_utils import eager_mask, sliding_window_bidirectional_mask_function

    b, h, s, d, w = 1, 2, 11, 8, 3
    mask = eager_mask(batch_size=b, q_length=s, kv_length=s,
                      mask_function=sliding_window_bidirectional_mask_function(w), dtype=torch.float32)
    module = _AttnModule(h, h, d)
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    assert_tight(lambda q, k, v: attention_ref(q, k, v, False, None, w + 1),
                 _eager(modeling_llama.eager_attention_forward, module, mask, d ** -0.5), (q, k, v))


@pytest.mark.parametrize("b,hq,hk,s,d", [(2, 4, 2, 17, 16), (1, 8, 8, 5, 32)])
def test_attention_matches_torch_sdpa_causal(b, hq, hk, s, d):
    q = torch.randn(b, hq, s, d, requires_grad=True)
    k = torch.randn(b, hk, s, d, requires_grad=True)
    v = torch.randn(b, hk, s, d, requires_grad=True)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    assert_tight(lambda q, k, v: attention_ref(q, k, v), sdpa, (q, k, v), rel=2e-6,
                 arg_names=("q", "k", "v"))
    args = tuple(t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    assert_no_worse(lambda q, k, v: attention_ref(q, k, v), sdpa, sdpa, args,
                    arg_names=("q", "k", "v"))


@pytest.mark.parametrize("lengths,window,softcap",
                         [([5, 1, 13], None, None), ([7, 9], 3, 4.0), ([12], None, None)])
def test_attention_packed_equals_separate_sequences(lengths, window, softcap):
    hq, hk, d = 4, 2, 16
    s = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, hq, s, d, requires_grad=True)
    k = torch.randn(1, hk, s, d, requires_grad=True)
    v = torch.randn(1, hk, s, d, requires_grad=True)

    def packed(q, k, v):
        return attention_ref(q, k, v, True, None, window, softcap, cu)

    def separate(q, k, v):
        outs = [attention_ref(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], True, None, window, softcap)
                for a, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]
        return torch.cat(outs, dim=2)

    assert_tight(packed, separate, (q, k, v), arg_names=("q", "k", "v"))


def test_attention_packed_matches_hf_packed_mask():
    """HF detects packing from position_ids that restart at 0 and masks across sequences."""
    lengths = [4, 6, 1, 5]
    b, hq, hk, d = 1, 4, 2, 8
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    s = pos.shape[1]
    assert find_packed_sequence_indices(pos) is not None
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    module = _AttnModule(hq, hk, d)
    q = torch.randn(b, hq, s, d, requires_grad=True)
    k = torch.randn(b, hk, s, d, requires_grad=True)
    v = torch.randn(b, hk, s, d, requires_grad=True)
    mask = _llama_mask(b, s, torch.float32, pos)
    hf = _eager(modeling_llama.eager_attention_forward, module, mask, d ** -0.5)
    assert_tight(lambda q, k, v: attention_ref(q, k, v, True, None, None, None, cu), hf, (q, k, v),
                 arg_names=("q", "k", "v"))
