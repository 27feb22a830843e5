"""On a GPU: a tiny Llama trained with every layer lean and replayed from CUDA graphs; prints what the
graphs did, the first error with its traceback, and the gradients against the eager lean run.

Usage: python benchmarks/gpu/lean_graphs_probe.py [--steps N] [--layers K]
"""

from __future__ import annotations

import argparse
import tempfile
import traceback
from pathlib import Path

import torch

from slipstream.train import graphs as graphs_module
from slipstream.train import lean_graphs
from slipstream.train.fast_model import FastModel
from slipstream.train.offload import apply_checkpointing, graph_report
from tests.train.conftest import make_model_dir


def _loud(fn):  # noqa: ANN001, ANN202 - wraps a method
    """``fn`` that prints the traceback of what it raises before raising it."""

    def wrapper(*args):  # noqa: ANN002, ANN202
        try:
            return fn(*args)
        except Exception:
            traceback.print_exc()
            raise

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None, help="checkpoint the first N layers (partial)")
    a = ap.parse_args()
    # a failed capture reports only "operation failed due to a previous error": print the first one
    lean_graphs.GraphedLean._differentiate = _loud(lean_graphs.GraphedLean._differentiate)
    graphs_module.LayerCall.run = _loud(graphs_module.LayerCall.run)
    folder = make_model_dir(Path(tempfile.mkdtemp()) / "model", num_hidden_layers=3)
    model, _ = FastModel.from_pretrained(folder, max_seq_length=512, init="random", dtype=torch.float32,
                                         device="cuda", verbose=False)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, gradient_checkpointing=False, verbose=False)
    model.train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    ids = torch.randint(10, 1000, (2, 96), device="cuda")
    grads = {}
    for graphs in (False, True):
        apply_checkpointing(model, True if a.layers else "lean", layers=a.layers, lean=bool(a.layers),
                            verbose=False, graphs=graphs)
        try:
            for step in range(a.steps):
                model.zero_grad(set_to_none=True)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                torch.cuda.synchronize()
                print(f"graphs={graphs} step {step}: loss {float(loss):.6f}", flush=True)
        except Exception:  # noqa: BLE001 - a probe: show it
            traceback.print_exc()
        grads[graphs] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        print("report", graph_report(model), flush=True)
    worst = max(float((grads[True][n] - g).abs().max() / (g.abs().max() + 1e-30)) for n, g in grads[False].items())
    print(f"LoRA gradients, graphed vs eager lean: worst relative difference {worst:.3e} over {len(grads[False])}")


if __name__ == "__main__":
    main()
