#!/usr/bin/env bash
# A/B on one GPU machine (its host CPU speed varies between loans, so compare only within one run):
# W8B offload steps with the current wheels (.whl) and an older build (.whl_old), interleaved.
# Usage on the device, carrying .whl, .whl_old and .peers: bash benchmarks/gpu/ab_w8b.sh "bf16 nf4" "new old new"
set -uo pipefail
source benchmarks/gpu/setup.sh > "${OUT:-/tmp}/setup.log" 2>&1
set +e
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site_old .whl_old/*.whl .peers/liger_kernel-*.whl \
  .peers/bitsandbytes-*.whl .whl/pluggy-*.whl .whl/filelock-*.whl
export PYTHONUNBUFFERED=1 SLIPSTREAM_QUIET=1 HF_HUB_OFFLINE=1
NEW_PATH=$PYTHONPATH
OLD_PATH=/tmp/site_old${PYTHONPATH#/tmp/site}
for base in $1; do
  for which in $2; do
    if [ "$which" = old ]; then p=$OLD_PATH; else p=$NEW_PATH; fi
    PYTHONPATH=$p timeout 240 python3 benchmarks/train/w8b.py --base "$base" --checkpointing offload \
      2>"${OUT:-/tmp}/ab_${base}_${which}.err" | grep '^RESULT' | sed "s/^RESULT {/{\"build\": \"$which\", /" \
      | tee -a "${OUT:-/tmp}/ab.jsonl" | python3 -c "import sys, json; d = json.loads(sys.stdin.read()); \
print(d['build'], d['base'], d['tok_s'], 'tok/s', d['step_s'], 's host', d['host_s'], d['peak_gib'], 'GiB')"
  done
done
