"""ci/compile_matrix.py on a small subset: really compiles for gfx942 and sm_90, passes, and fails
loudly (non-zero, naming kernel/config/target) when a unit can't be built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "ci" / "compile_matrix.py"

pytest.importorskip("triton")


def run_matrix(*args: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "matrix.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--extra-kernels", "tests.backends.toy_kernels",
                           "--json", str(out), "--jobs", "2", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    data = json.loads(out.read_text()) if out.exists() else {}
    return proc, data


def test_one_kernel_one_config_gfx942_and_sm90(tmp_path):
    proc, data = run_matrix("--backend", "rocm", "--backend", "nvidia", "--target", "gfx942",
                            "--target", "sm_90",
                            "--kernel", "toy_gemm", "--config", "0", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = data["rows"]
    assert {r["target"] for r in rows} == {"gfx942", "sm_90"}
    assert all(r["ok"] for r in rows)
    amd = next(r for r in rows if r["target"] == "gfx942")
    assert {"waves_per_eu", "matrix_instr_nonkdim", "kpack"} <= set(amd["config"])
    assert 0 < amd["shared_bytes"] <= 64 * 1024 and amd["registers"] > 0
    nv = next(r for r in rows if r["target"] == "sm_90")
    assert 0 < nv["shared_bytes"] <= 227 * 1024
    assert "compile matrix:" in proc.stdout and "0 failed rows" in proc.stdout


def test_failures_exit_nonzero_and_name_the_culprit(tmp_path):
    out = tmp_path / "bad.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--extra-kernels",
                           "tests.backends.toy_kernels:BROKEN", "--backend", "rocm", "--target", "gfx942",
                           "--kernel", "toy_broken", "--json", str(out),
                           "--jobs", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "FAIL kernel=toy_broken config[0]=" in proc.stdout and "target=gfx942" in proc.stdout
    assert "aot(config) raised RuntimeError" in proc.stdout


def test_unknown_kernel_is_an_error(tmp_path):
    proc, _ = run_matrix("--backend", "rocm", "--kernel", "no_such_kernel", tmp_path=tmp_path)
    assert proc.returncode == 1 and "no kernel named no_such_kernel" in proc.stdout
