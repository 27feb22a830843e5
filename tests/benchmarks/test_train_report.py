"""The W8B report: settings, targets and provenance of each row (benchmarks/train/report.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "train" / "report.py"


def mine(**kw) -> dict:
    row = {"system": "slipstream", "shape": "llama3-8b", "base": "bf16", "bsz": 2, "seq": 2048, "step_s": 0.4,
           "device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "date": "2026-11-23"}
    return {**row, **kw}


def test_rows_settings_targets_and_runs(tmp_path):
    (tmp_path / "run_a.jsonl").write_text("\n".join(json.dumps(r) for r in [
        mine(checkpointing="offload", tok_s=11_800, peak_gib=16.4),           # meets the bf16 checkpointing target
        mine(checkpointing="True", base="nf4", tok_s=7_000, peak_gib=7.6),   # misses both
        mine(checkpointing="auto", max_memory_gib=23.4, plan="partial:17+lean", tok_s=12_486, peak_gib=21.79),
    ]) + "\n")
    (tmp_path / "run_b.jsonl").write_text(
        json.dumps(mine(checkpointing="auto", base="nf4", bsz=1, seq=131072, error="OutOfMemoryError: x")) + "\n"
        + json.dumps(mine(checkpointing="auto", base="nf4", bsz=1, seq=262144, plan="offload:32", step_s=181.0,
                          tok_s=1448, peak_gib=56.2, host_peak_gib=67.1)) + "\n"
        + json.dumps(mine(checkpointing="auto", base="nf4", bsz=1, seq=270000, plan="offload:32", step_s=170.0,
                          tok_s=1588, peak_gib=57.0, host_peak_gib=68.0)) + "\n"
        + json.dumps({"variant": "hf", "tok_s": 5_766, "peak_gib": 23.4, "step_s": 0.7}) + "\n"
        + json.dumps({"variant": "unsloth", "gc": "unsloth", "load_in_4bit": True, "tok_s": 9_851, "peak_gib": 7.0,
                      "step_s": 0.42}) + "\n")
    subprocess.run([sys.executable, str(REPORT), str(tmp_path)], check=True, capture_output=True)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    by = {(r["setting"], r["base"]): r for r in rows}
    assert by[("checkpointing on (offloaded)", "bf16")]["run"] == "run_a"
    assert by[("checkpointing on", "bf16")]["system"] == "transformers + peft"  # the peers' rows are normalised
    assert by[("checkpointing on (offloaded)", "nf4")]["system"] == "Unsloth"
    md = (tmp_path / "results.md").read_text()
    lines = {line.split("|")[2].strip(): line for line in md.splitlines() if line.startswith("| slipstream")}
    assert "| yes | run_a |" in lines["checkpointing on (offloaded)"]
    assert "no (speed, memory)" in lines["checkpointing on"]
    assert "no (speed)" in lines["auto, <= 23.4 GiB [partial:17+lean]"]
    long_lines = md.split("## Long context")[1].splitlines()
    oom = next(line for line in long_lines if line.startswith("| nf4 | 131,072"))
    assert "error: OutOfMemoryError" in oom and oom.endswith("| run_b |")
    slow = next(line for line in long_lines if line.startswith("| nf4 | 262,144"))
    assert "| 181.0 |" in slow and "no (step 1.006x the limit)" in slow and "| 67.1 |" in slow
    fast = next(line for line in long_lines if line.startswith("| nf4 | 270,000"))
    assert "| yes |" in fast
    assert "2.05x" in lines["checkpointing on (offloaded)"]  # 11,800 / 5,766 from the other file's HF row
