"""The W8B harness on the CPU: w8b.py's result line, and report.py's table from mixed result lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_w8b_tiny_cpu_auto_with_cap_prints_a_result_line():
    out = subprocess.run([sys.executable, "benchmarks/train/w8b.py", "--shape", "tiny", "--device", "cpu",
                          "--checkpointing", "auto", "--max-memory-gib", "0.001", "--bsz", "1", "--seq", "64",
                          "--steps", "1", "--warm", "1", "--prewarm-seq", "16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    row = json.loads(line.removeprefix("RESULT "))
    assert "error" not in row, row
    assert row["max_memory_gib"] == 0.001 and row["plan"] == "checkpoint:2"  # nothing fits a 1 MiB cap
    assert row["tok_s"] > 0 and row["loss_first"] > 0


def test_report_tables_mixed_lines(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "train"))
    try:
        import report
    finally:
        sys.path.pop(0)
    lines = [
        {"system": "slipstream", "base": "bf16", "checkpointing": "True", "tok_s": 12000, "peak_gib": 16.0,
         "step_s": 0.34, "device": "GPU X", "torch": "2.x", "date": "2026-11-23"},
        {"system": "slipstream", "base": "bf16", "checkpointing": "auto", "max_memory_gib": 23.4,
         "plan": "partial:24", "tok_s": 10714, "peak_gib": 21.21, "step_s": 0.38},
        {"variant": "hf", "tok_s": 6000, "peak_gib": 23.4, "step_s": 0.68},
        {"variant": "liger4", "tok_s": 5949, "peak_gib": 8.14, "step_s": 0.69},
    ]
    (tmp_path / "w8b.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    sys.argv = ["report.py", str(tmp_path)]
    assert report.main() == 0
    md = (tmp_path / "results.md").read_text()
    assert "| slipstream | checkpointing on | 12,000 | 16.0 | 2.00x | >= 11,700, <= 16.5 | yes |" in md
    capped = ("| slipstream | auto, <= 23.4 GiB [partial:24] | 10,714 | 21.21 | 1.79x "
              "| >= 13,500, <= 23.4 | no (speed) |")
    assert capped in md
    assert "| Liger-Kernel 0.8.5 | checkpointing on | 5,949 | 8.14 | - |" in md  # no HF row for nf4: no ratio
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["device"] == "GPU X"


def test_w8b_tiny_nf4_routes_lora_through_slipstream():
    """Layers quantised by hand (peft then picks its dense lora.Linear over bnb Linear4bit) still run
    ops.lora_linear: the H100 NF4 run of 2026-11-23 had missed that."""
    pytest.importorskip("bitsandbytes")
    out = subprocess.run([sys.executable, "benchmarks/train/w8b.py", "--shape", "tiny", "--device", "cpu",
                          "--base", "nf4", "--checkpointing", "true", "--bsz", "1", "--seq", "32", "--steps", "1",
                          "--warm", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
    row = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
    assert "error" not in row, row
    assert "lora_linear" in row["chosen"], row["chosen"]


def test_profile_step_tiny_cpu_writes_its_breakdown(tmp_path):
    """The step profiler runs end to end (on the CPU there are no GPU kernels: busy 0, host ops listed)."""
    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, "benchmarks/train/profile_step.py", "--shape", "tiny", "--device", "cpu",
                    "--bsz", "1", "--seq", "32", "--warm", "1", "--checkpointing", "offload", "--out", str(out)],
                   cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.read_text())
    assert result["wall_ms"] > 0 and result["gpu_busy_ms"] == 0 and result["kernels"] == 0
    assert result["top_host_ops"] and all(ms >= 0 for _, _, ms in result["top_host_ops"])


def test_union_of_intervals_counts_overlap_once():
    sys.path.insert(0, str(ROOT / "benchmarks" / "train"))
    try:
        from profile_step import category, union_ms
    finally:
        sys.path.pop(0)
    assert union_ms([(0, 1000), (500, 1500), (2000, 2500)]) == 2.0  # us in, ms out
    assert union_ms([]) == 0.0
    assert category("nvjet_sm90_tst_256x128") == "gemm" and category("_rms_norm_fwd") == "slipstream triton"
    assert category("_dequant_kernel") == "slipstream triton"
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    torch_kernel = "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>"
    assert category(torch_kernel).startswith("torch elementwise")  # not ours, though it ends in _kernel
