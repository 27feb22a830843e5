"""Attention -> ``ops.attention`` through transformers' ``AttentionInterface``.

Two functions are registered under the name ``"slipstream"`` (both public transformers
extension points, present in 5.17 and 5.23):

* ``AttentionInterface.register("slipstream", slipstream_attention)``: what every attention
  module calls, ``(module, query, key, value, attention_mask, dropout, scaling, sliding_window,
  softcap, **kwargs) -> (out (B, S, H, D), None)``;
* ``AttentionMaskInterface.register("slipstream", slipstream_mask)``: what the model calls to
  build masks. It has flash-attention-2 semantics: ``None`` when nothing is padded, else the
  (B, kv_len) boolean padding mask, never an O(S^2) tensor. (Without a registered mask function
  transformers drops the padding mask altogether, so this registration is required.)

The model is switched with ``model.set_attn_implementation("slipstream")`` (falling back to
``config._attn_implementation``); :func:`slipstream.models.deaccelerate` restores the previous one.

What maps onto ``ops.attention`` (no ``repeat_kv``: GQA is native to the op):

* causal (``module.is_causal`` / ``is_causal=``) or bidirectional attention, ``scaling``,
  ``sliding_window`` and ``softcap`` exactly as the module passes them (Gemma 2: window on
  alternating layers, attention-logit soft-cap);
* packed sequences: ``cu_seq_lens_q`` from the data collator, or ``position_ids`` that restart
  (transformers' rule: a step other than +1 starts a sequence) -> ``cu_seqlens`` (int32) over the
  flattened batch, so B > 1 packed rows work too;
* padding: a 2D mask whose valid tokens are contiguous in each row (left or right padding) is
  un-padded into packed sequences; padded positions return zeros (transformers' eager path
  returns garbage-but-finite values there; neither is used by the loss).

What falls back (counted in :func:`attention_fallbacks`, logged once per reason) to the
architecture's own ``eager_attention_forward`` with an explicit additive mask: KV-cache decoding
or prefix caches (query length != key length), attention dropout > 0, ``output_attentions``, a
4D custom mask, a padding mask with holes, and unknown non-``None`` keyword arguments (e.g.
attention sinks). As with flash-attention-2, a 2D mask given together with restarting
``position_ids`` means padding only (transformers' backends disagree here; this follows FA2).

Layouts (``cu_seqlens``, un-padding indices) need one host sync; they are computed once per
forward and cached by the identity and version of the mask / position tensors.
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from slipstream import ops
from slipstream.models.base import Build
from slipstream.train import attention_stash

NAME = "slipstream"
log = logging.getLogger(__name__)

# kwargs transformers threads through to attention functions that don't change its meaning
_HARMLESS = frozenset(
    {
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "use_cache",
        "cache_position",
        "num_items_in_batch",
        "output_hidden_states",
        "return_dict",
        "is_causal",
        "layer_idx",
        "position_embeddings",
        "past_key_values",
        "past_key_value",
        "shift_labels",
        "output_attentions",
        "token_type_ids",
        "target_dtype",
    }
)

_FALLBACKS: Counter = Counter()
_LOGGED: set[str] = set()


def attention_fallbacks() -> dict[str, int]:
    """``{reason: calls}`` for attention calls that ran the eager path instead of ``ops.attention``."""
    return dict(_FALLBACKS)


def reset_attention_fallbacks() -> None:
    _FALLBACKS.clear()
    _LOGGED.clear()


# ----------------------------------------------------------------------------- the mask function
def slipstream_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: object,
) -> torch.Tensor | None:
    """Flash-attention-2 style mask: ``None`` unless something is padded, then the 2D bool mask."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


