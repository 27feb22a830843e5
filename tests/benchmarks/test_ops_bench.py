"""The op benchmark harness (benchmarks/ops) on the CPU, at small sizes.

* one pytest-benchmark per op on the reference and on the dispatched op: ``benchmark(step, ...)``
  times a forward+backward exactly as ``run.py`` does; the result it returns is then judged
  against the float64 reference, so with ``--benchmark-disable`` (the default) these still run
  once as correctness tests. ``pytest tests/benchmarks --benchmark-enable`` gives the timings.
* ``run.py --device cpu --size small --quick`` end to end (results.json / results.md, < 60 s),
  and ``report.py`` regenerating the same Markdown from the JSON.
* the harness's own logic: work formulas, the correctness guard (a wrong implementation is
  reported WRONG and not ranked, a raising one is recorded and the run goes on), ratios.
* the CUDA-graph timing's plumbing: ``graph_ms`` is None off CUDA with the reason recorded,
  ``--no-graph``, a failing graph timing never costing a row its other numbers, and the report
  with, without and with partial graph timings (the CUDA path itself needs a GPU).
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

from benchmarks.ops import ceilings, peers, report
from benchmarks.ops import run as harness
from slipstream.dispatch.verify import Oracle, detached
from slipstream.ops import SPECS

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
OPS = list(SPECS)
assert set(OPS) == set(harness.WORK), "every op needs benchmark cases and a work formula"


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
                           "--quick", "--ops", ",".join(OPS), "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True,
                          timeout=300)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 120, f"CPU quick run took {elapsed:.0f} s"  # ~20 s alone; CI runs two test workers
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["device"] and results["meta"]["versions"]["torch"] == torch.__version__
    assert results["ceilings"]["copy"]["gbps"] > 0 and results["ceilings"]["matmul"]["bfloat16"]["tflops"] > 0
    assert {c["op"] for c in results["cases"]} == set(OPS)
    for case in results["cases"]:
        assert case["error"] is None, (case["op"], case["error"])
        rows = {r["system"]: r for r in case["rows"]}
        for name in ("eager", "slipstream"):
            assert rows[name]["status"] == "ok" and rows[name]["fwd_bwd_ms"] > 0 and rows[name]["fwd_ms"] > 0, name
            assert rows[name]["graph_ms"] is None and "CUDA" in rows[name]["graph_reason"], rows[name]
        assert rows["slipstream"]["chosen"] and rows["slipstream"]["verify"]["ok"]
        assert rows["liger"]["status"] == "n/a"  # Liger needs a GPU
        assert rows["compile"]["status"] == "skipped"
        assert case["summary"]["vs_eager"] is not None and rows["eager"]["rank"] is not None
        if case["op"] == "lora_linear":
            assert rows["peft"]["status"] == "ok", rows["peft"]
            assert rows["base_gemm"]["status"] == "ok" and rows["base_gemm"]["rank"] is None
        if case["op"] == "lora_linear_group":  # the ungrouped path it replaces, checked against eager in full
            assert rows["separate"]["status"] == "ok" and rows["separate"]["full_check"]["ok"], rows["separate"]
            assert rows["base_gemm"]["status"] == "ok" and rows["base_gemm"]["rank"] is None
    assert sum(c["op"] == "lora_linear" and "nf4" in c["label"] for c in results["cases"]) == 1
    assert results["meta"]["graph"]["enabled"] is False
    md = (out / "results.md").read_text()
    for op in OPS:
        assert f"## {op}" in md
    assert "GPU ms (graph)" not in md and "slip GPU ms" not in proc.stdout  # no graph timings, no columns
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


# ----------------------------------------------------------------------------- CUDA-graph timing
def _runner(**kw) -> harness.Runner:
    return harness.Runner(CPU, torch.float32, quick=True, compile_mode="none", compile_budget_s=0, time_limit_s=600,
                          timing={"warmup_ms": 1.0, "rep_ms": 2.0}, log=lambda msg: None, **kw)


def test_graph_ms_is_none_off_cuda():
    calls = []
    assert ceilings.graph_ms(lambda: calls.append(1), CPU) is None
    assert calls == []  # nothing was warmed up or captured


def test_graph_iters():
    assert harness.graph_iters(0.3, 100.0, 10) == 20  # small op: the cap
    assert harness.graph_iters(2.0, 100.0, 10) == 5
    assert harness.graph_iters(50.0, 100.0, 10) == 1  # slow call: one per graph, never 0
    assert harness.graph_iters(None, 100.0, 10) == harness.GRAPH_MAX_ITERS
    assert harness.graph_iters(0.0, 100.0, 10, max_iters=7) == 7


def test_runner_records_why_there_is_no_graph_time_on_the_cpu():
    case = first_case("rms_norm", torch.float32)
    for runner, why in ((_runner(), "CUDA graphs need a CUDA device"), (_runner(graph=False), "--no-graph")):
        record = runner.run_case(case)
        rows = {r["system"]: r for r in record["rows"]}
        timed = [r for r in rows.values() if r["fwd_bwd_ms"] is not None]
        assert {"eager", "slipstream"} <= {r["system"] for r in timed}
        for r in timed:
            assert r["status"] == "ok" and r["graph_ms"] is None and why in r["graph_reason"], r
        for r in rows.values():
            if r["fwd_bwd_ms"] is None:  # not timed (n/a, skipped): no graph attempt, no reason
                assert r["graph_ms"] is None and r["graph_reason"] == "", r


@pytest.mark.parametrize("outcome", ["ok", "capture", "other", "oom"])
def test_graph_timing_failure_never_costs_the_row(monkeypatch, outcome):
    monkeypatch.delenv("SLIPSTREAM_STRICT", raising=False)
    seen = []

    def fake_graph_ms(fn, device, *, iters_per_graph, replays):
        seen.append({"strict": os.environ.get("SLIPSTREAM_STRICT"), "iters": iters_per_graph, "replays": replays})
        fn()  # the fwd+bwd step the runner captures must run
        if outcome == "capture":
            raise ceilings.GraphCaptureError("capture failed: host sync")
        if outcome == "other":
            raise RuntimeError("weird\nsecond line")
        if outcome == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory in the graph pool")
        return 0.125

    monkeypatch.setattr(ceilings, "graph_ms", fake_graph_ms)
    record = _runner().run_case(first_case("rms_norm", torch.float32))
    rows = {r["system"]: r for r in record["rows"]}
    assert record["error"] is None and seen
    assert all(s["strict"] == "1" and 1 <= s["iters"] <= harness.GRAPH_MAX_ITERS
               and s["replays"] == harness.GRAPH["quick"]["replays"] for s in seen)
    assert "SLIPSTREAM_STRICT" not in os.environ  # restored after each graph timing
    for name in ("eager", "slipstream"):
        r = rows[name]
        assert r["status"] == "ok" and r["fwd_bwd_ms"] > 0 and r["fwd_ms"] > 0, r
        want = {"ok": (0.125, ""), "capture": (None, "capture failed: host sync"),
                "other": (None, "RuntimeError: weird"),
                "oom": (None, "OutOfMemoryError: CUDA out of memory in the graph pool")}[outcome]
        assert (r["graph_ms"], r["graph_reason"]) == want, r


def test_run_no_graph_flag(tmp_path):
    assert harness.parse_args(["--out", "x", "--no-graph"]).no_graph
    assert not harness.parse_args(["--out", "x"]).no_graph
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SLIPSTREAM_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/ops/run.py"), "--device", "cpu", "--size", "small",
                           "--quick", "--ops", "rms_norm", "--no-graph", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {r["system"]: r for r in results["cases"][0]["rows"]}
    assert results["meta"]["graph"]["enabled"] is False
    assert rows["eager"]["graph_ms"] is None and rows["eager"]["graph_reason"] == "off (--no-graph)"


def _graph_results() -> dict:
    """One memory-bound case: rows with a graph time, one whose capture failed, one from an old
    results.json (no graph keys at all); and a case that failed before any row."""
    return {"meta": {"dtype": "bfloat16", "graph": {"enabled": True, "replays": 10, "max_iters": 20}},
            "ceilings": {"copy": {"gbps": 4000.0}, "matmul": {"bfloat16": {"tflops": 500.0, "n": 8}}},
            "cases": [{"op": "rms_norm", "label": "t", "work": {"metric": "GB/s", "fwd": 1e9, "fwd_bwd": 2e9},
                       "rows": [
                           {"system": "eager", "role": "eager", "status": "ok", "fwd_bwd_ms": 4.0, "fwd_ms": 2.0,
                            "graph_ms": 2.0, "graph_reason": ""},
                           {"system": "slipstream", "role": "slipstream", "status": "ok", "fwd_bwd_ms": 2.0,
                            "fwd_ms": 1.0, "chosen": "x", "graph_ms": 1.0, "graph_reason": ""},
                           {"system": "liger", "role": "peer", "status": "ok", "fwd_bwd_ms": 3.0, "fwd_ms": 1.0,
                            "graph_ms": None, "graph_reason": "capture failed: host sync"},
                           {"system": "old", "role": "candidate", "status": "ok", "fwd_bwd_ms": 2.5,
                            "fwd_ms": 1.0}]},
                      {"op": "swiglu", "label": "u", "rows": [], "error": "building cases failed: boom"}]}


def _table(md: str, first_cell: str) -> list[list[str]]:
    """The Markdown table whose header starts with ``first_cell``, as rows of cells."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def test_report_graph_columns_and_throughput():
    results = report.derive(_graph_results())
    rows = {r["system"]: r for r in results["cases"][0]["rows"]}
    assert rows["slipstream"]["graph_achieved"] == pytest.approx(2000.0)  # 2e9 bytes / 1 ms
    assert rows["slipstream"]["graph_pct_ceiling"] == pytest.approx(50.0)
    assert rows["slipstream"]["pct_ceiling"] == pytest.approx(25.0)  # the event-timed numbers are unchanged
    assert rows["liger"]["graph_achieved"] is None and rows["old"]["graph_pct_ceiling"] is None
    assert [rows[n]["rank"] for n in ("slipstream", "old", "liger", "eager")] == [1, 2, 3, 4]  # ranked by events
    s = results["cases"][0]["summary"]
    assert s["slipstream_graph_ms"] == 1.0 and s["eager_graph_ms"] == 2.0
    assert s["graph_pct_ceiling"] == pytest.approx(50.0)

    md = report.markdown(results)
    table = _table(md, "#")
    head = table[0]
    assert head[3:9] == ["fwd+bwd ms", "fwd ms", "GPU ms (graph)", "GB/s", "% ceil", "% ceil (graph)"]
    cells = {r[1]: dict(zip(head, r, strict=True)) for r in table[1:]}
    assert cells["**slipstream**"]["GPU ms (graph)"] == "1.0000" and cells["**slipstream**"]["% ceil (graph)"] == "50.0"
    assert cells["liger"]["GPU ms (graph)"] == "-" and "no graph: capture failed: host sync" in cells["liger"]["note"]
    assert cells["`old`"]["GPU ms (graph)"] == "-" and "no graph" not in cells["`old`"]["note"]
    summary = _table(md, "op")
    assert summary[0][-3:] == ["slip GPU ms", "GPU % ceiling", "tuning s"]
    assert all(len(r) == len(summary[0]) for r in summary)  # the failed case's line is padded to the new width
    line = dict(zip(summary[0], summary[1], strict=True))
    assert line["slip GPU ms"] == "1.000" and line["GPU % ceiling"] == "50.0% BW"
    compact = report.compact_table(results)
    assert "slip GPU ms" in compact and "CUDA-graph replay" in compact


def test_report_renders_results_without_graph_timings():
    old = _graph_results()
    del old["meta"]["graph"]
    for case in old["cases"]:
        for r in case["rows"]:
            r.pop("graph_ms", None)
            r.pop("graph_reason", None)
    results = report.derive(old)
    md = report.markdown(results)
    assert _table(md, "#")[0] == ["#", "system", "status", "fwd+bwd ms", "fwd ms", "GB/s", "% ceil", "peak MiB",
                                  "x eager", "x compile", "x liger", "rel err", "first call s", "note"]
    assert _table(md, "op")[0] == report.SUMMARY_HEAD
    assert "graph" not in md.lower() and "GPU ms" not in report.compact_table(results)
    # graph keys present but empty everywhere (a CPU run, --no-graph, every capture failed): same tables
    for case in old["cases"]:
        for r in case["rows"]:
            r.update(graph_ms=None, graph_reason="CUDA graphs need a CUDA device (this run: cpu)")
    assert report.markdown(report.derive(old)) == md
