#!/usr/bin/env bash
# Long context, batch 1, NF4 base: one optimiser step per sequence length (not yet run on a GPU).
# Usage on the device (carry .whl and .peers): OUT=$OUT bash benchmarks/train/long_context.sh 131072 262144
# Tuning is off (static order, still verified): timing every attention candidate at 256k tokens would
# take minutes. Kernels are compiled by one untimed step at 4096 tokens first.
set -uo pipefail
source benchmarks/gpu/setup.sh
set +e
export PYTHONUNBUFFERED=1 SLIPSTREAM_QUIET=1 HF_HUB_OFFLINE=1 SLIPSTREAM_TUNE=0
for seq in "${@:-262144}"; do
  timeout 580 python3 benchmarks/train/w8b.py --base nf4 --checkpointing auto --bsz 1 --seq "$seq" --steps 1 \
    --warm 0 --prewarm-seq 4096 2>"${OUT:-/tmp}/long_$seq.err" | grep '^RESULT' | sed 's/^RESULT //' \
    | tee -a "${OUT:-/tmp}/long_context.jsonl"
done
