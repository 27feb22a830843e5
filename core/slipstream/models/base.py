"""The adapter registry, the acceleration report, and :func:`accelerate` / :func:`deaccelerate`.

An :class:`Adapter` describes one architecture family (which ``config.model_type`` values it
covers, the RMSNorm form it expects, whether its attention, rotary embedding and loss may be
routed through slipstream's ops). :func:`accelerate` looks the model's family up, then maps
modules to ops in independent passes (``norms``, ``mlp``, ``rope``, ``attention``, ``lora``,
``loss``). Every change is recorded structurally (which instance forwards are ours, the previous
attention implementation, which rotary swaps this model holds), so :func:`deaccelerate` restores
the model exactly, also on a ``copy.deepcopy`` of an accelerated model (the copy takes its own
reference on the rotary swap). Architectures not in the table get the ``generic`` adapter: only mappings
that can be checked structurally and numerically (RMSNorm-like modules, gated MLPs, peft LoRA
layers, and the loss after a logits probe) are applied; the rest is listed in the report.

Every module-level mapping is *verified* when it is installed: the replacement, computed with
the op's *reference* (its meaning; which kernel runs it later is the dispatcher's business, so
no tuning happens at probe shapes), is run next to the module's own forward on a small random
input (no global RNG state is consumed), and the mapping is only kept if they agree within the
dtype's tolerance. A future transformers release that changes a formula therefore degrades to
"not accelerated because ...", never to a silently different model.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

#: The ops a mapping can use, in the order reports list them.
OPS = ("rms_norm", "attention", "rope", "swiglu", "geglu", "lora_linear", "lora_linear_group",
       "linear_cross_entropy")

STATE_ATTR = "_slipstream_state"


# ----------------------------------------------------------------------------- the adapter table
@dataclass(frozen=True)
class Adapter:
    """How one architecture family maps onto slipstream's ops.

    Attributes:
        name: family name shown in reports (``"llama"``).
        model_types: the ``config.model_type`` values this adapter covers.
        norm_offset: the RMSNorm form expected (``0.0``: ``w * x / rms``, ``1.0``: Gemma's
            ``(1 + w) * x / rms``); ``None``: unknown, the probe decides.
        attention: route attention through the ``"slipstream"`` attention function. Only for
            families whose attention masks are fully described by causal + sliding window +
            padding + packing (what flash-attention-2 also assumes).
        rope: route ``apply_rotary_pos_emb`` of the family's modeling module through ``ops.rope``.
        loss: the family's logits are ``lm_head(last_hidden_state)`` (then ``final_softcap``), so
            the causal-LM loss may use ``ops.linear_cross_entropy`` without a logits probe.
        final_softcap: config attribute holding the final logit soft-cap (Gemma 2/3).
        mlp_output_to_residual: the decoder layer adds the MLP's output straight into the residual
            stream (no norm after it, as Gemma 2/3 have). Then, when a checkpointed layer is
            recomputed in backward, the MLP's down projection output is never read and its base
            GEMM is skipped (:mod:`slipstream.ops.hints`). Unknown architectures: ``False``.
        notes: what is special about the family, for the report.
    """

    name: str
    model_types: tuple[str, ...]
    norm_offset: float | None = 0.0
    attention: bool = True
    rope: bool = True
    loss: bool = True
    final_softcap: str | None = None
    mlp_output_to_residual: bool = False
    notes: str = ""


GENERIC = Adapter(
    "generic",
    (),
    norm_offset=None,
    attention=False,
    rope=False,
    loss=False,
    notes="architecture not in the adapter table: structural, probe-verified mappings only",
)

_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter, *, replace: bool = False) -> Adapter:
    """Add ``adapter`` for each of its ``model_types``; ``replace=True`` overrides an existing one."""
    for model_type in adapter.model_types:
        if model_type in _ADAPTERS and not replace and _ADAPTERS[model_type] != adapter:
            raise ValueError(
                f"model_type {model_type!r} already has adapter {_ADAPTERS[model_type].name!r}; "
                f"pass replace=True to override it"
            )
        _ADAPTERS[model_type] = adapter
    return adapter


def adapters() -> dict[str, Adapter]:
    """``{model_type: Adapter}`` for every registered family."""
    return dict(_ADAPTERS)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (a transformers model, unwrapped), or :data:`GENERIC`."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return _ADAPTERS.get(model_type, GENERIC) if isinstance(model_type, str) else GENERIC


# ----------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class Mapping:
    """One module routed through one op. ``module`` is its name inside the transformers model."""

    module: str
    op: str
    detail: str = ""


@dataclass(frozen=True)
class Skipped:
    """One module (or model-level feature) left on its original code path, and why."""

    module: str
    op: str
    reason: str


@dataclass(frozen=True)
class AccelerationReport:
    """What :func:`accelerate` did to a model.

    ``accelerated`` lists every module and the op it now uses; ``skipped`` every candidate that
    kept its original forward, with the reason; ``notes`` model-level facts (runtime fallbacks,
    the loss path returning ``logits=None``). ``groups`` lists the parent modules whose LoRA
    projections run as one ``lora_linear_group`` call (detail: ``"q_proj+k_proj+v_proj grouped"``);
    those projections stay in ``accelerated`` as ``lora_linear`` layers. ``str(report)`` is a
    readable summary.
    """

    model: str
    adapter: str
    accelerated: tuple[Mapping, ...]
    skipped: tuple[Skipped, ...] = ()
    notes: tuple[str, ...] = ()
    groups: tuple[Mapping, ...] = ()

    def counts(self) -> dict[str, int]:
        """``{op: number of modules using it}`` in :data:`OPS` order."""
        c = Counter(m.op for m in self.accelerated)
        return {op: c[op] for op in (*OPS, *sorted(set(c) - set(OPS))) if c[op]}

    def modules(self, op: str) -> list[str]:
        """Names of the modules routed through ``op``."""
        return [m.module for m in self.accelerated if m.op == op]

    def skipped_for(self, op: str) -> list[Skipped]:
        return [s for s in self.skipped if s.op == op]

    def __str__(self) -> str:
        counts = self.counts()
        done = ", ".join(f"{n} {op}" for op, n in counts.items()) or "nothing"
        lines = [f"slipstream: {self.model} (adapter: {self.adapter})", f"  accelerated: {done}"]
        if self.groups:
            kinds = Counter(g.detail for g in self.groups)
            lines.append("  lora_linear_group: " + ", ".join(f"{n} x {d}" for d, n in kinds.items()))
        if self.skipped:
            groups: dict[tuple[str, str], list[str]] = {}
            for s in self.skipped:
                groups.setdefault((s.op, s.reason), []).append(s.module or "<model>")
            lines.append("  not accelerated:")
            for (op, reason), names in groups.items():
                example = names[0] if len(names) == 1 else f"{names[0]}, ..."
                lines.append(f"    {len(names)} {op} ({example}) because {reason}")
        else:
            lines.append("  not accelerated: nothing")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- building
class Build:
    """The state of one :func:`accelerate` call: the model, its adapter, findings, what to undo."""

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        self.model = model
        self.adapter = adapter
        self.names = {id(m): n for n, m in model.named_modules()}
        self.accelerated: list[Mapping] = []
        self.skipped: list[Skipped] = []
        self.notes: list[str] = []
        self.groups: list[Mapping] = []
        self.previous_attn: str | None = None  # set when the attention implementation was switched
        self.patches: list = []  # rotary swaps (rope._Patch) this model holds a reference on

    def name(self, module: nn.Module) -> str:
        return self.names.get(id(module), type(module).__name__)

    def ok(self, module: nn.Module | str, op: str, detail: str = "") -> None:
        name = module if isinstance(module, str) else self.name(module)
        self.accelerated.append(Mapping(name, op, detail))

    def skip(self, module: nn.Module | str, op: str, reason: str) -> None:
        name = module if isinstance(module, str) else self.name(module)
        self.skipped.append(Skipped(name, op, reason))

    def group(self, module: nn.Module, detail: str) -> None:
        """Record that ``module``'s LoRA projections run as one ``lora_linear_group`` call."""
        self.groups.append(Mapping(self.name(module), "lora_linear_group", detail))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def set_forward(self, module: nn.Module, fn: Callable, config: object) -> None:
        """Install ``fn`` (a plain function taking ``self``) as ``module``'s instance forward.

        ``config`` is stored as ``module._slipstream`` for ``fn`` to read. Bound with
        :class:`types.MethodType` so ``copy.deepcopy`` rebinds it to the copy.
        """
        _FORWARDS.add(fn)
        object.__setattr__(module, "_slipstream", config)
        module.forward = types.MethodType(fn, module)

    def state(self) -> State:
        return State(self.report(), self.previous_attn, list(self.patches))

    def report(self) -> AccelerationReport:
        return AccelerationReport(
            type(self.model).__name__,
            self.adapter.name,
            tuple(self.accelerated),
            tuple(self.skipped),
            tuple(self.notes),
            tuple(self.groups),
        )


