"""What users would run instead of slipstream, each behind the op's own signature.

Every function here takes the op's canonical positional arguments (the reference's signature),
so the harness times, verifies and compares them exactly like slipstream's candidates:

* ``torch.compile`` of the op's reference (mode default, ``dynamic=False``): :func:`static_compiled`.
* Liger-Kernel (``liger_kernel.transformers.functional``, the API its HF patches call) for
  rms_norm, rope, swiglu, geglu (tanh form only), cross_entropy and linear_cross_entropy:
  :func:`liger`. Liger not installed -> ``"n/a"``.
* peft's LoRA layer (``lora.Linear`` over ``nn.Linear``; ``lora.bnb.Linear4bit`` over a
  bitsandbytes ``Linear4bit`` for NF4 weights): :class:`PeftLoRA`.
* the base GEMM alone (``x @ W.T`` forward + dX backward, no LoRA): :func:`base_gemm`, the
  ceiling-like reference for lora_linear (not the op, so never verified nor ranked).
* torch SDPA with its default backend choice (what HF's ``attn_implementation="sdpa"`` runs): :func:`sdpa`.

A peer that can't run a case returns a reason string instead of a function; the harness reports
it as ``n/a: <reason>``.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

Maybe = Callable | str  # a function with the op's signature, or why there is none


# ----------------------------------------------------------------------------- versions
def dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of everything a reader needs to reproduce the numbers (``None``: not installed)."""
    out: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip}
    for name in ("triton", "transformers", "peft", "liger-kernel", "bitsandbytes", "flash-attn", "slipstream",
                 "slipstream-nvidia", "slipstream-rocm", "slipstream-xpu"):
        out[name] = dist_version(name)
    return out


# ----------------------------------------------------------------------------- torch.compile
def static_compiled(reference: Callable) -> Callable:
    """``torch.compile(reference, dynamic=False)`` on a private copy of the function.

    Dynamo caches compiled graphs per *code object*; the dispatcher's own compiled candidate
    (``reference.<op>.compiled``, ``dynamic=True``) compiles the same function. A copy with its
    own code object keeps the two caches apart, so this really is the static-shape compile.
    """
    code = reference.__code__.replace(co_name=f"{reference.__name__}_static_compile")
    copy = types.FunctionType(code, reference.__globals__, code.co_name, reference.__defaults__,
                              reference.__closure__)
    copy.__kwdefaults__ = reference.__kwdefaults__
    copy.__doc__ = reference.__doc__
    return torch.compile(copy, dynamic=False)


