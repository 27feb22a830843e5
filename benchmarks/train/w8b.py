"""W8B: the side-by-side LoRA training workload, slipstream's side.

Llama-3.1-8B-shaped model with random weights, LoRA r=16 on all 7 projections, batch 2 x 2048,
AdamW (fused on CUDA, as the Trainer builds it; the peers' runners use torch's default); bf16 or NF4
base. One JSON line per run with tokens/s (median step after warm-up, which also covers the
dispatcher's one-time tuning and the CUDA graph captures) and peak GiB (allocated, reset after
warm-up, plus the whole CUDA graph pool: replays never go through the allocator, so its peak alone
would not see the graphs' temporaries).
The peers (transformers + peft, Liger-Kernel) run through ../shared/peers/gpu_baseline.py, one
system per process, on the same GPU (see run_all.sh).

    python benchmarks/train/w8b.py --base bf16 --checkpointing true
    python benchmarks/train/w8b.py --shape tiny --device cpu      # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time

import torch

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=131072),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=512),
}


def quantize_to_nf4(model: torch.nn.Module, device: str) -> None:
    """Replace the decoder's Linear layers by bitsandbytes NF4 Linear4bit (double quantised)."""
    import bitsandbytes as bnb

    for _, module in list(model.model.layers.named_modules()):
        for cname, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                      device="cpu")
                # quantised where the weight already is (on the GPU: no host round trip of 16 GB)
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(module, cname, q.to(device))
    torch.cuda.empty_cache()


