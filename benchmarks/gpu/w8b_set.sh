#!/usr/bin/env bash
# On the device (source benchmarks/gpu/setup.sh first): W8B runs, one per argument, each
# "LABEL|ENV=VALUE ...|w8b.py arguments", appended to $OUT/w8b_set.jsonl with the label.
# Example: bash benchmarks/gpu/w8b_set.sh "graphs|SLIPSTREAM_CUDA_GRAPHS=1|--base bf16 --checkpointing offload"
set -uo pipefail
export PYTHONUNBUFFERED=1 SLIPSTREAM_QUIET=1 HF_HUB_OFFLINE=1
for spec in "$@"; do
  IFS='|' read -r label envs args <<< "$spec"
  # shellcheck disable=SC2086
  env $envs timeout "${W8B_TIMEOUT:-240}" python3 benchmarks/train/w8b.py $args 2>"${OUT:-/tmp}/w8b_${label}.err" \
    | tee "${OUT:-/tmp}/w8b_${label}.log" | grep '^RESULT' | sed "s/^RESULT {/{\"label\": \"$label\", /" \
    | tee -a "${OUT:-/tmp}/w8b_set.jsonl" | python3 -c "import sys, json; d = json.loads(sys.stdin.read()); \
print(d['label'], d['base'], d.get('tok_s'), 'tok/s', d.get('step_s'), 's, host', d.get('host_s'), d.get('peak_gib'), \
'GiB', 'alloc', d.get('allocator_peak_gib'), 'pool', d.get('graph_pool_gib'), 'warm', d.get('warm_peak_gib'), \
'min/max', d.get('step_s_min'), d.get('step_s_max'), d.get('error', ''), json.dumps(d.get('graphs'))[:400])"
done