# ----------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """How (B, S) tokens are laid out for ``ops.attention``.

    ``packed``: tokens are flattened to one row of ``B*S`` (or the kept subset) with ``cu_seqlens``
    boundaries; ``keep``: flat indices of the tokens that take part (un-padding), ``None`` = all.
    """

    packed: bool = False
    cu_seqlens: torch.Tensor | None = None
    keep: torch.Tensor | None = None


PLAIN = Layout()


class _LayoutCache(threading.local):
    def __init__(self) -> None:
        self.entries: OrderedDict = OrderedDict()


_CACHE = _LayoutCache()
_CACHE_SIZE = 4  # full + sliding masks alternate in Gemma 2/3
_PINNED_TENSORS: dict[int, weakref.ref] = {}
_PINNED_LAYOUTS: dict = {}  # never evicted: CUDA graphs captured with these layouts read their tensors


def pin_layouts(tensors: Iterable[torch.Tensor]) -> None:
    """Keep every layout computed from one of ``tensors`` as long as the process runs, in every thread.

    A CUDA graph (:mod:`slipstream.train.graphs`) captured with a packed layout reads its
    ``cu_seqlens`` / ``keep`` tensors on every replay, so they must never be evicted and freed.
    """
    for t in tensors:
        _PINNED_TENSORS[id(t)] = weakref.ref(t)


def _pinned(tensors: tuple) -> bool:
    return any(t is not None and (r := _PINNED_TENSORS.get(id(t))) is not None and r() is t for t in tensors)


def _token(t: torch.Tensor | None) -> tuple:
    return (None,) if t is None else (id(t), t._version)


def layout_for(
    mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    b: int,
    s: int,
) -> Layout | str:
    key = (_token(mask), _token(position_ids), _token(cu_q), _token(cu_k), b, s)
    tensors = (mask, position_ids, cu_q, cu_k)
    hit = _PINNED_LAYOUTS.get(key) or _CACHE.entries.get(key)
    if hit is not None and all(x is y for x, y in zip(hit[0], tensors, strict=True)):
        return hit[1]
    found = compute_layout(mask, position_ids, cu_q, cu_k, b, s)
    if _pinned(tensors):
        _PINNED_LAYOUTS[key] = (tensors, found)
        return found
    _CACHE.entries[key] = (tensors, found)
    while len(_CACHE.entries) > _CACHE_SIZE:
        _CACHE.entries.popitem(last=False)
    return found


def packed_boundaries(position_ids: torch.Tensor, b: int, s: int) -> torch.Tensor | None:
    """(B, S) bool: token starts a sequence (position step != +1, as transformers); ``None``: no packing."""
    pos = position_ids
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    if pos.shape[-1] != s or pos.shape[0] not in (1, b):
        return None
    pos = pos.expand(b, s)
    step = torch.diff(pos, dim=-1)
    if not bool((step != 1).any()):
        return None
    starts = torch.ones(b, s, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = step != 1
    return starts


def compute_layout(
    mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    b: int,
    s: int,
) -> Layout | str:
    if mask is not None:
        if mask.dim() != 2 or tuple(mask.shape) != (b, s):
            return f"attention mask of shape {tuple(mask.shape)} for {b}x{s} tokens"
        valid = mask.bool()
        if bool(valid.all()):
            mask = None
        else:
            v = valid.to(torch.int8)
            runs = (v[:, 1:] > v[:, :-1]).sum(-1) + v[:, 0]
            if bool((runs > 1).any()):
                return "padding mask with holes (valid tokens not contiguous in a row)"
            lengths = v.sum(-1, dtype=torch.int32)
            lengths = lengths[lengths > 0]
            if lengths.numel() == 0:
                return "every token is padding"
            cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=mask.device)
            cu[1:] = lengths.cumsum(0)
            keep = valid.reshape(-1).nonzero().squeeze(1)
            return Layout(True, cu, keep)
    if cu_q is not None:
        if cu_k is not None and not torch.equal(cu_q, cu_k):
            return "cu_seq_lens_q != cu_seq_lens_k"
        if b != 1 or int(cu_q[-1]) != s or int(cu_q[0]) != 0:
            return f"cu_seq_lens_q does not cover one packed row of {s} tokens"
        return Layout(True, cu_q.to(torch.int32), None)
    if position_ids is not None:
        starts = packed_boundaries(position_ids, b, s)
        if starts is not None:
            idx = starts.reshape(-1).nonzero().squeeze(1)
            cu = torch.cat((idx, torch.tensor([b * s], device=idx.device, dtype=idx.dtype))).to(torch.int32)
            return Layout(True, cu, None)
    return PLAIN


# ----------------------------------------------------------------------------- the attention function
def slipstream_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface -> ``ops.attention``; q (B, Hq, S, D), k/v (B, Hk, S, D)."""
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    b, _, s, _ = query.shape
    reason = ""
    if key.shape[2] != s:
        reason = "query and key lengths differ (KV cache / prefix)"
    elif dropout:
        reason = "attention dropout > 0"
    elif kwargs.get("output_attentions"):
        reason = "output_attentions requested"
    elif attention_mask is not None and attention_mask.dim() != 2:
        reason = "a custom 4D attention mask"
    else:
        extra = sorted(k for k, v in kwargs.items() if v is not None and k not in _HARMLESS)
        if extra:
            reason = f"unsupported attention arguments {extra}"
    layout: Layout | str = PLAIN
    if not reason:
        layout = layout_for(
            attention_mask,
            kwargs.get("position_ids"),
            kwargs.get("cu_seq_lens_q"),
            kwargs.get("cu_seq_lens_k"),
            b,
            s,
        )
        if isinstance(layout, str):
            reason = layout
    if reason:
        return fallback(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout,
            scaling,
            sliding_window,
            softcap,
            bool(is_causal),
            reason,
            kwargs,
        )
    window = int(sliding_window) if sliding_window else None
    cap = float(softcap) if softcap else None
    if not layout.packed:
        out = None
        if window is None and cap is None:  # a long sequence's checkpointed layer may keep its output for the recompute
            out = attention_stash.attend(query, key, value, bool(is_causal), scaling)
        if out is None:
            out = ops.attention(query, key, value, bool(is_causal), scaling, window, cap, None)
        return out.transpose(1, 2), None
    return packed_attention(query, key, value, layout, bool(is_causal), scaling, window, cap), None


