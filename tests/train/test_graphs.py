"""CUDA graphs for checkpointed layers: the parts that run without a GPU (what a call's key holds,
when a call can't be graphed, the gradient hand-over protocol, the memory planner's share, pinned
attention layouts). Capture and replay themselves are tested on the GPU (tests/train/test_gpu.py)."""

from __future__ import annotations

import functools

import torch

from slipstream.models import attention as attn
from slipstream.train import graphs as g
from slipstream.train.memory import ModelShape, lean_graph_bytes, plan
from slipstream.train.offload import OffloadedCheckpoint, apply_checkpointing, checkpoint_layers
from tests.train.conftest import load_tiny


def recorded_calls(model, ids) -> list:
    """The (function, hidden) pairs transformers hands the checkpointing function, one per layer."""
    calls = []

    def record(function, *args):
        calls.append((function, args[0]))
        return function(*args)

    for layer in checkpoint_layers(model):
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = record
    model.train()
    model(input_ids=ids, use_cache=False)
    return calls


def test_enabled_only_on_cuda_and_switchable(monkeypatch):
    assert not g.enabled_for(torch.device("cpu"))
    assert not g.enabled_for(torch.device("cpu"), True)
    assert not g.enabled_for(torch.device("cuda"), False)
    monkeypatch.setenv("SLIPSTREAM_CUDA_GRAPHS", "0")
    assert not g.enabled_for(torch.device("cuda"))


def test_layer_of_both_transformers_partials():
    layer = torch.nn.Linear(2, 2)
    assert g.layer_of(functools.partial(torch.nn.Linear.forward, layer)) is layer  # transformers >= 5.2x
    assert g.layer_of(functools.partial(layer.__call__, x=1)) is layer  # earlier releases
    assert g.layer_of(lambda x: x) is None
    assert g.layer_of(functools.partial(print, 1)) is None


def test_dropout_blocks_graphs():
    block = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    assert "p=0.1" in g.dropout_in(block.train())
    assert g.dropout_in(block.eval()) == ""
    assert g.dropout_in(torch.nn.Sequential(torch.nn.Dropout(0.0)).train()) == ""
    attention = torch.nn.Module()
    attention.attention_dropout = 0.2
    assert "attention_dropout" in g.dropout_in(attention.train())


def test_key_follows_shapes_and_arguments(tiny_dir):
    model, _ = load_tiny(tiny_dir, accelerate=True)
    graphs = g.LayerGraphs(torch.device("cpu"))
    short = recorded_calls(model, torch.randint(10, 500, (2, 16)))
    again = recorded_calls(model, torch.randint(10, 500, (2, 16)))
    longer = recorded_calls(model, torch.randint(10, 500, (2, 24)))
    keys = [[graphs.describe(f, h, ()).key for f, h in calls] for calls in (short, again, longer)]
    assert keys[0] == keys[1]  # new tensors, same shapes: the same graphs replay
    assert len(set(keys[0])) == len(keys[0])  # one per layer
    assert all(a != b for a, b in zip(keys[0], keys[2], strict=True))
    call = graphs.describe(*short[0], ())
    assert call.params and all(p.requires_grad for p in call.params)  # the LoRA adapters
    assert "position_embeddings" in call.kwargs
    assert graphs.skipped == {}


def test_calls_a_graph_cant_take_run_eagerly(tiny_dir):
    model, _ = load_tiny(tiny_dir, accelerate=True)
    graphs = g.LayerGraphs(torch.device("cpu"))
    function, hidden = recorded_calls(model, torch.randint(10, 500, (1, 8)))[0]
    assert graphs.describe(function, hidden, (hidden,)) is None
    with_cache = functools.partial(function.func, *function.args, **{**function.keywords, "past_key_values": object()})
    assert graphs.describe(with_cache, hidden, ()) is None
    cos, sin = function.keywords["position_embeddings"]
    needs_grad = functools.partial(function.func, *function.args,
                                   **{**function.keywords, "position_embeddings": (cos.requires_grad_(), sin)})
    assert graphs.describe(needs_grad, hidden, ()) is None
    assert graphs.describe(lambda x: x, hidden, ()) is None
    assert set(graphs.skipped) == {"positional arguments besides the hidden states", "keyword argument "
                                   "'past_key_values' is a object", "a keyword tensor needs a gradient",
                                   "not a transformers layer call"}


def test_dropout_layer_is_not_graphed(tiny_dir):
    model, _ = load_tiny(tiny_dir, accelerate=True, dropout=0.1)
    graphs = g.LayerGraphs(torch.device("cpu"))
    function, hidden = recorded_calls(model, torch.randint(10, 500, (1, 8)))[0]
    assert graphs.describe(function, hidden, ()) is None
    assert any("dropout" in reason for reason in graphs.skipped)


