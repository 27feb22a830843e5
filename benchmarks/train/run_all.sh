#!/usr/bin/env bash
# W8B side by side on one GPU, one system per process. Usage on the device (after carrying .whl and .peers,
# with ../shared/peers/gpu_baseline.py copied into .peers/):
#   bash benchmarks/train/run_all.sh bf16     # or: nf4
# Prints one JSON line per system (prefixed RESULT for slipstream) and appends all to $OUT/w8b_<base>.jsonl.
set -uo pipefail
source benchmarks/gpu/setup.sh
set +e  # setup.sh sets -e; one failing system must not stop the others
export PYTHONUNBUFFERED=1 SLIPSTREAM_QUIET=1 HF_HUB_OFFLINE=1
BASE=${1:-bf16}
LOG="${OUT:-/tmp}/w8b_${BASE}.jsonl"
peer() { timeout 240 python3 .peers/gpu_baseline.py --variants "$1" --steps 5 --warm 2 2>&1 | grep '^{' | tee -a "$LOG"; }
# mine POLICY [MAX_MEMORY_GIB]
mine() { timeout 300 python3 benchmarks/train/w8b.py --base "$BASE" --checkpointing "$1" ${2:+--max-memory-gib $2} \
  2>"${OUT:-/tmp}/w8b_${BASE}_$1${2:+_$2}.err" | grep '^RESULT' | sed 's/^RESULT //' | tee -a "$LOG"; }
if [ "$BASE" = bf16 ]; then
  # auto capped at what transformers + peft peaks at (the "same memory" comparison)
  mine true; mine auto; mine auto 23.4; peer hf; peer liger
else
  mine true; peer hf4; peer liger4
fi
