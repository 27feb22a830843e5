"""On a GPU: a tiny Llama trained with every layer lean and replayed from CUDA graphs; prints what the
graphs did, the first error with its traceback, and the gradients against the eager lean run.

Usage: python benchmarks/gpu/lean_graphs_probe.py [--mode global|thread_local|relaxed] [--steps N]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="global")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None, help="checkpoint the first N layers (partial)")
    ap.add_argument("--sync-debug", action="store_true", help="raise at a synchronising call in the eager backward")
    a = ap.parse_args()
    lean_graphs.CAPTURE_ERROR_MODE = a.mode
    differentiate = lean_graphs.GraphedLean._differentiate

    def loud(self, *args):  # the capture's own error, with where it came from
        capturing = torch.cuda.is_current_stream_capturing()
        if a.sync_debug and not capturing:  # a synchronising call in the eager backward raises, with its stack
            torch.cuda.set_sync_debug_mode("error")
        try:
            return differentiate(self, *args)
        except Exception:
            traceback.print_exc()
            raise
        finally:
            torch.cuda.set_sync_debug_mode(0)

    lean_graphs.GraphedLean._differentiate = loud
    run = graphs_module.LayerCall.run

    def loud_run(self, *args):
        try:
            return run(self, *args)
        except Exception:
            traceback.print_exc()
            raise

    graphs_module.LayerCall.run = loud_run
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