def _flat(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(B, H, S, D) -> (1, H, N, D) over the flattened (kept) tokens."""
    b, h, s, d = t.shape
    flat = t.transpose(0, 1).reshape(h, b * s, d)
    if keep is not None:
        flat = flat.index_select(1, keep)
    return flat.unsqueeze(0)


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: Layout,
    causal: bool,
    scaling: float | None,
    window: int | None,
    cap: float | None,
) -> torch.Tensor:
    b, h, s, d = query.shape
    out = ops.attention(
        _flat(query, layout.keep),
        _flat(key, layout.keep),
        _flat(value, layout.keep),
        causal,
        scaling,
        window,
        cap,
        layout.cu_seqlens,
    )[0]  # (H, N, D)
    if layout.keep is not None:
        full = out.new_zeros(h, b * s, d)
        out = full.index_copy(1, layout.keep, out)
    return out.reshape(h, b, s, d).permute(1, 2, 0, 3)  # (B, S, H, D)


# ----------------------------------------------------------------------------- fallback
def dense_mask(
    attention_mask: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    causal: bool,
    sliding_window: int | None,
    kwargs: dict,
) -> torch.Tensor:
    """The additive (B, 1, Sq, Skv) mask transformers' eager path expects, from the same information."""
    dtype, device = query.dtype, query.device
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return torch.where(attention_mask, 0.0, torch.finfo(dtype).min).to(dtype)
        return attention_mask
    b, sq, skv = query.shape[0], query.shape[2], key.shape[2]
    i = torch.arange(sq, device=device)[:, None] + (skv - sq)
    j = torch.arange(skv, device=device)[None, :]
    ok = torch.ones(sq, skv, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= i
    if sliding_window:
        ok &= (i - j) < sliding_window
        if not causal:
            ok &= (j - i) < sliding_window
    ok = ok.expand(b, 1, sq, skv)
    if attention_mask is not None:
        ok = ok & attention_mask[:, -skv:].bool()[:, None, None, :]
    elif sq == skv:
        seg = None
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None and b == 1:
            seg = torch.searchsorted(cu[1:].long(), torch.arange(sq, device=device), right=True)[None]
        elif kwargs.get("position_ids") is not None:
            starts = packed_boundaries(kwargs["position_ids"], b, sq)
            seg = None if starts is None else starts.long().cumsum(-1)
        if seg is not None:
            ok = ok & (seg[:, None, :, None] == seg[:, None, None, :])
    return torch.where(ok, 0.0, torch.finfo(dtype).min).to(dtype)


def generic_eager(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    scores = query @ k.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return (weights @ v).transpose(1, 2).contiguous(), weights


def fallback(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None,
    causal: bool,
    reason: str,
    kwargs: dict,
) -> tuple[torch.Tensor, object]:
    _FALLBACKS[reason] += 1
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        log.info("slipstream attention: running the eager path because of %s", reason)
    mask = dense_mask(attention_mask, query, key, causal, sliding_window, kwargs)
    eager = (
        getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None) or generic_eager
    )
    extra = {k: v for k, v in kwargs.items() if k != "is_causal"}
    if softcap is not None:
        extra["softcap"] = softcap
    if sliding_window is not None:
        extra["sliding_window"] = sliding_window
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scale, **extra)


# ----------------------------------------------------------------------------- installing
def register() -> None:
    """Register ``"slipstream"`` with transformers' attention and attention-mask interfaces (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, slipstream_attention)
    AttentionMaskInterface.register(NAME, slipstream_mask)


def set_implementation(model: nn.Module, name: str) -> bool:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(name)
        except (ValueError, ImportError, AttributeError, TypeError) as exc:
            log.debug("set_attn_implementation(%r) failed (%s); setting the config", name, exc)
    if getattr(model.config, "_attn_implementation", None) != name:
        model.config._attn_implementation = name
    return getattr(model.config, "_attn_implementation", None) == name


def apply(build: Build) -> None:
    from slipstream.models.rope import attention_modules

    model = build.model
    modules = attention_modules(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        build.skip("", "attention", "not a transformers model (no config._attn_implementation)")
        return
    if not modules:
        build.skip("", "attention", f"no *Attention modules found in {type(model).__module__}")
        return
    if not build.adapter.attention:
        for m in modules:
            build.skip(
                m,
                "attention",
                f"architecture {type(model).__name__} is not in the adapter table; its "
                f"mask semantics are not verified, kept {config._attn_implementation!r}",
            )
        return
    if any(getattr(config, k, None) is not None for k in ("vision_config", "audio_config")):
        build.skip(
            "", "attention", "multimodal model: image/audio tokens need masks ops.attention can't express"
        )
        return
    register()
    previous = config._attn_implementation
    if not set_implementation(model, NAME):
        build.skip("", "attention", "the model refused attn_implementation='slipstream'")
        return
    build.previous_attn = previous
    for m in modules:
        window = getattr(m, "sliding_window", None)
        cap = getattr(m, "attn_logit_softcapping", None)
        parts = ["GQA native" if getattr(m, "num_key_value_groups", 1) != 1 else "MHA"]
        if window:
            parts.append(f"sliding window {window}")
        if cap:
            parts.append(f"softcap {cap:g}")
        build.ok(m, "attention", ", ".join(parts))
    build.note(
        f"attention: implementation {previous!r} -> 'slipstream' (flash-attention-2 mask semantics; "
        "packing via position_ids / cu_seq_lens_q; contiguous padding un-padded). Runs the eager path "
        "for KV-cache decoding, dropout > 0, output_attentions, 4D masks and padding with holes; see "
        "slipstream.models.attention_fallbacks()"
    )