def build(shape: str, base: str, checkpointing: object, device: str, layers: int | None = None):
    """The W8B model: ``shape``'s config (``layers`` overrides its decoder layer count, for quick
    profiles), random weights, NF4 base when ``base == "nf4"``, LoRA r=16 on every linear projection."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slipstream import FastModel

    cfg = LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    if base == "nf4":
        quantize_to_nf4(model, device)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                     gradient_checkpointing=checkpointing)
    return model, cfg


def log(message: str, _start: list = [time.perf_counter()]) -> None:  # noqa: B006 - the process start, once
    """Progress on stderr with seconds since start: a run killed by a timeout still shows where it was."""
    print(f"[w8b {time.perf_counter() - _start[0]:7.1f}s] {message}", file=sys.stderr, flush=True)


def run(shape: str, base: str, checkpointing: object, bsz: int, seq: int, steps: int, warm: int,
        device: str, max_memory_gib: float | None = None, prewarm_seq: int = 0, long_seq: int = 0,
        memory_snapshot: str = "") -> None:
    """Build, train and print one RESULT line (then one for ``long_seq``, if given)."""
    model, cfg = build(shape, base, checkpointing, device)
    log(f"built {shape} {base} base, checkpointing={checkpointing}")
    plan = None
    if checkpointing == "auto":  # plan for this batch, as the Trainer does (get_peft_model assumed batch 1)
        from slipstream.train.memory import plan_for_model

        plan = plan_for_model(model, batch=bsz, seq=seq, max_memory_gib=max_memory_gib)
        plan.apply(model, verbose=False)
        log(plan.describe())
    model.train()
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # as slipstream's Trainer builds it: fused on CUDA (no per-step temporaries the size of the adapters)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
    gen = torch.Generator(device=device).manual_seed(1)
    if prewarm_seq:  # compile kernels on a short sequence, so a long-context step is timed without JIT work
        ids = torch.randint(0, cfg.vocab_size, (bsz, prewarm_seq), device=device, generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.zero_grad(set_to_none=True)
        log(f"prewarm step at {prewarm_seq} tokens done")
    times, hosts, losses = [], [], []
    warm_peak = 0
    tune_s = 0.0
    for i in range(warm + steps):
        if memory_snapshot and cuda:
            _record_memory(i, warm, memory_snapshot)
        ids = torch.randint(0, cfg.vocab_size, (bsz, seq), device=device, generator=gen)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        host = time.perf_counter() - t  # the host's time to enqueue the step: ~= the step when host-bound
        if cuda:
            torch.cuda.synchronize()
        if i >= warm:
            times.append(time.perf_counter() - t)
            hosts.append(host)
        elif i == 0:
            tune_s = time.perf_counter() - t
        losses.append(out.loss.item())
        log(f"step {i} ({'warm-up' if i < warm else 'timed'}): {time.perf_counter() - t:.3f} s "
            f"(host {host:.3f} s), loss {losses[-1]:.3f}, "
            f"peak {torch.cuda.max_memory_allocated() / 2**30 if cuda else 0:.2f} GiB")
        if i == warm - 1 and cuda:
            warm_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()  # the tuner's scratch inputs are not training memory
            alloc_before = _allocator_counts()
    syncs = _synchronising_calls(model, opt, cfg, bsz, seq, device, gen) if cuda and warm else None  # not long runs
    times.sort()
    med = times[len(times) // 2]
    hosts.sort()
    allocator = None
    if cuda and warm:  # device mallocs/frees and retries during the timed steps: each one synchronises
        allocator = {k: v - alloc_before.get(k, 0) for k, v in _allocator_counts().items()}
    from slipstream.train.offload import graph_report

    graphs = graph_report(model)
    pool = graphs["pool_bytes"] if graphs else 0
    peak = torch.cuda.max_memory_allocated() + pool if cuda else 0  # replays never ask the allocator: add the pool
    result = dict(system="slipstream", shape=shape, base=base, checkpointing=str(checkpointing), bsz=bsz, seq=seq,
                max_memory_gib=max_memory_gib,
                plan=None if plan is None else f"{plan.choice}:{plan.checkpointed_layers}" + ("+lean" * plan.lean)
                + (f"+stash{plan.stash_layers}" if plan.stash_layers else ""),
                step_s=round(med, 4), tok_s=round(bsz * seq / med), host_s=round(hosts[len(hosts) // 2], 4),
                timed_steps=len(times), step_s_min=round(times[0], 4), step_s_max=round(times[-1], 4),
                allocator_during_timed_steps=allocator, synchronising_calls=syncs,
                peak_gib=round(peak / 2**30, 2) if cuda else None,
                allocator_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                graph_pool_gib=round(pool / 2**30, 3), graphs=graphs,
                warm_peak_gib=round(warm_peak / 2**30, 2) if cuda and warm else None,
                host_peak_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),  # KiB on Linux
                first_step_s=round(tune_s, 1), loss_first=round(losses[0], 3), loss_last=round(losses[-1], 3),
                chosen=_chosen(), device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"))
    emit(result)
    if long_seq:
        emit(long_step(model, opt, cfg, shape, base, long_seq, device, gen))


def _record_memory(step: int, warm: int, path: str) -> None:
    """Record the allocator's history from the second warm-up step (after tuning) through the first
    timed step, and write it to ``path`` (read it with memory_breakdown.py); a marker between steps."""
    if step == 1:
        torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
    if step >= 1:
        _memory_marker()
    if step == warm + 1:
        torch.cuda.memory._dump_snapshot(path)
        torch.cuda.memory._record_memory_history(enabled=None)
        log(f"memory history written to {path}")


def _memory_marker() -> None:
    """A tiny allocation whose frame marks a step boundary in the recorded history."""
    torch.empty(1, device="cuda")


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def _chosen() -> dict[str, list[str]]:
    from slipstream import explain

    chosen: dict[str, set] = {}
    for d in explain():
        chosen.setdefault(d.op, set()).add(d.chosen)
    return {k: sorted(v) for k, v in chosen.items()}


def long_step(model, opt, cfg, shape: str, base: str, seq: int, device: str, gen) -> dict:
    """One optimiser step at batch 1 x ``seq`` on the same model (no second build), planned as the
    Trainer would (``auto``): the long-context measurement after the W8B one, in one process."""
    from slipstream.train.memory import plan_for_model

    plan = plan_for_model(model, batch=1, seq=seq)
    plan.apply(model, verbose=False)
    log(plan.describe())
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, cfg.vocab_size, (1, seq), device=device, generator=gen)
    torch.cuda.synchronize()
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    step = time.perf_counter() - t
    log(f"long step at {seq} tokens: {step:.1f} s, loss {loss.item():.3f}, "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return dict(system="slipstream", shape=shape, base=base, checkpointing="auto", bsz=1, seq=seq,
                plan=f"{plan.choice}:{plan.checkpointed_layers}" + ("+lean" * plan.lean), step_s=round(step, 2),
                tok_s=round(seq / step), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                host_peak_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),
                loss_first=round(loss.item(), 3), chosen=_chosen(), device=torch.cuda.get_device_name(),
                torch=torch.__version__, date=time.strftime("%Y-%m-%d"))


def _synchronising_calls(model, opt, cfg, bsz: int, seq: int, device: str, gen) -> dict:
    """One more (untimed) step under ``torch.cuda.set_sync_debug_mode("warn")``: how many calls made
    the host wait for the GPU, and where (a synchronisation per layer starves a GPU-bound step)."""
    import warnings

    ids = torch.randint(0, cfg.vocab_size, (bsz, seq), device=device, generator=gen)
    sites: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            site = f"{w.filename}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1
    return {"count": sum(sites.values()), "sites": dict(sorted(sites.items(), key=lambda kv: -kv[1])[:8])}


def _allocator_counts() -> dict:
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free",
                                              "num_sync_all_streams")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--base", default="bf16", choices=("bf16", "nf4"))
    ap.add_argument("--checkpointing", default="true", help="false | true | lean | offload | auto")
    ap.add_argument("--bsz", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warm", type=int, default=4,
                    help="untimed steps: the first tunes kernels, the second captures CUDA graphs, the third "
                         "replays them for the first time (uploads them)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prewarm-seq", type=int, default=0,
                    help="one untimed step at this sequence length first (long-context runs with --warm 0)")
    ap.add_argument("--max-memory-gib", type=float, default=None,
                    help='with --checkpointing auto: the device memory the planner may use, weights included')
    ap.add_argument("--long-seq", type=int, default=0,
                    help="then one step at batch 1 x this many tokens on the same model (planned with auto)")
    ap.add_argument("--memory-snapshot", default="",
                    help="write the allocator's history (warm-up and one timed step) here; see memory_breakdown.py")
    a = ap.parse_args()
    policy = {"true": True, "false": False}.get(a.checkpointing.lower(), a.checkpointing)
    try:
        run(a.shape, a.base, policy, a.bsz, a.seq, a.steps, a.warm, a.device, a.max_memory_gib, a.prewarm_seq,
            a.long_seq, a.memory_snapshot)
    except Exception as exc:  # one failing configuration must not hide the others' numbers
        import traceback

        traceback.print_exc()
        emit(dict(system="slipstream", shape=a.shape, base=a.base, checkpointing=a.checkpointing,
                  bsz=a.bsz, seq=a.seq, max_memory_gib=a.max_memory_gib, long_seq=a.long_seq or None,
                  error=f"{type(exc).__name__}: {str(exc)[:300]}"))


if __name__ == "__main__":
    main()