def instance_forward_reason(module: nn.Module) -> str:
    """Why ``module``'s forward can't be replaced, or ``""``: someone else already replaced it."""
    if "forward" in module.__dict__:
        return (
            "the module already has an instance-level forward (e.g. accelerate's device hooks); "
            "replacing it would drop that wrapper"
        )
    return ""


_FORWARDS: set[Callable] = set()  # every function ever installed as an instance forward


@dataclass
class State:
    """What :func:`deaccelerate` needs besides the instance forwards it finds by scanning."""

    report: AccelerationReport
    previous_attn: str | None = None
    patches: list = field(default_factory=list)

    def __deepcopy__(self, memo: dict) -> State:
        from slipstream.models.rope import acquire

        return State(self.report, self.previous_attn, [acquire(p.module) for p in self.patches])


def release_all(patches: list) -> None:
    from slipstream.models.rope import release

    while patches:
        release(patches.pop())


def undo(model: nn.Module, state: State) -> None:
    """Remove every slipstream instance forward under ``model``, restore attention, release rotary swaps."""
    from slipstream.models import lora, lora_groups
    from slipstream.models.attention import set_implementation

    lora_groups.undo(model)
    lora.remove_step_hook(model)
    for m in model.modules():
        if getattr(m.__dict__.get("forward"), "__func__", None) in _FORWARDS:
            del m.__dict__["forward"]
            m.__dict__.pop("_slipstream", None)
    if state.previous_attn is not None:
        set_implementation(model, state.previous_attn)
    release_all(state.patches)


