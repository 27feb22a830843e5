"""Table and plot of a ``lora_fused_probe.py`` JSON: whole ``lora_linear`` (and group) fwd+bwd per config
and shape, as a ratio to the cuBLAS base GEMM pair (x @ W.T + dY @ W) of the same run.
Usage: python3 benchmarks/gpu/lora_fused_report.py PROBE.json OUT_PREFIX  (writes OUT_PREFIX.md and .png)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _config(row: dict) -> str:
    """The config part of a row's label: one projection (``lora_linear ...``) or a group (``lora_linear_group ...``,
    whose shape is the group's name, e.g. ``q+k+v``, and whose base is the sum of its members')."""
    return row["what"].split(" ", 1)[1]


def main(src: str, prefix: str) -> None:
    data = json.loads(Path(src).read_text())
    rows = data["rows"]
    base = {r["shape"]: r["ms"] for r in rows if r["what"] == "cublas base fwd+dX"}
    whole = [r for r in rows if r["what"].startswith("lora_linear") and "ms" in r]
    shapes = list(base)
    lines = [f"# lora_linear fwd+bwd, r=16, 4096 tokens, bf16 ({data['device']}, torch {data['torch']})", "",
             "GPU ms from CUDA-graph replays; `x base` = this / (cuBLAS x @ W.T + dY @ W) of the same run (where the",
             "probe paired them: the median over rounds of the ratio to the base timed right before).", "",
             "| config | " + " | ".join(f"{s} ms (x base)" for s in shapes) + " |",
             "|---|" + "---|" * len(shapes)]
    configs = list(dict.fromkeys(_config(r) for r in whole))
    table = {(_config(r), r["shape"]): r["ms"] for r in whole}
    # paired rounds (lora_fused_probe.paired): the median ratio to the base timed right before each call
    ratio = {(_config(r), r["shape"]): r.get("x_base", r["ms"] / base[r["shape"]]) for r in whole}
    lines.append("| base GEMMs alone | " + " | ".join(f"{base[s]:.3f}" for s in shapes) + " |")
    for c in configs:
        cells = [f"{table[c, s]:.3f} ({ratio[c, s]:.2f}x)" if (c, s) in table else "-" for s in shapes]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    Path(prefix + ".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(configs))
    for i, c in enumerate(configs):
        ax.bar([j + i * width for j in range(len(shapes))],
               [ratio.get((c, s), 0) for s in shapes], width, label=c)
    ax.axhline(1.10, color="k", linestyle="--", linewidth=1, label="target 1.10x")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
    ax.set_ylabel("fwd+bwd / base GEMMs")
    ax.set_ylim(0.9, max(2.0, ax.get_ylim()[1]))
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("lora_linear on the H100: cuBLAS path vs Triton GEMM with LoRA fused")
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
