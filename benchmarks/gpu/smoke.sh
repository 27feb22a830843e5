#!/usr/bin/env bash
# GPU smoke + verification: doctor, conformance of slipstream-nvidia (small shapes, every dtype
# it claims), then the dispatcher's own tuning at Llama-3.1-8B shapes (explain --size real).
# Logs go to $OUT. Usage on the device: bash benchmarks/gpu/smoke.sh [ops...]
set -uo pipefail
source benchmarks/gpu/setup.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
python3 -m slipstream.cli doctor 2>&1 | tee "$OUT/doctor.txt"
timeout ${CONF_TIMEOUT:-240} python3 -m slipstream.cli conformance slipstream-nvidia --dtype bf16 --dtype fp32 2>&1 | tee "$OUT/conformance_small.txt" | tail -60
for op in ${OPS:-rms_norm rope swiglu geglu cross_entropy linear_cross_entropy lora_linear attention}; do
  timeout ${EXPLAIN_TIMEOUT:-120} python3 -m slipstream.cli explain --op "$op" --size real --dtype bf16 --samples 3 --tune 2>&1 | tee -a "$OUT/explain_real.txt" | grep -vE '^slipstream: ' | head -40
done
