"""On the GPU: are graphed checkpointed layers bit-identical to their eager path? Per call of a fixed
schedule (no optimiser step, so differences don't compound), the largest LoRA-gradient difference
between ``graphs=False`` and ``graphs=True``, for a policy and with parts of the graph machinery
switched off (in-place gated backward, pool reservation), to find where a difference comes from.

    python benchmarks/gpu/graphs_bitwise.py
"""

from __future__ import annotations

import contextlib
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from slipstream.models import mlp  # noqa: E402
from slipstream.train import graphs as graphs_mod  # noqa: E402
from slipstream.train.offload import OffloadedCheckpoint, apply_checkpointing, checkpoint_layers  # noqa: E402
from slipstream.train.packing import PackedCollator  # noqa: E402
from tests.train.test_gpu import gpu_model  # noqa: E402
from tests.train.test_gradients import fresh_rows, lora_grads, perturb_lora_b  # noqa: E402


def run(policy, variant: str, tmp: Path) -> None:
    model, _ = gpu_model(tmp, torch.float32, num_hidden_layers=3)
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    perturb_lora_b(model, gen)
    batch = {k: v.cuda() for k, v in PackedCollator(0)(fresh_rows(2, 96, gen)).items()}

    def calls(graphs: bool) -> list[dict]:
        apply_checkpointing(model, policy, verbose=False, graphs=graphs)
        if policy is True and not graphs:
            func = OffloadedCheckpoint(torch.device("cuda"), offload=False, graphs=False)
            for layer in checkpoint_layers(model):
                layer._gradient_checkpointing_func = func
        out = []
        for _ in range(5):
            model.zero_grad(set_to_none=True)
            model(**batch, use_cache=False).loss.backward()
            torch.cuda.synchronize()
            out.append(lora_grads(model))
        return out

    eager, graphed = calls(False), calls(True)
    worst = []
    for i, (e, g) in enumerate(zip(eager, graphed, strict=True)):
        diff = max(float((g[n] - e[n]).abs().max()) for n in e)
        scale = max(float(e[n].abs().max()) for n in e)
        bad = [n for n in e if not torch.equal(g[n], e[n])]
        worst.append(f"call {i + 1}: max diff {diff:.2e} (scale {scale:.2e}), {len(bad)}/{len(e)} differ"
                     + (f", first {bad[0]}" if bad else ""))
    print(f"== policy={policy!r} variant={variant}")
    for line in worst:
        print("  " + line)


def main() -> None:
    variants = {
        "default": contextlib.nullcontext,
        "no in-place gated backward": lambda: _patch(mlp, "inputs_expire_in_backward",
                                                     lambda enabled=True: contextlib.nullcontext()),
        "no pool reservation": lambda: _patch(graphs_mod.LayerGraphs, "_reserve_pool",
                                              lambda self, record: setattr(self, "_reservation",
                                                                           torch.cuda.CUDAGraph())),
    }
    with tempfile.TemporaryDirectory() as d:
        for policy in (True, "offload"):
            for name, make in variants.items():
                with make():
                    run(policy, name, Path(d) / f"{policy}-{len(name)}")


@contextlib.contextmanager
def _patch(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


if __name__ == "__main__":
    main()
