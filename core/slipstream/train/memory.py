"""The memory planner: pick the fastest gradient-checkpointing policy whose activations fit.

Policies, fastest first: ``none`` (keep every activation), ``lean`` (keep the GEMM outputs,
recompute the cheap elementwise ones in backward: :mod:`slipstream.train.recompute`, 3-5 % of
the step time for about a third of the memory on the H100), ``partial`` (checkpoint only as many decoder layers as
needed to fit, keep the rest's activations leanly: each checkpointed layer costs one recomputed
forward, so fewer is faster), ``checkpoint`` (keep each decoder layer's input, recompute every
layer in backward), ``offload`` (checkpointing with the layer inputs held in pinned host memory).
The planner is a pure function of the model's shape, the batch, the dtype and the free memory, so
its decisions are testable without the hardware. Measured on an H100 (W8B, bf16, 2 x 2048) under a
23.4 GiB cap: ``partial`` with 17 of 32 layers checkpointed and the other 15 lean, 21.8 GiB peak,
12,486 tok/s (before ``lean``: 24 checkpointed, 21.2 GiB, 10,714 tok/s; fully checkpointed 9,881).

Activation estimate for one decoder layer of a Llama-style model (LoRA adapters, frozen base,
``lora_dropout = 0``, memory-efficient attention), with ``T = batch * seq`` tokens and ``b`` bytes
per element of the compute dtype::

    per_layer = T * b * (4*H + 2*Q + 2*KV + 4*I + 7*r)  +  T * 4 * (2 + heads)

where ``H`` is the hidden size, ``Q = heads * head_dim``, ``KV = kv_heads * head_dim``, ``I`` the MLP
width and ``r`` the LoRA rank. The terms are the tensors autograd saves: the two RMSNorms' inputs
and outputs (4H), q and k after RoPE, v, and the attention output (2Q + 2KV), the MLP's gate, up,
act(gate) and act(gate)*up (4I; 3I when the MLP runs our gated op, which saves only gate and up
and recomputes act(gate) in backward), each LoRA's ``x @ A.T`` (7r), and fp32 per-row statistics
(two RMSNorm ``rstd`` and the attention log-sum-exp per head). Eager attention also keeps the
``heads x seq x seq`` scores and probabilities: ``+ batch * heads * seq^2 * 2b``. ``lean`` takes
off the elements per token it recomputes instead (``2H + I`` for a Llama layer whose norms and MLP
slipstream maps; counted on the model by :func:`lean_elements`).

Device memory needed per policy (``L`` layers)::

    none:       L * per_layer                  + fixed
    lean:       L * lean_layer                 + fixed   (lean_layer = per_layer - T*b*lean_elements)
    partial(k): max((L-k) * lean_layer, per_layer) + k * T*H*b + fixed   (the first k of L layers
                checkpointed; their recompute happens after the later layers' activations were freed)
    checkpoint: L * T*H*b  + per_layer         + fixed   (inputs kept; one layer recomputed at a time)
    offload:    2 * T*H*b  + lean_layer        + fixed   (host holds L * T*H*b, pinned; the recompute is lean)
    fixed = logits + trainable state = T * V * (b + 8) + trainable_params * 12 + workspace
    workspace = max(reserve, T * b * (3*I + 2*H + Q + 2*KV))

(logits in the compute dtype plus their fp32 copy and gradient; fp32 grad + two AdamW moments per
trainable parameter; the workspace: a fixed reserve for cuBLAS/cuDNN workspaces and fragmentation,
or, when more, the transients one layer needs on top of what is kept: in backward the gradients of
gate, up and act(gate)*up, of the layer input and of q, k, v; in a lean forward the outputs that
are dropped after it. At 2 x 2048 tokens that is 0.47 GB, under the reserve; at 131k tokens it is
15 GB, and without it the planner sent a 131k-token NF4 step into an out-of-memory error on the H100.
The GPU reserve is 512 MiB: at W8B's peak, the first backward of a lean layer, the transients
measured 0.47 GiB (the gated op's two input gradients, dX, the graph statics;
``benchmarks/train/memory_breakdown.py``), and every kept tensor within 1 % of the estimate; the
768 MiB the reserve was before over-counted by 0.3 GiB.)
A policy fits when its need is at most ``headroom`` of the free memory measured after the model was
loaded: :data:`HEADROOM` (90 %) of the device's free memory, or :data:`CAPPED_HEADROOM` (95 %) of
what a user's cap (``max_memory_gib``: the whole process, weights included) leaves after loading
when that is the smaller. Under a cap the margin is only for the estimate's error (W8B bf16 under
23.4 GiB, 17 layers checkpointed: 7.60 GiB estimated, 7.43 measured at the peak); without one it
also keeps room for the allocator's fragmentation and whatever else shares the device.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from slipstream.train.attention_stash import kept_bytes_per_layer

POLICIES = ("none", "lean", "partial", "checkpoint", "offload")
GRAPHED = ("lean", "partial", "checkpoint", "offload")  # the policies whose layers CUDA graphs replay
GRAPH_POOL_FACTOR = 0.75  # pool measured / estimated (H100, W8B bf16: 590 MiB for 817 MiB of layer temporaries)
LEAN_GRAPH_FACTOR = 0.45  # the lean layers' graph pool slack, in workspaces (H100, W8B bf16: 0.20 GiB)
GIB = 2**30
HEADROOM = 0.9  # of the device's free memory
CAPPED_HEADROOM = 0.95  # of what a user's max_memory_gib leaves, where that binds
RESERVE_BYTES = {"cpu": 256 * 2**20}
RESERVE_DEFAULT = 512 * 2**20  # GPUs: see the module docstring


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    attn_implementation: str = "sdpa"

    @classmethod
    def from_config(cls, config: object) -> ModelShape:
        text = getattr(config, "get_text_config", lambda: config)()
        hidden = int(text.hidden_size)
        heads = int(getattr(text, "num_attention_heads", 1))
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        return cls(
            layers=int(text.num_hidden_layers), hidden=hidden,
            intermediate=int(getattr(text, "intermediate_size", 4 * hidden) or 4 * hidden),
            heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=head_dim,
            vocab=int(text.vocab_size),
            attn_implementation=str(getattr(config, "_attn_implementation", None) or "sdpa"),
        )


@dataclass(frozen=True)
class MemoryPlan:
    """The planner's choice and the numbers behind it (bytes)."""

    choice: str
    reason: str
    per_layer_bytes: int
    need_bytes: dict[str, int]
    free_bytes: int
    budget_bytes: int
    host_free_bytes: int | None
    host_need_bytes: int
    device_type: str
    tokens: int
    extra: dict = field(default_factory=dict)
    checkpointed_layers: int | None = None  # decoder layers checkpointed: 0 (none, lean), k (partial), all (others)
    lean: bool = False  # the layers that are not checkpointed recompute their cheap outputs
    graphs: bool = False  # checkpointed layers replay from CUDA graphs (their memory is in the needs)
    stash_layers: int = 0  # offloaded layers that keep their attention output for the recompute at a time

    def describe(self) -> str:
        what = self.choice
        if self.choice == "partial":
            what = f"partial ({self.checkpointed_layers} of {self.extra.get('layers', '?')} layers checkpointed"
            what += ", the others lean)" if self.lean else ")"
        if self.graphs:
            what += " with CUDA graphs"
        if self.stash_layers:
            what += (f", attention outputs kept for the recompute in {self.stash_layers} layers "
                     f"({self.extra.get('stash_bytes', 0) / GIB:.2f} GiB of the spare memory)")
        return f"gradient checkpointing: {what} because {self.reason}"

    @property
    def checkpointing(self) -> bool | str:
        """The value for ``get_peft_model(gradient_checkpointing=...)`` (``partial`` -> True, see ``apply``)."""
        return {"none": False, "lean": "lean", "partial": True, "checkpoint": True, "offload": "offload"}[self.choice]

    def apply(self, model: torch.nn.Module, *, verbose: bool = True) -> str:
        """Set this plan's policy on ``model``'s decoder layers; returns the policy applied."""
        from slipstream.train.offload import apply_checkpointing

        layers = self.checkpointed_layers if self.choice == "partial" else None
        return apply_checkpointing(model, self.checkpointing, layers=layers, lean=self.lean, verbose=verbose,
                                   graphs=self.graphs, stash_layers=self.stash_layers)