# ----------------------------------------------------------------------------- Liger-Kernel
LIGER_OPS = ("rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "linear_cross_entropy")


def liger_module(device: torch.device) -> types.ModuleType | str:
    """``liger_kernel.transformers.functional``, or why it can't be used here."""
    if device.type not in ("cuda", "xpu"):
        return f"Liger-Kernel needs a GPU (device is {device.type})"
    try:
        return importlib.import_module("liger_kernel.transformers.functional")
    except Exception as exc:  # noqa: BLE001 - missing or broken: n/a, never fatal
        return f"liger_kernel not importable ({type(exc).__name__}: {str(exc)[:120]})"


def _as_dtype(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The reference's loss dtype (fp32 for 16-bit logits): a scalar cast, so the dtype check compares values."""
    wide = torch.promote_types(like.dtype, torch.float32)
    return out if out.dtype == wide else out.to(wide)


def liger(op: str, args: tuple, device: torch.device) -> Maybe:
    """Liger's implementation of ``op`` taking the op's arguments, or why there is none."""
    if op not in LIGER_OPS:
        return {"lora_linear": "Liger-Kernel has no LoRA op", "lora_linear_group": "Liger-Kernel has no LoRA op",
                "attention": "Liger-Kernel has no attention op"}.get(
            op, f"Liger-Kernel has no {op}")
    lf = liger_module(device)
    if isinstance(lf, str):
        return lf
    if op == "rms_norm":
        def rms_norm(x, weight, eps=1e-6, offset=0.0):
            # HF's patch: "llama" casting for Llama-style norms, "gemma" (all fp32) for the (1 + w) form
            return lf.liger_rms_norm(x, weight, eps, offset=offset, casting_mode="gemma" if offset else "llama",
                                     in_place=False)
        return rms_norm
    if op == "rope":
        def rope(q, k, cos, sin, position_ids=None):
            if position_ids is not None:  # Liger takes per-token cos/sin, as HF's rotary embedding returns them
                cos, sin = cos[position_ids], sin[position_ids]
            return lf.liger_rope(q, k, cos, sin)
        return rope
    if op == "swiglu":
        return lambda gate, up: lf.liger_swiglu(gate, up)
    if op == "geglu":
        if args[2] != "tanh":
            return "Liger's GELUMul is the tanh approximation only"
        return lambda gate, up, approximate="tanh": lf.liger_geglu(gate, up)
    if op == "cross_entropy":
        if args[5] != 1.0:
            return "Liger's cross entropy has no logit scale"

        def cross_entropy(logits, labels, ignore_index=-100, reduction="mean", softcap=None, scale=1.0):
            out = lf.liger_cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction,
                                         softcap=softcap)
            return _as_dtype(out, logits)
        return cross_entropy
    if op == "linear_cross_entropy":
        if args[7] != 1.0:
            return "Liger's fused linear cross entropy has no logit scale"

        def linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean",
                                 softcap=None, scale=1.0):
            out = lf.liger_fused_linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                                      reduction=reduction, softcap=softcap)
            return _as_dtype(out, hidden)
        return linear_cross_entropy
    return f"no Liger adapter for {op}"