def test_slots_copy_data_and_compare_the_rest():
    cos = torch.randn(3)
    data = g._Slot(cos, data=True)
    new_cos = torch.randn(3)
    assert data.load(new_cos) and torch.equal(data.static, new_cos)
    pos = torch.arange(4)
    kept = g._Slot(pos, data=False)
    assert kept.load(pos) and kept.load(torch.arange(4))  # equal contents replay
    assert not kept.load(torch.tensor([0, 1, 0, 1]))  # another packing layout: eager
    assert torch.equal(kept.static, torch.arange(4))  # a compared slot is never overwritten
    changed = torch.arange(4)
    assert kept.load(changed)
    changed[2] = 0  # modified in place after it was checked: its version moved, so it is checked again
    assert not kept.load(changed)


def test_a_verdict_costs_one_comparison_per_tensor(monkeypatch):
    compared = []
    real = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: compared.append(1) or real(a, b))
    slot = g._Slot(torch.arange(4), data=False)
    other = torch.tensor([0, 1, 0, 1])
    assert [slot.load(other) for _ in range(32)] == [False] * 32  # 32 layers, one packed step
    fine = torch.arange(4)
    assert all(slot.load(fine) for _ in range(32))
    assert len(compared) == 2


def test_gradients_are_handed_out_like_autograd():
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    written = [torch.ones(3), torch.ones(2)]  # what a backward graph wrote into its static buffers
    entry = g._Entry(params=[p, q], grads=written)
    g.LayerGraphs.hand_out(entry)
    assert torch.equal(p.grad, written[0]) and p.grad is not written[0]  # None: a copy, which zero_grad frees
    held = p.grad
    written[0].fill_(2.0)
    g.LayerGraphs.hand_out(entry)
    assert p.grad is held and torch.equal(held, torch.full((3,), 3.0))  # gradient accumulation
    assert torch.equal(q.grad, torch.full((2,), 2.0))
    p.grad = None  # zero_grad(set_to_none=True) for one of them only: a fresh copy next to an addition
    g.LayerGraphs.hand_out(entry)
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and torch.equal(q.grad, torch.full((2,), 3.0))
    p.grad.zero_()  # zero_grad(set_to_none=False)
    g.LayerGraphs.hand_out(entry)
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    foreign = torch.full((3,), 5.0)
    p.grad = foreign  # a gradient from elsewhere (e.g. an eager micro-batch)
    g.LayerGraphs.hand_out(entry)
    assert p.grad is foreign and torch.equal(foreign, torch.full((3,), 7.0))
    assert torch.equal(written[0], torch.full((3,), 2.0))  # the static buffers are only read


def test_peak_of_an_allocator_trace():
    events = [{"action": "alloc", "addr": 1, "size": 10}, {"action": "alloc", "addr": 2, "size": 20},
              {"action": "free_requested", "addr": 1, "size": 10}, {"action": "free_completed", "addr": 1},
              {"action": "alloc", "addr": 3, "size": 5}, {"action": "free_requested", "addr": 99, "size": 64},
              {"action": "segment_alloc", "addr": 7, "size": 1000}, {"action": "alloc", "addr": 4, "size": 6}]
    assert g.peak_of(events) == 31  # 20 + 5 + 6 held at the end; the free of a block from before is ignored
    assert g.peak_of([]) == 0


LLAMA_8B = ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)


def planned(free_gib: float, graphs: bool, lean_graphs: bool = True):
    return plan(LLAMA_8B, batch=2, seq=2048, dtype_bytes=2, free_bytes=int(free_gib * 2**30), device_type="cuda",
                trainable_params=42_000_000, fused_loss=True, gated_op=True, lean_elements=2 * 4096 + 14336,
                graphs=graphs, lean_graphs=lean_graphs)


def test_planner_counts_graph_memory_and_drops_graphs_before_recomputing_more():
    roomy, plain = planned(60, graphs=True), planned(60, graphs=False)
    assert roomy.choice == plain.choice == "none" and not roomy.graphs
    offload = planned(1.8, graphs=False)
    assert offload.choice == "offload" and not offload.graphs
    plain, graphed = planned(10, graphs=False), planned(10, graphs=True)
    assert plain.choice == graphed.choice == "partial" and graphed.graphs and not plain.graphs
    assert "with CUDA graphs" in graphed.describe()
    assert graphed.checkpointed_layers > plain.checkpointed_layers  # the graphs' memory: fewer layers kept
    extra = graphed.extra["graph_bytes"]
    assert graphed.need_bytes["partial"] <= graphed.budget_bytes
    # W8B: pool (measured 590 MiB) and three static layer-sized buffers (96 MiB): about 0.7 GiB; the
    # lean layers' graphs' pool held 0.20 GiB more
    lean = lean_graph_bytes(graphed.extra["workspace_bytes"])
    assert 0.6 * 2**30 < extra - lean < 0.8 * 2**30 and 0.15 * 2**30 < lean < 0.25 * 2**30
    eager_lean = planned(10, graphs=True, lean_graphs=False)  # SLIPSTREAM_LEAN_GRAPHS=0
    assert eager_lean.extra["graph_bytes"] == extra - lean
    assert eager_lean.checkpointed_layers <= graphed.checkpointed_layers
    tight = planned(1.8, graphs=True)  # offload fits, offload with graphs does not: no graphs
    assert tight.choice == "offload" and not tight.graphs and "without CUDA graphs" in tight.reason