def layer_activation_bytes(shape: ModelShape, batch: int, seq: int, dtype_bytes: int,
                           lora_r: int = 16, *, gated_op: bool = False, lean_elements: int = 0) -> int:
    """Bytes autograd keeps for one decoder layer without checkpointing (see the module docstring).

    ``gated_op``: the MLP runs slipstream's gated op (3I saved, not 4I). ``lean_elements``: elements
    per token that lean activations recompute instead of keeping (0: not lean).
    """
    t = batch * seq
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    mlp = (3 if gated_op else 4) * shape.intermediate
    per = t * dtype_bytes * (4 * shape.hidden + 2 * q + 2 * kv + mlp + 7 * lora_r - lean_elements)
    per += t * 4 * (2 + shape.heads)
    if shape.attn_implementation == "eager":
        per += batch * shape.heads * seq * seq * 2 * dtype_bytes
    return per


def plan(shape: ModelShape, *, batch: int, seq: int, dtype_bytes: int, free_bytes: int,
         host_free_bytes: int | None = None, device_type: str = "cuda", lora_r: int = 16,
         trainable_params: int = 0, fused_loss: bool = False, headroom: float = HEADROOM,
         gated_op: bool = False, lean_elements: int = 0, graphs: bool = False,
         lean_graphs: bool = True) -> MemoryPlan:
    """Choose a policy: the first of none, lean, partial, checkpoint, offload whose need fits the budget.

    ``partial`` checkpoints the fewest layers that make the rest fit. ``lean`` is a candidate only
    when ``lean_elements`` (per token and layer) is positive; ``partial`` then keeps its other layers
    leanly. On the CPU there is nothing to offload to: ``offload`` is never chosen there. When
    nothing fits, the least memory-hungry policy available is chosen and the reason says so.
    ``graphs``: layers may replay from CUDA graphs, which adds to those policies' needs (see
    :func:`graph_bytes`; lean layers too unless ``lean_graphs`` is false: :func:`lean_graph_bytes`).
    They are used when the policy chosen without them also fits with them (a partial plan may then
    checkpoint more layers); otherwise the plan goes without graphs rather than to a policy that
    recomputes more.
    """
    args = dict(batch=batch, seq=seq, dtype_bytes=dtype_bytes, free_bytes=free_bytes,
                host_free_bytes=host_free_bytes, device_type=device_type, lora_r=lora_r,
                trainable_params=trainable_params, fused_loss=fused_loss, headroom=headroom, gated_op=gated_op,
                lean_elements=lean_elements, lean_graphs=lean_graphs)
    plain = _plan_one(shape, graphs=False, **args)
    if not graphs or plain.choice not in GRAPHED:
        return plain
    graphed = _plan_one(shape, graphs=True, **args)
    if graphed.choice == plain.choice and graphed.extra["fits"]:
        return graphed
    extra = graphed.extra["graph_bytes"]
    return dataclasses.replace(plain, reason=plain.reason + f" (without CUDA graphs: they would need "
                                                           f"{extra / GIB:.2f} GiB more)")