# ----------------------------------------------------------------------------- peft LoRA
class _Wrap(torch.nn.Module):
    def __init__(self, proj: torch.nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _bind(module: torch.nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """Make ``module.<name>`` be ``tensor`` itself (not a copy), so autograd reaches the caller's tensor.

    The parameter is dropped from ``_parameters`` and the tensor set as a plain attribute: cheaper
    per call than ``torch.func.functional_call`` (a few microseconds matter for a 0.2 ms GEMM).
    """
    module._parameters.pop(name, None)
    object.__setattr__(module, name, tensor)


def bnb_linear4bit(weight) -> torch.nn.Module:
    """A bitsandbytes ``Linear4bit`` holding exactly ``weight``'s codes (a slipstream ``QuantizedWeight``)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    n, k = weight.shape
    state2 = None
    if weight.double_quant:
        state2 = QuantState(absmax=weight.nested_absmax, code=weight.nested_code, blocksize=weight.nested_blocksize,
                            dtype=torch.float32)
    qs = QuantState(absmax=weight.absmax, shape=torch.Size((n, k)), code=weight.code, blocksize=weight.blocksize,
                    quant_type=weight.quant_type, dtype=weight.dtype, offset=None if state2 is None else
                    torch.tensor(weight.nested_offset, device=weight.device), state2=state2)
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=weight.dtype, compress_statistics=weight.double_quant,
                            quant_type=weight.quant_type, device="meta")
    lin.weight = bnb.nn.Params4bit(weight.packed.reshape(-1, 1), requires_grad=False, quant_state=qs,
                                   blocksize=weight.blocksize, compress_statistics=weight.double_quant,
                                   quant_type=weight.quant_type, bnb_quantized=True, module=lin)
    return lin


class PeftLoRA:
    """peft's LoRA layer as an ``lora_linear`` implementation.

    The layer is built once per base weight the way users get it (``get_peft_model`` with a
    ``LoraConfig``, dropout 0): ``lora.Linear`` over ``nn.Linear`` for a dense weight,
    ``lora.bnb.Linear4bit`` over a bitsandbytes ``Linear4bit`` (same NF4 codes and scales) for
    a ``QuantizedWeight``. The call's A, B (and dense W / bias) are bound into the layer as the
    very tensors passed, so gradients reach them and every system computes on identical values.
    """

    def __init__(self) -> None:
        self._layers: dict[int, tuple[object, torch.nn.Module, bool]] = {}

    def layer(self, weight, lora_a: torch.Tensor, with_bias: bool) -> tuple[torch.nn.Module, bool]:
        """The peft layer for this base weight (built on first use) and whether it is 4-bit."""
        hit = self._layers.get(id(weight))
        if hit is not None and hit[0] is weight:
            return hit[1], hit[2]
        import peft

        from slipstream.quant import QuantizedWeight

        n, k = weight.shape
        r = lora_a.shape[0]
        quantized = isinstance(weight, QuantizedWeight)
        if quantized:
            base = bnb_linear4bit(weight)
            if with_bias:
                base.bias = torch.nn.Parameter(torch.zeros(n, device=weight.device, dtype=weight.dtype))
        else:
            base = torch.nn.Linear(k, n, bias=with_bias, device="meta", dtype=weight.dtype)
            # a frozen Parameter sharing the weight's storage (peft looks for parameters while
            # building); each call then binds the caller's tensor itself
            base.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
            if with_bias:
                base.bias = torch.nn.Parameter(torch.zeros(n, device=weight.device, dtype=weight.dtype))
        model = _Wrap(base)
        if quantized:
            model.is_loaded_in_4bit = True  # what transformers sets on a bnb-4bit model; peft dispatches on it
        cfg = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["proj"], bias="none")
        layer = peft.get_peft_model(model, cfg).base_model.model.proj
        if len(self._layers) > 16:
            self._layers.clear()
        self._layers[id(weight)] = (weight, layer, quantized)
        return layer, quantized

    def __call__(self, x, weight, lora_a, lora_b, scaling, bias=None):
        layer, quantized = self.layer(weight, lora_a, bias is not None)
        _bind(layer.lora_A["default"], "weight", lora_a)
        _bind(layer.lora_B["default"], "weight", lora_b)
        layer.scaling["default"] = scaling
        base = layer.base_layer
        if bias is not None:
            _bind(base, "bias", bias)
        if not quantized:
            _bind(base, "weight", weight)
        return layer(x)


def peft_lora(device: torch.device, args: tuple) -> Maybe:
    try:
        importlib.import_module("peft")
    except Exception as exc:  # noqa: BLE001
        return f"peft not importable ({type(exc).__name__}: {str(exc)[:120]})"
    from slipstream.quant import QuantizedWeight

    if isinstance(args[1], QuantizedWeight):
        try:
            importlib.import_module("bitsandbytes")
        except Exception as exc:  # noqa: BLE001
            return f"bitsandbytes not importable for peft's Linear4bit ({type(exc).__name__}: {str(exc)[:120]})"
    return PeftLoRA()


# ----------------------------------------------------------------------------- base GEMM, SDPA
def base_gemm(args: tuple) -> Callable:
    """``x @ W.T`` alone (dense W in x's dtype; an NF4 weight is dequantised once, outside the timing)."""
    from slipstream.quant import QuantizedWeight

    weight = args[1]
    dense = weight.dequantize(args[0].dtype) if isinstance(weight, QuantizedWeight) else weight.detach()

    def gemm(x, weight, lora_a, lora_b, scaling, bias=None):
        return F.linear(x, dense)

    return gemm


def sdpa(args: tuple) -> Maybe:
    q, k, v, causal, scale, window, softcap, cu = args
    if window is not None or softcap is not None or cu is not None:
        return "torch SDPA has no sliding window, softcap or packed sequences"

    def attention(q, k, v, causal=True, scale=None, sliding_window=None, softcap=None, cu_seqlens=None):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])

    return attention
