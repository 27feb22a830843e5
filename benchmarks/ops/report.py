#!/usr/bin/env python3
"""Turn an op-benchmark results.json into results.md, results.png and a compact table.

    python benchmarks/ops/report.py RESULTS.json [--out DIR]

``run.py`` calls the same functions, so regenerating from a fetched results.json gives the same
Markdown. Derived numbers (GB/s or TFLOP/s, % of ceiling, ratios, ranks) are recomputed here from
the raw timings and the per-op work recorded in the JSON. Ranks and ratios use the event-timed
fwd+bwd (``fwd_bwd_ms``); where rows carry CUDA-graph timings (``graph_ms``, GPU time without host
overhead) the tables gain their columns and throughput / % of ceiling is derived from them too
(``graph_achieved``, ``graph_pct_ceiling``). Results without ``graph_ms`` render as before.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PEER = {"lora_linear": "peft", "lora_linear_group": "separate", "attention": "sdpa"}  # compared with (default: liger)
ROLE_ORDER = {"slipstream": 0, "eager": 1, "compile": 2, "peer": 3, "ceiling": 4, "candidate": 5}
SCALE = {"GB/s": 1e6, "TFLOP/s": 1e9}  # work per ms -> unit: bytes/ms/1e6 = GB/s, FLOP/ms/1e9 = TFLOP/s


# ----------------------------------------------------------------------------- deriving
def ceiling_for(results: dict, metric: str) -> float | None:
    c = results.get("ceilings") or {}
    if metric == "GB/s":
        return (c.get("copy") or {}).get("gbps")
    mm = c.get("matmul") or {}
    entry = mm.get(results.get("meta", {}).get("dtype", "bfloat16")) or mm.get("bfloat16") or {}
    return entry.get("tflops")


def _ok_ms(row: dict | None) -> float | None:
    if row is None or row.get("status") != "ok":
        return None
    return row.get("fwd_bwd_ms") or None


def _ok_graph_ms(row: dict | None) -> float | None:
    if row is None or row.get("status") != "ok":
        return None
    return row.get("graph_ms") or None


def has_graph(results: dict) -> bool:
    """Whether any row has a CUDA-graph timing (the graph columns are shown only then)."""
    return any(r.get("graph_ms") for c in results.get("cases", []) for r in c.get("rows") or [])


def peer_name(op: str) -> str:
    return PEER.get(op, "liger")


def derive(results: dict) -> dict:
    """Fill in achieved throughput, % of ceiling, ratios and ranks (idempotent)."""
    for case in results.get("cases", []):
        rows = case.get("rows") or []
        by = {r["system"]: r for r in rows}
        eager, comp, peer = _ok_ms(by.get("eager")), _ok_ms(by.get("compile")), _ok_ms(by.get(peer_name(case["op"])))
        for r in rows:
            work = r.get("work") or case.get("work") or {}
            metric = work.get("metric")
            scale = SCALE.get(metric)
            ceiling = ceiling_for(results, metric) if metric else None
            ms, fms = r.get("fwd_bwd_ms"), r.get("fwd_ms")
            r["metric"] = metric
            r["achieved"] = work["fwd_bwd"] / ms / scale if scale and ms and work.get("fwd_bwd") else None
            r["achieved_fwd"] = work["fwd"] / fms / scale if scale and fms and work.get("fwd") else None
            r["pct_ceiling"] = 100 * r["achieved"] / ceiling if r["achieved"] and ceiling else None
            gms = r.get("graph_ms")
            r["graph_achieved"] = work["fwd_bwd"] / gms / scale if scale and gms and work.get("fwd_bwd") else None
            r["graph_pct_ceiling"] = (100 * r["graph_achieved"] / ceiling if r["graph_achieved"] and ceiling
                                      else None)
            good = r.get("status") == "ok" and ms
            r["vs_eager"] = eager / ms if good and eager else None
            r["vs_compile"] = comp / ms if good and comp else None
            r["vs_peer"] = peer / ms if good and peer else None
            r["rank"] = None
        ranked = sorted((r for r in rows if r.get("status") == "ok" and r.get("fwd_bwd_ms")
                         and r.get("role") != "ceiling"), key=lambda r: r["fwd_bwd_ms"])
        for i, r in enumerate(ranked):
            r["rank"] = i + 1
        cands = [r for r in ranked if r.get("role") == "candidate"]
        slip = by.get("slipstream") or {}
        case["summary"] = {
            "chosen": slip.get("chosen"), "slipstream_ms": _ok_ms(slip), "slipstream_status": slip.get("status"),
            "tuning_s": slip.get("tuning_s"), "eager_ms": eager, "compile_ms": comp, "peer": peer_name(case["op"]),
            "peer_ms": peer, "best": ranked[0]["system"] if ranked else None,
            "best_ms": ranked[0]["fwd_bwd_ms"] if ranked else None,
            "best_candidate": cands[0]["system"] if cands else None,
            "best_candidate_ms": cands[0]["fwd_bwd_ms"] if cands else None,
            "vs_eager": slip.get("vs_eager"), "vs_compile": slip.get("vs_compile"), "vs_peer": slip.get("vs_peer"),
            "pct_ceiling": slip.get("pct_ceiling"), "metric": (case.get("work") or {}).get("metric"),
            "slipstream_graph_ms": _ok_graph_ms(slip), "eager_graph_ms": _ok_graph_ms(by.get("eager")),
            "graph_pct_ceiling": slip.get("graph_pct_ceiling") if _ok_graph_ms(slip) else None,
            "peak_mib": slip.get("peak_mib"), "peer_peak_mib": (by.get(peer_name(case["op"])) or {}).get("peak_mib"),
            "wrong": sorted(r["system"] for r in rows if r.get("status") == "WRONG"),
        }
    return results


def by_op(results: dict) -> list[dict]:
    """Cases grouped by op (ops in order of first appearance, cases in run order)."""
    cases = results.get("cases", [])
    first: dict[str, int] = {}
    for i, c in enumerate(cases):
        first.setdefault(c["op"], i)
    return sorted(cases, key=lambda c: first[c["op"]])


# ----------------------------------------------------------------------------- formatting
def _f(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) < 0.1:
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    return str(v)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def ceiling_text(ceilings: dict) -> str:
    if not ceilings:
        return "not measured"
    if "error" in ceilings and "copy" not in ceilings:
        return f"failed: {ceilings['error']}"
    parts = []
    copy = ceilings.get("copy") or {}
    parts.append(f"copy {copy['gbps']:.0f} GB/s" if "gbps" in copy else f"copy failed ({copy.get('error')})")
    for dt, mm in (ceilings.get("matmul") or {}).items():
        parts.append(f"{dt} matmul {mm['n']}^3 {mm['tflops']:.0f} TFLOP/s" if "tflops" in mm
                     else f"{dt} matmul failed ({mm.get('error')})")
    return ", ".join(parts)


def short(label: str | None, width: int = 44) -> str:
    if not label:
        return "-"
    return label if len(label) <= width else label[: width - 1] + "…"


def _esc(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def rel_err(row: dict) -> str:
    """Worst norm-wise relative error over outputs and gradients: bounded check, else the full-size one."""
    for check in ("verify", "full_check"):
        errs = (row.get(check) or {}).get("errors") or {}
        if errs:
            return f"{max(errs.values()):.1e}"
    return "-"


def ordered_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (ROLE_ORDER.get(r.get("role"), 9),
                                       r.get("fwd_bwd_ms") if r.get("role") == "candidate" and r.get("fwd_bwd_ms")
                                       else float("inf"), r.get("system", "")))


def _pct(pct: float | None, metric: str | None) -> str:
    return f"{_f(pct, 1)}% {'BW' if metric == 'GB/s' else 'MM'}" if pct else "-"


def summary_rows(results: dict) -> list[list[str]]:
    graph = has_graph(results)
    width = len(summary_head(results))
    out = []
    for case in by_op(results):
        s = case.get("summary") or {}
        if case.get("error") and not case.get("rows"):
            what = "skipped" if str(case["error"]).startswith("skipped") else "error"
            out.append([case["op"], short(case.get("label"), 34), what, short(case["error"], 60)] + [""] * (width - 4))
            continue
        slip = _f(s.get("slipstream_ms")) if s.get("slipstream_ms") else (s.get("slipstream_status") or "-")
        row = [case["op"], short(case.get("label"), 34), short(s.get("chosen"), 40), slip,
               _f(s.get("eager_ms")), _f(s.get("compile_ms")),
               f"{_f(s.get('peer_ms'))} ({s.get('peer')})" if s.get("peer_ms") else "n/a",
               _x(s.get("vs_eager")), _x(s.get("vs_compile")), _x(s.get("vs_peer")),
               _pct(s.get("pct_ceiling"), s.get("metric"))]
        if graph:
            row += [_f(s.get("slipstream_graph_ms")), _pct(s.get("graph_pct_ceiling"), s.get("metric"))]
        out.append([*row, _f(s.get("tuning_s"), 2)])
    return out


SUMMARY_HEAD = ["op", "case", "slipstream chose", "slip ms", "eager ms", "compile ms", "peer ms", "x eager",
                "x compile", "x peer", "% ceiling", "tuning s"]
SUMMARY_GRAPH_HEAD = ["slip GPU ms", "GPU % ceiling"]  # after "% ceiling", where rows have graph_ms


def summary_head(results: dict) -> list[str]:
    if not has_graph(results):
        return list(SUMMARY_HEAD)
    return [*SUMMARY_HEAD[:-1], *SUMMARY_GRAPH_HEAD, SUMMARY_HEAD[-1]]


def compact_table(results: dict) -> str:
    """Plain-text table, one line per case: fwd+bwd ms of slipstream and the baselines, speedups."""
    head = summary_head(results)
    rows = [head] + summary_rows(results)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    meta = results.get("meta", {})
    head = (f"fwd+bwd median ms on {meta.get('device')} ({meta.get('dtype')}, size {meta.get('size')}); "
            f"x = other / slipstream (>1: slipstream faster); ceilings: {ceiling_text(results.get('ceilings'))}")
    if has_graph(results):
        head += "; GPU ms = CUDA-graph replay (no host overhead)"
    return head + "\n" + "\n".join(lines)


def markdown(results: dict) -> str:
    meta = results.get("meta", {})
    v = meta.get("versions", {})
    lines = [f"# slipstream op benchmark: {meta.get('device')}", ""]
    lines.append(f"- date: {meta.get('date')}; host {meta.get('host')}; {meta.get('device_info')}")
    lines.append("- versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v) if v[k]))
    timing = meta.get("timing") or {}
    lines.append(f"- dtype {meta.get('dtype')}, size {meta.get('size')}{', quick' if meta.get('quick') else ''}; "
                 f"timing: {timing.get('method')}, warmup {timing.get('warmup_ms')} ms, rep {timing.get('rep_ms')} ms; "
                 f"torch.compile: {meta.get('compile_mode')} "
                 f"(budget {meta.get('compile_budget_s')} s, spent {_f(meta.get('compile_s'), 1)} s)")
    graph = has_graph(results)
    g = meta.get("graph") or {}
    if graph or g.get("enabled"):
        lines.append(f"- GPU ms (graph): {g.get('method') or 'CUDA-graph replay'}; up to {g.get('max_iters')} calls "
                     f"per graph, {g.get('replays')} timed replays, ~{g.get('budget_ms')} ms of replay per row")
    lines.append(f"- ceilings (same run): {ceiling_text(results.get('ceilings'))}")
    lines.append(f"- wall time {_f(meta.get('wall_s'), 1)} s; slipstream tuning total {_f(meta.get('tuning_s'), 1)} s")
    lines += ["", "Times are forward+backward medians unless marked fwd. `x eager` etc. = that system's time / this "
              "row's (>1: this row is faster). `% ceil` = achieved GB/s of the copy ceiling (memory-bound ops) or "
              "TFLOP/s of the matmul ceiling (matmul-bearing ops). WRONG rows failed the correctness guard and are "
              "not ranked. See benchmarks/ops/README.md for every column."]
    if graph:
        lines[-1] += (" `GPU ms (graph)` = the same fwd+bwd replayed from a CUDA graph: GPU time without the "
                      "host's overhead (Python, autograd, launches), which the event-timed columns include where "
                      "the host is the bottleneck; `% ceil (graph)` is computed from it. Ranks and ratios use "
                      "the event-timed fwd+bwd.")
    lines += ["", "## Summary", ""]
    shead = summary_head(results)
    lines.append("| " + " | ".join(shead) + " |")
    lines.append("|" + "---|" * len(shead))
    for r in summary_rows(results):
        lines.append("| " + " | ".join(_esc(c) for c in r) + " |")
    current = None
    for case in by_op(results):
        if case["op"] != current:
            current = case["op"]
            lines += ["", f"## {current}"]
        work = case.get("work") or {}
        lines += ["", f"### {case['op']}: {case.get('label')}{' (headline)' if case.get('headline') else ''}", ""]
        if case.get("shapes"):
            lines.append(f"- inputs: `{case['shapes']}`; gradients for {', '.join(case.get('grads') or []) or '-'}")
        if case.get("note"):
            lines.append(f"- {case['note']}")
        if work:
            lines.append(f"- work: {work.get('formula')}; fwd+bwd {work.get('fwd_bwd'):.4g} "
                         f"{'bytes' if work.get('metric') == 'GB/s' else 'FLOP'}")
        d = case.get("decision") or {}
        if d:
            lines.append(f"- slipstream chose `{d.get('chosen')}` ({d.get('mode')}; "
                         f"tuning {_f(d.get('tuning_s'), 2)} s)")
        if case.get("error"):
            lines.append(f"- **error**: {_esc(case['error'])}")
        rows = case.get("rows") or []
        if not rows:
            continue
        metric = work.get("metric") or "-"
        head = ["#", "system", "status", "fwd+bwd ms", "fwd ms", metric, "% ceil", "peak MiB", "x eager",
                "x compile", f"x {peer_name(case['op'])}", "rel err", "first call s", "note"]
        if graph:
            head[5:7] = ["GPU ms (graph)", metric, "% ceil", "% ceil (graph)"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in ordered_rows(rows):
            note = r.get("reason") or ""
            if r.get("system") == "slipstream" and r.get("chosen"):
                note = f"chose {r['chosen']}" + (f"; {note}" if note else "")
            if graph and r.get("fwd_bwd_ms") and not r.get("graph_ms") and r.get("graph_reason"):
                note += f"{'; ' if note else ''}no graph: {r['graph_reason']}"
            name = f"**{r['system']}**" if r.get("role") == "slipstream" else f"`{r['system']}`" \
                if r.get("role") == "candidate" else r["system"]
            cells = [r.get("rank") or "", name, r.get("status"), _f(r.get("fwd_bwd_ms"), 4), _f(r.get("fwd_ms"), 4),
                     _f(r.get("achieved"), 1), _f(r.get("pct_ceiling"), 1), _f(r.get("peak_mib"), 1),
                     _x(r.get("vs_eager")), _x(r.get("vs_compile")), _x(r.get("vs_peer")), rel_err(r),
                     _f(r.get("first_call_s"), 2), short(note, 160 if graph else 120)]
            if graph:
                cells[5:7] = [_f(r.get("graph_ms"), 4), cells[5], cells[6], _f(r.get("graph_pct_ceiling"), 1)]
            lines.append("| " + " | ".join(_esc(c) for c in cells) + " |")
        skipped = [c for c in case.get("not_candidates") or [] if c.get("status") != "skipped"
                   or "not for" not in (c.get("reason") or "")]
        if skipped:
            lines.append("")
            lines.append("Not candidates here: " + "; ".join(f"`{c['label']}` ({c['reason']})" for c in skipped))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plot
COLORS = {"slipstream": "#1f77b4", "eager": "#222222", "compile": "#ff7f0e", "liger": "#2ca02c", "peft": "#9467bd",
          "sdpa": "#17becf", "base_gemm": "#8c564b", "separate": "#bcbd22"}


def plot(results: dict, path: Path) -> bool:
    """Per case, horizontal log-scale bars of fwd+bwd ms for every system that ran; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception:  # noqa: BLE001 - no plot without matplotlib; report.py can redo it elsewhere
        return False
    cases = [c for c in by_op(results) if any(r.get("fwd_bwd_ms") for r in c.get("rows") or [])]
    if not cases:
        return False
    ncols = 2 if len(cases) > 1 else 1
    nrows = -(-len(cases) // ncols)
    heights = [max(len([r for r in c["rows"] if r.get("fwd_bwd_ms")]) for c in cases[i * ncols:(i + 1) * ncols])
               for i in range(nrows)]
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, sum(0.28 * h + 1.2 for h in heights)),
                             gridspec_kw={"height_ratios": [0.28 * h + 1.2 for h in heights]}, squeeze=False)
    for ax in axes.flat[len(cases):]:
        ax.axis("off")
    for ax, case in zip(axes.flat, cases, strict=False):
        rows = [r for r in ordered_rows(case["rows"]) if r.get("fwd_bwd_ms")]
        names = [short(r["system"], 48) + ("" if r.get("status") == "ok" else f" [{r.get('status')}]") for r in rows]
        vals = [r["fwd_bwd_ms"] for r in rows]
        colors = [COLORS.get(r["system"], "#bbbbbb") for r in rows]
        bars = ax.barh(range(len(rows)), vals, color=colors)
        for bar, r in zip(bars, rows, strict=True):
            if r.get("status") != "ok":
                bar.set_hatch("//")
                bar.set_edgecolor("red")
        ax.set_yticks(range(len(rows)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("fwd+bwd ms (log)", fontsize=8)
        ax.set_title(f"{case['op']}: {short(case.get('label'), 60)}", fontsize=9)
        ax.set_xlim(min(vals) / 3, max(vals) * 3)  # at least a decade: every bar visible, major ticks labelled
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for i, val in enumerate(vals):
            ax.text(val, i, f" {val:.3g}", va="center", fontsize=6)
    meta = results.get("meta", {})
    fig.suptitle(f"slipstream ops on {meta.get('device')} ({meta.get('dtype')}, size {meta.get('size')})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.99))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_all(results: dict, out: Path) -> list[Path]:
    """results.md and results.png (if matplotlib is there) under ``out``; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    derive(results)
    md = out / "results.md"
    md.write_text(markdown(results))
    written = [md]
    png = out / "results.png"
    try:
        if plot(results, png):
            written.append(png)
    except Exception as exc:  # noqa: BLE001 - the tables matter more than the picture
        print(f"plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="rebuild results.md and results.png from an op-benchmark results.json")
    ap.add_argument("results", help="results.json written by benchmarks/ops/run.py")
    ap.add_argument("--out", default=None, help="directory for results.md / results.png (default: next to the json)")
    a = ap.parse_args(argv)
    src = Path(a.results)
    results = json.loads(src.read_text())
    written = write_all(results, Path(a.out) if a.out else src.parent)
    print(compact_table(results))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