def _plan_one(shape: ModelShape, *, batch: int, seq: int, dtype_bytes: int, free_bytes: int,
              host_free_bytes: int | None, device_type: str, lora_r: int, trainable_params: int,
              fused_loss: bool, headroom: float, gated_op: bool, lean_elements: int, graphs: bool,
              lean_graphs: bool) -> MemoryPlan:

    t = batch * seq
    per_layer = layer_activation_bytes(shape, batch, seq, dtype_bytes, lora_r, gated_op=gated_op)
    kept_layer = layer_activation_bytes(shape, batch, seq, dtype_bytes, lora_r, gated_op=gated_op,
                                        lean_elements=lean_elements)
    layer_input = t * shape.hidden * dtype_bytes
    logits = 0 if fused_loss else t * shape.vocab * (dtype_bytes + 8)
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    workspace = t * dtype_bytes * (3 * shape.intermediate + 2 * shape.hidden + q + 2 * kv)
    fixed = logits + trainable_params * 12 + max(RESERVE_BYTES.get(device_type, RESERVE_DEFAULT), workspace)
    budget = int(free_bytes * headroom)
    n = shape.layers

    graph_extra = graph_bytes(kept_layer, workspace, layer_input, trainable_params) if graphs else 0
    lean_extra = lean_graph_bytes(workspace) if graphs and lean_graphs and lean_elements > 0 else 0

    def partial_need(k: int) -> int:
        # the peak is at the end of the forward, or while a checkpointed layer is recomputed (by then
        # the kept layers' activations are freed): the latter only matters for very long sequences
        return (max((n - k) * kept_layer, per_layer) + k * layer_input + fixed + (graph_extra if k else 0)
                + (lean_extra if k < n else 0))

    saved_per_layer = kept_layer - layer_input
    over = partial_need(0) + graph_extra - budget
    k = max(1, -(-over // saved_per_layer)) if saved_per_layer > 0 else n
    need = {
        "none": n * per_layer + fixed,
        "checkpoint": n * layer_input + per_layer + fixed + graph_extra,
        "offload": 2 * layer_input + kept_layer + fixed + graph_extra,  # the recompute runs lean
    }
    if lean_elements > 0:
        need["lean"] = n * kept_layer + fixed + (graph_extra + lean_extra if lean_extra else 0)
    if k < n:
        need["partial"] = partial_need(k)
    need = {p: need[p] for p in POLICIES if p in need}
    host_need = n * layer_input
    candidates = [p for p in POLICIES if p in need and not (p == "offload" and device_type == "cpu")]
    if host_free_bytes is not None and host_need > host_free_bytes * headroom and "offload" in candidates:
        candidates.remove("offload")

    def gib(nbytes: int) -> str:
        return f"{nbytes / GIB:.2f} GiB"

    fits = True
    for choice in candidates:
        if need[choice] <= budget:
            if choice == "none":
                reason = f"all activations fit: {gib(need['none'])} needed of {gib(budget)} usable"
            elif choice == "lean":
                reason = (f"keeping every layer's activations would need {gib(need['none'])} but {gib(budget)} is "
                          f"usable; recomputing the cheap elementwise outputs needs {gib(need['lean'])}")
            elif choice == "partial":
                reason = (f"keeping every layer's activations would need {gib(need['none'])} but {gib(budget)} is "
                          f"usable; checkpointing {k} of {n} layers needs {gib(need['partial'])}")
            else:
                faster = candidates[candidates.index(choice) - 1]
                reason = (f"{faster} would need {gib(need[faster])} but {gib(budget)} is usable; "
                          f"{choice} needs {gib(need[choice])}")
            break
    else:
        choice, fits = candidates[-1], False
        reason = (f"nothing fits: even {choice} needs {gib(need[choice])} of {gib(budget)} usable; "
                  f"lower the batch size or max_seq_length")
        if device_type == "cpu":
            reason += " (offloading does not apply on the CPU)"
    # offload without graphs: spare memory keeps attention outputs for the recompute (long sequences)
    stash = 0
    per_stash = kept_bytes_per_layer(t, shape.heads, shape.head_dim, dtype_bytes)
    if choice == "offload" and fits and not graphs and device_type == "cuda" and shape.attn_implementation != "eager":
        stash = int(min(n, max(0, budget - need[choice]) // per_stash))
    return MemoryPlan(choice, reason, per_layer, need, free_bytes, budget, host_free_bytes, host_need,
                      device_type, t,
                      {"fixed_bytes": fixed, "logits_bytes": logits, "layer_input_bytes": layer_input, "layers": n,
                       "lean_layer_bytes": kept_layer, "workspace_bytes": workspace,
                       "graph_bytes": graph_extra + (lean_extra if choice in ("lean", "partial") else 0),
                       "fits": fits, "stash_bytes": stash * per_stash},
                      stash_layers=stash,
                      checkpointed_layers={"none": 0, "lean": 0, "partial": k}.get(choice, n),
                      lean=choice in ("lean", "partial") and lean_elements > 0,
                      graphs=graphs and choice in GRAPHED and (choice != "lean" or lean_extra > 0))


def graph_bytes(kept_layer: int, workspace: int, layer_input: int, trainable_params: int) -> int:
    """Device memory CUDA graphs of checkpointed layers hold for the whole run (bytes).

    Their shared pool keeps one layer's recompute + backward temporaries (a lean layer plus the
    backward workspace, times :data:`GRAPH_POOL_FACTOR` measured on the H100: the pool is sized
    to the measured peak, and the gated op's backward writes over its inputs) and three static
    layer-sized buffers (input, incoming gradient, result; the loss graph reuses them). Parameter
    gradients are handed out per replay, as without graphs: ``trainable_params`` costs nothing here.
    """
    del trainable_params
    return int(GRAPH_POOL_FACTOR * (kept_layer + workspace)) + 3 * layer_input


def lean_graph_bytes(workspace: int) -> int:
    """What replaying lean layers from CUDA graphs adds to the step's peak (bytes).

    Their forward graphs keep one lean forward's temporaries in a pool of their own: W8B bf16 on the
    H100, the graph pools' idle bytes went from 0.545 to 0.742 GiB, :data:`LEAN_GRAPH_FACTOR`
    workspaces. The transients of a lean layer's backward move from the allocator into the graphs'
    pools at the same time, so the measured peak hardly moved (18 layers checkpointed: 22.16 GiB,
    against ~22.23 eager), but only the gross slack is safe to count. What lean layers keep for
    backward is held all the time, and the peak holds all of it anyway.
    """
    return int(LEAN_GRAPH_FACTOR * workspace)


def host_free_bytes() -> int | None:
    """Available host RAM (psutil if installed, else sysconf)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_free_bytes(device: torch.device) -> int:
    """Free memory on ``device`` now (host RAM for the CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    xpu = getattr(torch, "xpu", None)
    if device.type == "xpu" and xpu is not None and hasattr(xpu, "mem_get_info"):
        free, _total = xpu.mem_get_info(device)
        return int(free)
    return host_free_bytes() or 0


def plan_for_model(model: torch.nn.Module, *, batch: int, seq: int, free_bytes: int | None = None,
                   lora_r: int | None = None, max_memory_gib: float | None = None,
                   graphs: bool | None = None) -> MemoryPlan:
    """Plan for a loaded (peft) model: reads its config, device, dtype, rank and trainable size.

    ``max_memory_gib`` caps the whole process's device memory (weights included, GiB): the planner
    then budgets :data:`CAPPED_HEADROOM` of what the cap leaves after what is already allocated, if
    that is less than free (else :data:`HEADROOM` of the free memory).
    ``graphs``: whether checkpointed layers use CUDA graphs (``None``: where the device has them,
    see :func:`slipstream.train.graphs.enabled_for`).
    """
    from slipstream.train.graphs import enabled_for

    param = next(model.parameters())
    device = param.device
    if free_bytes is None:
        free_bytes = device_free_bytes(device)
    headroom = HEADROOM
    if max_memory_gib is not None:
        if max_memory_gib <= 0:
            raise ValueError(f"max_memory_gib must be positive, got {max_memory_gib}")
        left = max(0, int(max_memory_gib * GIB) - allocated_bytes(model, device))
        if left < free_bytes:
            free_bytes, headroom = left, CAPPED_HEADROOM
    dtype = _compute_dtype(model)
    config = model.config
    peft_config = getattr(model, "peft_config", None)
    if lora_r is None:
        lora_r = next(iter(peft_config.values())).r if peft_config else 16
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    graphs = enabled_for(device, graphs)
    from slipstream.train.fast_model import uses_fused_loss
    from slipstream.train.lean_graphs import lean_graphs_enabled

    gated, lean = lean_elements(model)
    return plan(ModelShape.from_config(config), batch=batch, seq=seq, dtype_bytes=dtype.itemsize,
                free_bytes=free_bytes,
                host_free_bytes=host_free_bytes(), device_type=device.type, lora_r=lora_r,
                trainable_params=trainable, fused_loss=uses_fused_loss(model), gated_op=gated,
                lean_elements=lean, graphs=graphs, lean_graphs=lean_graphs_enabled(), headroom=headroom)


def lean_elements(model: torch.nn.Module) -> tuple[bool, int]:
    """``(gated_op, elements)`` for the model's first decoder layer: whether its MLP runs slipstream's
    gated op, and the elements per token lean activations recompute there instead of keeping: the
    outputs of the hidden-size RMSNorms that feed a projection (at most two: Gemma 2/3's post-norms
    feed the residual add, which saves nothing; Qwen3's per-head q/k norms feed RoPE, which saves
    nothing either) and of the gated MLPs slipstream mapped (``I`` each)."""
    from slipstream.models.mlp import MlpConfig, in_features
    from slipstream.models.norms import NormConfig
    from slipstream.train.offload import checkpoint_layers

    layers = checkpoint_layers(model)
    if not layers:
        return False, 0
    gated, elements, norm_widths = False, 0, []
    for module in layers[0].modules():
        cfg = getattr(module, "_slipstream", None)
        if isinstance(cfg, NormConfig):
            norm_widths.append(int(module.weight.shape[0]))
        elif isinstance(cfg, MlpConfig):
            down = in_features(module.down_proj)
            if down:
                gated = True
                elements += int(down)
    if norm_widths:
        hidden = max(norm_widths)
        elements += hidden * min(2, norm_widths.count(hidden))
    return gated, elements


def allocated_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Device memory in use now: the allocator's count on CUDA, else the model's parameters and buffers."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    for name, p in model.named_parameters():
        if p.is_floating_point() and "lora_" not in name:
            return p.dtype
    return torch.float32


__all__ = ["POLICIES", "MemoryPlan", "ModelShape", "allocated_bytes", "device_free_bytes", "host_free_bytes",
           "layer_activation_bytes", "lean_elements", "plan", "plan_for_model"]
