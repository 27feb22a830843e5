"""Causal-LM loss -> ``ops.linear_cross_entropy`` on the final hidden states (logits never built).

The transformers model gets an instance-level forward. When it is called with ``labels`` and
gradients are enabled (a training step), it runs the decoder (``model.<base_model_prefix>``) with
the same arguments transformers' ``*ForCausalLM.forward`` would pass, then computes the loss
from the last hidden state and ``lm_head``'s weight (and bias) with
``ops.linear_cross_entropy``, exactly as transformers' ``ForCausalLMLoss`` does:

* labels are shifted (position t predicts token t+1; the last position is ignored), or
  ``shift_labels=`` is used as given;
* ``ignore_index`` -100; ``mean`` over non-ignored tokens, or, with the Trainer's
  ``num_items_in_batch``, ``sum / num_items_in_batch``; a batch whose labels are all ignored
  gives 0 (transformers gives NaN);
* Gemma 2/3's ``final_logit_softcapping`` is the op's ``softcap``.

It returns a ``CausalLMOutputWithPast`` whose **``logits`` is ``None``** (that is the point: the
(tokens x vocab) logits are never materialised in training). Without labels, or with gradients
disabled (evaluation, where metrics may want logits), the model's own forward runs unchanged.

For families in the adapter table the mapping is trusted (their forward is ``lm_head(hidden)``
then the soft-cap). For other transformers models it is *probed* once at accelerate time: an
8-token forward through the original code is compared with ``lm_head(decoder(...)[0])``; if the
architecture post-processes its logits (scales, multipliers) the loss stays on its own path.
Models that are not transformers ``PreTrainedModel`` s keep their loss.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slipstream import ops
from slipstream.models.base import Build, close, eval_mode, instance_forward_reason

LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


@dataclass(frozen=True)
class LossConfig:
    decoder: str
    softcap: float | None
    signature: inspect.Signature
    var_keyword: str | None


def plain_linear(head: object) -> bool:
    return (
        isinstance(head, nn.Linear)
        and type(head).forward is nn.Linear.forward
        and "forward" not in head.__dict__
    )


def causal_lm_loss(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor | None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: object = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    graphs: object | None = None,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` of ``head(hidden)`` without materialising the logits.

    ``graphs``: the model's :class:`slipstream.train.graphs.LayerGraphs`, when its checkpointed
    layers replay from CUDA graphs: a frozen head's loss then replays from a graph in their pool."""
    if shift_labels is None:
        shift_labels = F.pad(labels.to(hidden.device), (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(h.device)
    if target.shape[0] != h.shape[0]:
        raise ValueError(
            f"slipstream loss: {target.shape[0]} labels for {h.shape[0]} hidden states; labels must "
            "have the input's (batch, sequence) shape"
        )
    weight, bias = head.weight, head.bias
    dtype = weight.dtype
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
    if h.dtype != dtype:
        h = h.to(dtype)
    if weight.dtype != dtype:
        weight = weight.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    reduction = "mean" if num_items_in_batch is None else "sum"

    def run(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.linear_cross_entropy(h, weight, target, bias, ignore_index, reduction, softcap, 1.0)

    loss = None
    if graphs is not None and weight is head.weight and bias is head.bias and not weight.requires_grad \
            and (bias is None or not bias.requires_grad):
        loss = graphs.loss(run, h, target, (id(weight), id(bias), ignore_index, reduction, softcap))
    if loss is None:
        loss = run(h, target)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def causal_lm_forward(self: nn.Module, *args: object, **kwargs: object) -> object:
    cfg: LossConfig = self._slipstream
    original = type(self).forward
    head = self.get_output_embeddings()
    if not torch.is_grad_enabled() or not plain_linear(head):
        return original(self, *args, **kwargs)
    try:
        bound = cfg.signature.bind(self, *args, **kwargs)
    except TypeError:
        return original(self, *args, **kwargs)
    arguments = dict(bound.arguments)
    labels = arguments.get("labels")
    if labels is None:
        return original(self, *args, **kwargs)
    del arguments[next(iter(cfg.signature.parameters))]  # self
    extra = dict(arguments.pop(cfg.var_keyword, None) or {}) if cfg.var_keyword else {}
    arguments.pop("labels")
    arguments.pop("logits_to_keep", None)
    arguments.pop("num_logits_to_keep", None)
    return_dict = extra.pop("return_dict", arguments.pop("return_dict", None))
    loss_kwargs = {k: extra.pop(k) for k in LOSS_KWARGS if k in extra}
    outputs = getattr(self, cfg.decoder)(**arguments, **extra)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    loss = causal_lm_loss(hidden, head, labels, softcap=cfg.softcap,
                          graphs=self.__dict__.get("_slipstream_layer_graphs"), **loss_kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    result = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return result if return_dict else result.to_tuple()


def softcap_of(model: nn.Module, attr: str | None) -> float | None:
    if attr is None:
        return None
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, attr, None)
    return float(value) if value else None


def probe(model: nn.Module, decoder: nn.Module, head: nn.Linear) -> tuple[bool, float | None, str]:
    """Is ``model``'s forward ``head(decoder(x)[0])`` (optionally soft-capped)? -> (ok, softcap, why)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or head.weight.shape[0])
    embed = model.get_input_embeddings()
    device = (
        embed.weight.device
        if isinstance(getattr(embed, "weight", None), torch.Tensor)
        else head.weight.device
    )
    if device.type == "meta":
        return False, None, "weights are on the meta device (cannot probe)"
    ids = (torch.arange(8, device=device) * 7 + 1).remainder(vocab).unsqueeze(0)
    try:
        with torch.no_grad(), eval_mode(model):
            out = type(model).forward(model, input_ids=ids, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
            h = decoder(input_ids=ids, use_cache=False)
            h = h.last_hidden_state if hasattr(h, "last_hidden_state") else h[0]
            mine = F.linear(h.to(head.weight.dtype), head.weight, head.bias)
    except Exception as exc:  # noqa: BLE001
        return False, None, f"probe forward failed ({type(exc).__name__}: {exc})"
    caps = [None]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        caps.append(float(cap))
    errs = []
    for c in caps:
        z = mine if c is None else c * torch.tanh(mine / c)
        ok, err = close(z.to(logits.dtype), logits)
        if ok:
            return True, c, ""
        errs.append(err)
    return (
        False,
        None,
        (
            f"its logits are not lm_head(last hidden state) (probe rel err {min(errs):.1e}); "
            "the architecture post-processes them"
        ),
    )


def apply(build: Build) -> None:
    from transformers import PreTrainedModel

    model = build.model
    if not isinstance(model, PreTrainedModel):
        build.skip("", "linear_cross_entropy", "not a transformers PreTrainedModel; its loss is its own code")
        return
    try:
        head = model.get_output_embeddings()
    except Exception:  # noqa: BLE001
        head = None
    prefix = getattr(model, "base_model_prefix", "")
    decoder = getattr(model, prefix, None) if prefix else None
    if not isinstance(decoder, nn.Module) or decoder is model:
        build.skip("", "linear_cross_entropy", f"no decoder at model.{prefix or '<base_model_prefix>'}")
        return
    if not plain_linear(head):
        build.skip(
            "",
            "linear_cross_entropy",
            f"the output layer is {type(head).__name__}, not a plain nn.Linear "
            "(LoRA on lm_head, modules_to_save, or no lm_head)",
        )
        return
    reason = instance_forward_reason(model)
    if reason:
        build.skip("", "linear_cross_entropy", reason)
        return
    if build.adapter.loss:
        softcap = softcap_of(model, build.adapter.final_softcap)
        how = "trusted for this family"
    else:
        ok, softcap, reason = probe(model, decoder, head)
        if not ok:
            build.skip("", "linear_cross_entropy", reason)
            return
        how = "probe-verified: logits == lm_head(hidden)"
    signature = inspect.signature(type(model).forward)
    var_kw = next(
        (p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
    )
    build.set_forward(model, causal_lm_forward, LossConfig(prefix, softcap, signature, var_kw))
    head_name = build.name(head)
    detail = f"{head_name} weight, {how}" + (f", final softcap {softcap:g}" if softcap else "")
    build.ok(head_name, "linear_cross_entropy", detail)
    build.note(
        "loss: with labels and grad enabled the output's logits is None (the causal-LM loss is computed by "
        "ops.linear_cross_entropy from the final hidden states); without labels or under no_grad the "
        "model's own forward runs"
    )
