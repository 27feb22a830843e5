"""The op benchmark harness (benchmarks/ops) on the CPU, at small sizes.

* one pytest-benchmark per op on the reference and on the dispatched op: ``benchmark(step, ...)``
  times a forward+backward exactly as ``run.py`` does; the result it returns is then judged
  against the float64 reference, so with ``--benchmark-disable`` (the default) these still run
  once as correctness tests. ``pytest tests/benchmarks --benchmark-enable`` gives the timings.
* ``run.py --device cpu --size small --quick`` end to end (results.json / results.md, < 60 s),
  and ``report.py`` regenerating the same Markdown from the JSON.
* the harness's own logic: work formulas, the correctness guard (a wrong implementation is
  reported WRONG and not ranked, a raising one is recorded and the run goes on), ratios.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.ops import peers, report
from benchmarks.ops import run as harness
from slipstream.dispatch.verify import Oracle, detached
from slipstream.ops import SPECS

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
OPS = list(SPECS)


def first_case(op: str, dtype: torch.dtype = torch.bfloat16) -> harness.Case:
    return harness.cases_for(op, CPU, dtype, "small", quick=True)[0]


# ----------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("system", ["reference", "dispatched"])
@pytest.mark.parametrize("op", OPS)
def test_op_benchmark(benchmark, op, system):
    spec = SPECS[op]
    case = first_case(op)
    fn = spec.reference if system == "reference" else harness.dispatched(spec)
    oracle = Oracle(spec, case.args)
    args = detached(oracle.args)
    benchmark.group = op
    benchmark.extra_info["case"] = case.label
    result = benchmark(harness.step, fn, spec, args, oracle.grad_outputs)
    verdict = harness.judge_result(oracle, result)
    assert verdict["ok"], f"{op} {system} on {case.label}: {verdict['reason']} ({verdict['errors']})"
    assert set(result.grads) == {n for n, a in zip(spec.parameters, case.args, strict=False) if harness._rg(a)}


# ----------------------------------------------------------------------------- run.py / report.py
def test_run_cpu_quick_writes_results_and_report_regenerates(tmp_path):
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU as users have it
    env["SLIPSTREAM_CACHE_DIR"] = str(tmp_path / "cache")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/ops/run.py"), "--device", "cpu", "--size", "small",
                           "--quick", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 60, f"CPU quick run took {elapsed:.0f} s"
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["device"] and results["meta"]["versions"]["torch"] == torch.__version__
    assert results["ceilings"]["copy"]["gbps"] > 0 and results["ceilings"]["matmul"]["bfloat16"]["tflops"] > 0
    assert {c["op"] for c in results["cases"]} == set(OPS)
    for case in results["cases"]:
        assert case["error"] is None, (case["op"], case["error"])
        rows = {r["system"]: r for r in case["rows"]}
        for name in ("eager", "slipstream"):
            assert rows[name]["status"] == "ok" and rows[name]["fwd_bwd_ms"] > 0 and rows[name]["fwd_ms"] > 0, name
        assert rows["slipstream"]["chosen"] and rows["slipstream"]["verify"]["ok"]
        assert rows["liger"]["status"] == "n/a"  # Liger needs a GPU
        assert rows["compile"]["status"] == "skipped"
        assert case["summary"]["vs_eager"] is not None and rows["eager"]["rank"] is not None
        if case["op"] == "lora_linear":
            assert rows["peft"]["status"] == "ok", rows["peft"]
            assert rows["base_gemm"]["status"] == "ok" and rows["base_gemm"]["rank"] is None
    assert sum(c["op"] == "lora_linear" and "nf4" in c["label"] for c in results["cases"]) == 1
    md = (out / "results.md").read_text()
    for op in OPS:
        assert f"## {op}" in md
    assert "slip ms" in proc.stdout  # the compact table is printed
    assert proc.stdout.rstrip().splitlines()[-1].startswith("attention")  # the table is the last thing

    regen = tmp_path / "regen"
    proc2 = subprocess.run([sys.executable, str(ROOT / "benchmarks/ops/report.py"), str(out / "results.json"),
                            "--out", str(regen)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert (regen / "results.md").read_text() == md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "results.png").stat().st_size > 0 and (regen / "results.png").stat().st_size > 0


# ----------------------------------------------------------------------------- the guard, in process
class _WithExtras(harness.Runner):
    """A runner whose cases also carry a wrong and a crashing implementation."""

    def systems(self, spec, case, record):
        def wrong(x, weight, eps=1e-6, offset=0.0):
            return spec.reference(x, weight, eps, offset) * 1.1

        def crash(x, weight, eps=1e-6, offset=0.0):
            raise RuntimeError("kernel exploded")

        return [*super().systems(spec, case, record), harness.System("wrong", "peer", wrong),
                harness.System("crash", "peer", crash)]


def test_wrong_implementation_is_reported_and_not_ranked():
    runner = _WithExtras(CPU, torch.float32, quick=True, compile_mode="none", compile_budget_s=0, time_limit_s=600,
                         timing={"warmup_ms": 1.0, "rep_ms": 2.0}, log=lambda msg: None)
    record = runner.run_case(first_case("rms_norm", torch.float32))
    results = report.derive({"meta": {"dtype": "float32"}, "ceilings": {}, "cases": [record]})
    rows = {r["system"]: r for r in results["cases"][0]["rows"]}
    assert rows["wrong"]["status"] == "WRONG" and rows["wrong"]["rank"] is None
    assert "float64" in rows["wrong"]["reason"] and rows["wrong"]["fwd_bwd_ms"] is not None  # still timed, shown
    assert rows["crash"]["status"] == "error" and "kernel exploded" in rows["crash"]["reason"]
    assert rows["eager"]["status"] == "ok" and rows["eager"]["rank"] is not None
    assert rows["slipstream"]["status"] == "ok" and rows["slipstream"]["verify"]["ok"]
    ranked = sorted(r["rank"] for r in rows.values() if r["rank"])
    assert ranked == list(range(1, len(ranked) + 1))
    md = report.markdown(results)
    assert "| WRONG |" in md and "kernel exploded" in md


def test_full_size_check_catches_what_bounded_inputs_miss():
    spec = SPECS["swiglu"]
    case = first_case("swiglu", torch.float32)
    go = harness.grad_outputs(spec.reference(*case.args))
    want = harness.step(spec.reference, spec, harness.clone_args(case.args), go)

    def off_in_last_row(gate, up):
        out = spec.reference(gate, up)
        return torch.cat([out[..., :-1, :], out[..., -1:, :] * 3], dim=-2) if out.shape[-2] > 1 else out

    got = harness.step(off_in_last_row, spec, harness.clone_args(case.args), go)
    verdict = harness.compare(got, want, spec.tolerance(torch.float32))
    assert not verdict["ok"] and "out" in verdict["reason"]
    assert harness.compare(want, want, spec.tolerance(torch.float32))["ok"]


# ----------------------------------------------------------------------------- work formulas
def test_attended_pairs():
    assert harness.attended_pairs(8, True, None, None) == 8 * 9 // 2
    assert harness.attended_pairs(8, False, None, None) == 64
    assert harness.attended_pairs(8, True, 3, None) == 1 + 2 + 3 * 6  # each query sees at most 3 keys
    cu = torch.tensor([0, 3, 8])
    assert harness.attended_pairs(8, True, None, cu) == 6 + 15  # two packed sequences of 3 and 5
    assert harness.attended_pairs(5, False, 2, None) == 5 + 2 * 4  # |i - j| < 2


def test_work_formulas():
    x = torch.zeros(4096, 4096, dtype=torch.bfloat16, requires_grad=True)
    w = torch.zeros(4096, dtype=torch.bfloat16, requires_grad=True)
    rms = harness.work_rms_norm((x, w, 1e-6, 0.0))
    X, W = x.numel() * 2, w.numel() * 2
    assert rms["metric"] == "GB/s" and rms["fwd"] == 2 * X + W and rms["fwd_bwd"] == 5 * X + 3 * W
    hidden = torch.zeros(8, 16, requires_grad=True)
    lm_head = torch.zeros(100, 16)
    labels = torch.zeros(8, dtype=torch.long)
    lce = harness.work_linear_cross_entropy((hidden, lm_head, labels, None, -100, "mean", None, 1.0))
    assert lce["metric"] == "TFLOP/s" and lce["fwd_bwd"] == 2 * lce["fwd"] == 2 * (2 * 8 * 16 * 100)
    lce3 = harness.work_linear_cross_entropy((hidden, lm_head.requires_grad_(), labels, None, -100, "mean", None, 1.0))
    assert lce3["fwd_bwd"] == 3 * lce["fwd"]  # trainable W: a third GEMM
    m, k, n, r = 16, 64, 48, 4
    xl = torch.zeros(m, k, requires_grad=True)
    a, b = torch.zeros(r, k, requires_grad=True), torch.zeros(n, r, requires_grad=True)
    lora = harness.work_lora_linear((xl, torch.zeros(n, k), a, b, 2.0, None))
    assert lora["fwd"] == 2 * m * n * k + 2 * m * r * (k + n)
    assert lora["fwd_bwd"] == 4 * m * n * k + 6 * m * r * (k + n)
    assert harness.work_base_gemm((xl, torch.zeros(n, k)))["fwd_bwd"] == 4 * m * n * k
    logits = torch.zeros(8, 100, dtype=torch.bfloat16, requires_grad=True)
    ce = harness.work_cross_entropy((logits, labels, -100, "mean", None, 1.0))
    assert ce["fwd_bwd"] - ce["fwd"] == logits.numel() * 2  # the gradient written once


def test_cases_cover_headline_shapes_without_duplicates():
    for op in OPS:
        cases = harness.cases_for(op, CPU, torch.bfloat16, "small", quick=False)
        sigs = [harness.signature(c.args) for c in cases]
        assert len(sigs) == len(set(sigs)), op
        assert cases[0].headline
        spec = SPECS[op]
        for c in cases:
            grads = {n for n, a in zip(spec.parameters, c.args, strict=False) if harness._rg(a)}
            assert grads == set(harness.GRADS[op]) & set(spec.differentiable) & {
                n for n, a in zip(spec.parameters, c.args, strict=False) if isinstance(a, torch.Tensor)}, (op, c.label)
    lora = [c for c in harness.cases_for("lora_linear", CPU, torch.bfloat16, "small", quick=False) if c.headline]
    assert sum("nf4" in c.label for c in lora) == 4 and sum("nf4" not in c.label for c in lora) == 4
    rope = harness.cases_for("rope", CPU, torch.bfloat16, "small", quick=True)
    assert [c.label.endswith("HF layout") for c in rope] == [False, True]
    assert rope[1].args[0].transpose(1, 2).is_contiguous()


def test_static_compile_has_its_own_code_object():
    ref = SPECS["rms_norm"].reference
    compiled = peers.static_compiled(ref)
    orig = getattr(compiled, "_torchdynamo_orig_callable", None) or getattr(compiled, "__wrapped__", None)
    assert orig is not None and orig.__code__ is not ref.__code__ and orig.__code__.co_code == ref.__code__.co_code


def test_report_ratios_and_ceilings():
    results = {"meta": {"dtype": "bfloat16"}, "ceilings": {"copy": {"gbps": 1000.0},
                                                           "matmul": {"bfloat16": {"tflops": 500.0, "n": 8}}},
               "cases": [{"op": "swiglu", "label": "t", "work": {"metric": "GB/s", "fwd": 1e9, "fwd_bwd": 2e9},
                          "rows": [
                              {"system": "eager", "role": "eager", "status": "ok", "fwd_bwd_ms": 4.0, "fwd_ms": 2.0},
                              {"system": "slipstream", "role": "slipstream", "status": "ok", "fwd_bwd_ms": 2.0,
                               "fwd_ms": 1.0, "chosen": "x"},
                              {"system": "liger", "role": "peer", "status": "ok", "fwd_bwd_ms": 3.0, "fwd_ms": 1.0},
                              {"system": "compile", "role": "compile", "status": "WRONG", "fwd_bwd_ms": 1.0,
                               "fwd_ms": 0.5}]}]}
    report.derive(results)
    rows = {r["system"]: r for r in results["cases"][0]["rows"]}
    slip = rows["slipstream"]
    assert slip["achieved"] == pytest.approx(1000.0) and slip["pct_ceiling"] == pytest.approx(100.0)
    assert slip["vs_eager"] == pytest.approx(2.0) and slip["vs_peer"] == pytest.approx(1.5)
    assert slip["vs_compile"] is None and rows["compile"]["rank"] is None  # a WRONG row is no baseline
    assert [rows[n]["rank"] for n in ("slipstream", "liger", "eager")] == [1, 2, 3]
    assert "slipstream" in report.compact_table(results)