def test_planner_graphs_an_all_lean_plan_only_with_lean_graphs():
    roomy = 15.5  # lean fits with its graphs, keeping every activation does not
    graphed, eager_lean = planned(roomy, graphs=True), planned(roomy, graphs=True, lean_graphs=False)
    assert graphed.choice == eager_lean.choice == "lean"
    assert graphed.graphs and not eager_lean.graphs
    assert graphed.need_bytes["lean"] > eager_lean.need_bytes["lean"]


def test_cpu_offload_path_has_no_graphs(tiny_dir):
    model, _ = load_tiny(tiny_dir, accelerate=True)
    apply_checkpointing(model, "offload", force_offload=True, verbose=False, graphs=True)
    func = checkpoint_layers(model)[0]._gradient_checkpointing_func
    assert isinstance(func, OffloadedCheckpoint) and func.graphs is None


def test_pinned_layouts_outlive_the_cache(monkeypatch):
    computed = []
    real = attn.compute_layout

    def counting(*args):
        computed.append(args[1])
        return real(*args)

    monkeypatch.setattr(attn, "compute_layout", counting)
    pinned = torch.tensor([[0, 1, 2, 0, 1, 2]])
    attn.pin_layouts([pinned])
    first = attn.layout_for(None, pinned, None, None, 1, 6)
    assert first.packed and first.cu_seqlens is not None
    for _ in range(3 * attn._CACHE_SIZE):  # more layouts than the cache keeps
        attn.layout_for(None, torch.tensor([[0, 1, 0, 1, 2, 3]]), None, None, 1, 6)
    assert attn.layout_for(None, pinned, None, None, 1, 6) is first  # a graph reading it finds it alive
    assert sum(1 for t in computed if t is pinned) == 1


def test_disabled_graphs_describe_nothing_and_let_go(tiny_dir):
    model, _ = load_tiny(tiny_dir, accelerate=True)
    graphs = g.LayerGraphs(torch.device("cpu"))
    function, hidden = recorded_calls(model, torch.randint(10, 500, (1, 8)))[0]
    assert graphs.describe(function, hidden, ()) is not None
    graphs.statics["shape"] = object()
    graphs.disable("packed batches change their layout every step")
    assert graphs.describe(function, hidden, ()) is None and graphs.statics == {}
    assert graphs.skipped == {"packed batches change their layout every step": 1}


def test_key_follows_peft_switches(tiny_dir):
    """A graph replays the adapter math it captured: disabling adapters or changing a scale is a new key."""
    model, _ = load_tiny(tiny_dir, accelerate=True)
    graphs = g.LayerGraphs(torch.device("cpu"))
    ids = torch.randint(10, 500, (1, 8))

    def key():
        function, hidden = recorded_calls(model, ids)[0]
        return graphs.describe(function, hidden, ()).key

    plain = key()
    with model.disable_adapter():
        disabled = key()
    assert disabled != plain and key() == plain
    lora = next(m for m in checkpoint_layers(model)[0].modules() if hasattr(m, "scaling") and hasattr(m, "lora_A"))
    lora.scaling["default"] *= 2
    assert key() != plain


def test_lean_graph_stand_ins_reach_every_trainable_parameter():
    """The lean capture swaps each trainable parameter for a view made inside the capture; the swap
    must cover every trainable parameter once, be undone, and the used-parameter walk must see through it."""
    from slipstream.train.lean_graphs import _swapped, _trainable_slots, _used_params

    layer = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    layer[0].weight.requires_grad_(False)  # a frozen base weight: not a slot
    layer[2].requires_grad_(False)  # a whole frozen module
    slots = _trainable_slots(layer)
    assert [p for _, _, p in slots] == [layer[0].bias, layer[1].weight, layer[1].bias]
    originals = [p for _, _, p in slots]
    stand_ins = [p.view_as(p) for p in originals]
    with _swapped(slots, stand_ins):
        assert all(module._parameters[name] is t for (module, name, _), t in zip(slots, stand_ins, strict=True))
        out = layer[1](layer[0](torch.randn(5, 3)))  # layer[2] unused
    assert [p for _, _, p in _trainable_slots(layer)] == originals  # restored
    grads = torch.autograd.grad(out.sum(), stand_ins)
    assert all(g.shape == p.shape for g, p in zip(grads, originals, strict=True))
    assert _used_params(out, originals + [layer[2].weight]) == [True, True, True, False]


def test_lean_graphs_switch(monkeypatch):
    from slipstream.train.lean_graphs import lean_graphs_enabled

    monkeypatch.delenv("SLIPSTREAM_LEAN_GRAPHS", raising=False)
    assert lean_graphs_enabled()
    monkeypatch.setenv("SLIPSTREAM_LEAN_GRAPHS", "0")
    assert not lean_graphs_enabled()