# ----------------------------------------------------------------------------- probes
PROBE_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def probe_input(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int = 0
) -> torch.Tensor:
    """A deterministic random tensor that leaves the global RNG untouched."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def close(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    """Norm-wise relative error of ``out`` against ``ref`` within the probe tolerance of ``ref``'s dtype."""
    if out.shape != ref.shape:
        return False, float("inf")
    diff = (out.double() - ref.double()).norm().item()
    err = diff / max(ref.double().norm().item(), 1e-30)
    if not torch.isfinite(out).all() and torch.isfinite(ref).all():
        return False, float("inf")
    return err <= PROBE_TOLERANCE.get(ref.dtype, 1e-4), err


def float_dtype(module: nn.Module) -> torch.dtype:
    """The activation dtype a module most likely runs in: its first floating non-LoRA parameter's."""
    fallback = None
    for name, p in module.named_parameters():
        if p.is_floating_point():
            if "lora_" not in name:
                return p.dtype
            fallback = fallback or p.dtype
    return fallback or torch.get_default_dtype()


def module_device(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put ``module`` (and its children) in eval mode, restoring each flag after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# ----------------------------------------------------------------------------- entry points
def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (or ``model`` itself)."""
    get_base = getattr(type(model), "get_base_model", None)
    if get_base is not None and type(model).__module__.startswith("peft."):
        return model.get_base_model()
    return model


def accelerate(
    model: nn.Module,
    *,
    attention: bool = True,
    loss: bool = True,
    lora: bool = True,
    norm: bool = True,
    rope: bool = True,
    mlp: bool = True,
    lora_groups: bool | None = None,
) -> AccelerationReport:
    """Route ``model``'s hot modules through slipstream's ops; returns what was mapped and what wasn't.

    ``model`` is a transformers causal LM, optionally wrapped by peft's ``PeftModel``, or any
    ``nn.Module`` (only structural mappings apply then). Calling it again re-applies from
    scratch (do so after adding LoRA adapters). :func:`deaccelerate` undoes everything.

    Args:
        attention: set the attention implementation to ``"slipstream"`` (``ops.attention``).
        loss: with ``labels`` and grad enabled, compute the loss with ``ops.linear_cross_entropy``
            from the final hidden states; the output's ``logits`` is then ``None``.
        lora: route peft LoRA ``Linear`` / ``Linear4bit`` layers through ``ops.lora_linear``.
        norm, rope, mlp: RMSNorm modules, rotary embedding, and gated-MLP activations.
        lora_groups: run accelerated LoRA projections that share their input (q/k/v, gate/up) as one
            ``ops.lora_linear_group`` call (:mod:`slipstream.models.lora_groups`); ``None``: the
            ``SLIPSTREAM_LORA_GROUPS`` environment variable (default on).
    """
    from slipstream.models import attention as attention_pass
    from slipstream.models import lora as lora_pass
    from slipstream.models import lora_groups as groups_pass
    from slipstream.models import loss as loss_pass
    from slipstream.models import mlp as mlp_pass
    from slipstream.models import norms as norm_pass
    from slipstream.models import rope as rope_pass

    hf = unwrap(model)
    deaccelerate(hf)
    build = Build(hf, adapter_for(hf))
    if build.adapter.notes:
        build.note(f"{build.adapter.name}: {build.adapter.notes}")
    passes = [
        (norm, norm_pass.apply),
        (mlp, mlp_pass.apply),
        (rope, rope_pass.apply),
        (attention, attention_pass.apply),
        (lora, lora_pass.apply),
        (lora, lambda b: groups_pass.apply(b, groups_pass.enabled(lora_groups))),
        (loss, loss_pass.apply),
    ]
    try:
        for enabled, run in passes:
            if enabled:
                run(build)
    except BaseException:
        undo(hf, build.state())
        raise
    state = build.state()
    object.__setattr__(hf, STATE_ATTR, state)
    if state.patches:  # a model dropped without deaccelerate() still gives its rotary references back
        weakref.finalize(hf, release_all, state.patches)
    return state.report


def deaccelerate(model: nn.Module) -> bool:
    """Undo :func:`accelerate` on ``model`` (or the model inside a ``PeftModel``); ``False`` if it wasn't."""
    hf = unwrap(model)
    state = hf.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return False
    undo(hf, state)
    return True


def report_of(model: nn.Module) -> AccelerationReport | None:
    """The report of the acceleration currently applied to ``model``, or ``None``."""
    state = unwrap(model).__dict__.get(STATE_ATTR)
    return None if state is None else state.report
