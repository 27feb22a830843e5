#!/usr/bin/env bash
# Long context, batch 1, NF4 base: one optimiser step per sequence length.
# Usage on the device (carry .whl and .peers): OUT=$OUT bash benchmarks/train/long_context.sh 131072 262144
# Tuning is off (static order, still verified): timing every attention candidate at 256k tokens would
# take minutes; attention is pinned to torch SDPA's own choice (the fastest at 4k tokens on the H100).
# Kernels are compiled by one untimed step at 4096 tokens first. POLICY=offload|auto|... (default auto:
# the planner; at 262k it plans offload). History: at 131k the planner before its workspace term chose
# partial(29) and the step ran out of memory (benchmarks/results/h100-2026-11-23-s3/).
set -uo pipefail
source benchmarks/gpu/setup.sh
set +e
export PYTHONUNBUFFERED=1 SLIPSTREAM_QUIET=1 HF_HUB_OFFLINE=1 SLIPSTREAM_TUNE=0 SLIPSTREAM_FORCE=attention=nvidia.sdpa_auto
for seq in "${@:-262144}"; do
  timeout 580 python3 benchmarks/train/w8b.py --base nf4 --checkpointing "${POLICY:-auto}" --bsz 1 --seq "$seq" --steps 1 \
    --warm 0 --prewarm-seq 4096 2>"${OUT:-/tmp}/long_$seq.err" | grep '^RESULT' | sed 's/^RESULT //' \
    | tee -a "${OUT:-/tmp}/long_context.jsonl"
done
