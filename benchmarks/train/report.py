#!/usr/bin/env python3
"""Collect W8B result lines (``*.jsonl`` from run_all.sh / w8b.py / gpu_baseline.py) into one table.

    python benchmarks/train/report.py benchmarks/results/h100-2026-11-23/train

Writes ``results.json`` (every row, normalised), ``results.md`` (tokens/s and peak GiB per system and
base, with ratios to plain transformers + peft and the issue's targets) and ``results.png`` in the
same folder. The peers' rows come from ``../shared/peers/gpu_baseline.py`` (``variant`` hf, liger,
hf4, liger4) and ``../shared/peers/unsloth_bench.py`` (``variant`` unsloth); slipstream's from
``w8b.py`` (``system`` slipstream).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PEER_NAMES = {"hf": ("transformers + peft", "bf16"), "liger": ("Liger-Kernel 0.8.5", "bf16"),
              "hf4": ("transformers + peft", "nf4"), "liger4": ("Liger-Kernel 0.8.5", "nf4")}
# The targets for slipstream (H100 80GB, W8B): (tok/s at least, peak GiB at most).
TARGETS = {("checkpointing on", "bf16"): (11_700, 16.5), ("checkpointing on", "nf4"): (10_800, 7.0),
           ("auto, <= 23.4 GiB", "bf16"): (13_500, 23.4)}
# Long context (batch 1, NF4 base): at least this many tokens, one optimiser step in under this many seconds.
LONG_TARGET = (256 * 1024, 180.0)


def normalise(row: dict) -> dict:
    """One row: system, setting, base, tok_s, peak_gib, step_s and the raw line."""
    if row.get("variant") == "unsloth":  # ../shared/peers/unsloth_bench.py
        gc = row.get("gc")
        setting = "checkpointing on (offloaded)" if gc == "unsloth" else f"gradient checkpointing {gc}"
        return {"system": "Unsloth", "setting": setting, "base": "nf4" if row.get("load_in_4bit") else "bf16",
                "tok_s": row.get("tok_s"), "peak_gib": row.get("peak_gib"), "step_s": row.get("step_s"),
                "error": row.get("error"), "run": row.get("run", row.get("loan", "-")), "raw": row}
    if "variant" in row:
        name, base = PEER_NAMES.get(row["variant"], (row["variant"], "bf16"))
        return {"system": name, "setting": "checkpointing on", "base": base, "tok_s": row.get("tok_s"),
                "peak_gib": row.get("peak_gib"), "step_s": row.get("step_s"), "run": row.get("run", "-"), "raw": row}
    policy = str(row.get("checkpointing")).lower()
    if policy == "auto":
        cap = row.get("max_memory_gib")
        setting = f"auto, <= {cap} GiB" if cap else "auto (all free memory)"
        if row.get("plan"):
            setting += f" [{row['plan']}]"
    else:
        # offloaded checkpointing is checkpointing (Unsloth's number in the issue is with its offloaded one)
        setting = {"true": "checkpointing on", "false": "no checkpointing",
                   "offload": "checkpointing on (offloaded)"}.get(policy, policy)
    if (row.get("graphs") or {}).get("captures"):
        setting += ", CUDA graphs"
    elif "graphs" in row and policy in ("true", "offload", "auto"):
        setting += ", no CUDA graphs"
    shape = (row.get("bsz", 2), row.get("seq", 2048))
    if shape != (2, 2048):
        setting = f"long context {shape[0]} x {shape[1]}, {setting}"
    return {"system": "slipstream", "setting": setting, "base": row.get("base", "bf16"), "tok_s": row.get("tok_s"),
            "peak_gib": row.get("peak_gib"), "step_s": row.get("step_s"), "error": row.get("error"),
            "run": row.get("run", row.get("loan", "-")), "long": shape != (2, 2048), "raw": row}


def long_context_lines(rows: list[dict]) -> list[str]:
    """Long-context rows (batch 1): one step's seconds against the issue's target, device and host peaks."""
    long_rows = [r for r in rows if r.get("long")]
    if not long_rows:
        return []
    min_seq, max_s = LONG_TARGET
    lines = ["## Long context (batch 1, one optimiser step)", "",
             f"Target: >= {min_seq:,} tokens with an NF4 base, one step in under {max_s:.0f} s, host RAM in bounds.",
             "", "| base | tokens | plan | step s | tok/s | peak GiB | host peak GiB | met | run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(long_rows, key=lambda r: (r["base"], r["raw"].get("seq", 0))):
        raw = r["raw"]
        seq = raw.get("seq", 0)
        if r.get("error"):
            lines.append(f"| {r['base']} | {seq:,} | - | error: {r['error'][:80]} | | | | | {r['run']} |")
            continue
        met = "-"
        if r["base"] == "nf4" and seq >= min_seq:
            met = "yes" if r["step_s"] < max_s else f"no (step {r['step_s'] / max_s:.3f}x the limit)"
        lines.append(f"| {r['base']} | {seq:,} | {raw.get('plan', '-')} | {r['step_s']} | {r['tok_s']:,} | "
                     f"{r['peak_gib']} | {raw.get('host_peak_gib', '-')} | {met} | {r['run']} |")
    return [*lines, ""]


def target_for(row: dict) -> tuple[int, float] | None:
    for (setting, base), target in TARGETS.items():
        if row["system"] == "slipstream" and row["base"] == base and row["setting"].startswith(setting):
            return target
    return None


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# W8B: LoRA r=16 on all 7 projections, Llama-3.1-8B shape, batch 2 x 2048, AdamW ({meta['device']})",
             "", f"- date {meta['date']}; torch {meta['torch']}; one system per process, same GPU model; `run` = the "
             "result file (rows of one file ran in one device session)",
             "- tokens/s: median step after warm-up; peak: max allocated GiB, reset after loading "
             "(and after warm-up for slipstream, whose first step tunes kernels)",
             "- x HF: tokens/s over transformers + peft (gradient checkpointing) on the same base", ""]
    for base in ("bf16", "nf4"):
        group = [r for r in rows if r["base"] == base and not r.get("long")]
        if not group:
            continue
        hf = next((r["tok_s"] for r in group if r["system"] == "transformers + peft"), None)
        lines += [f"## {base} base", "",
                  "| system | setting | tok/s | peak GiB | x HF | target (tok/s, GiB) | met | run |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(group, key=lambda r: (r["system"] != "slipstream", -(r["tok_s"] or 0))):
            if r.get("error"):
                lines.append(f"| {r['system']} | {r['setting']} | error: {r['error'][:80]} | | | | | {r['run']} |")
                continue
            ratio = f"{r['tok_s'] / hf:.2f}x" if hf and r["tok_s"] else "-"
            target = target_for(r)
            met = "-"
            if target:
                met = "yes" if r["tok_s"] >= target[0] and r["peak_gib"] <= target[1] else (
                    "no (" + ", ".join(x for x, bad in (("speed", r["tok_s"] < target[0]),
                                                         ("memory", r["peak_gib"] > target[1])) if bad) + ")")
            tgt = f">= {target[0]:,}, <= {target[1]}" if target else "-"
            lines.append(f"| {r['system']} | {r['setting']} | {r['tok_s']:,} | {r['peak_gib']} | {ratio} | {tgt} | "
                         f"{met} | {r['run']} |")
        lines.append("")
    return "\n".join(lines + long_context_lines(rows))


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r.get("tok_s") and not r.get("long")]
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {"slipstream": "tab:blue", "transformers + peft": "tab:grey", "Liger-Kernel 0.8.5": "tab:orange",
               "Unsloth": "tab:green"}
    for r in ok:
        marker = "o" if r["base"] == "bf16" else "s"
        ax.scatter(r["peak_gib"], r["tok_s"], c=colours.get(r["system"], "black"), marker=marker, s=60)
        label = f"{r['system'] if r['system'] != 'slipstream' else r['setting']} ({r['base']})"
        ax.annotate(label, (r["peak_gib"], r["tok_s"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("peak allocated GiB (lower is better)")
    ax.set_ylabel("tokens/s (higher is better)")
    ax.set_title("W8B LoRA training step, H100 80GB (o bf16 base, [] NF4 base)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="folder holding the *.jsonl result lines")
    a = ap.parse_args()
    raw = []
    for f in sorted(a.folder.glob("*.jsonl")):
        raw += [{**json.loads(line), "run": f.stem} for line in f.read_text().splitlines()
                if line.strip().startswith("{")]
    if not raw:
        raise SystemExit(f"no result lines (*.jsonl) in {a.folder}")
    rows = [normalise(r) for r in raw]
    mine = next((r["raw"] for r in rows if r["system"] == "slipstream" and r["raw"].get("device")), {})
    meta = {"device": mine.get("device", "?"), "torch": mine.get("torch", "?"), "date": mine.get("date", "?")}
    (a.folder / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (a.folder / "results.md").write_text(markdown(rows, meta) + "\n")
    drew = plot(rows, a.folder / "results.png")
    print(markdown(rows, meta))
    print(f"\nwrote results.json, results.md{', results.png' if drew else ''} in {a.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
