#!/usr/bin/env bash
# W8B side by side on one GPU, one system per process. Usage on the device (after carrying .whl and .peers,
# with ../shared/peers/gpu_baseline.py copied into .peers/):
#   bash benchmarks/train/run_all.sh bf16 [all|mine|peers]    # or: nf4
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
# Unsloth imports its own pins (unsloth-zoo, trl, datasets, ...): all the bundle's wheels on a path of its own.
# Its runner saves the random model as a folder first (~16 GB for bf16) and compiles for ~35 s: warm 3.
unsloth() {
  [ -f .peers/unsloth_bench.py ] || { echo "no .peers/unsloth_bench.py (copy it from ../shared/peers)"; return; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .peers/*.whl
  PYTHONPATH=/tmp/site_unsloth:$PYTHONPATH timeout 420 python3 .peers/unsloth_bench.py --steps 5 --warm 3 "$@" \
    2>"${OUT:-/tmp}/unsloth_${BASE}.err" | grep '^{' | tee -a "$LOG"
}
WHICH=${2:-all}  # all | mine | peers (transformers + peft, Liger, Unsloth): split across device calls
if [ "$BASE" = bf16 ]; then
  # auto capped at what transformers + peft peaks at (the "same memory" comparison)
  [ "$WHICH" = peers ] || { mine true; mine offload; mine lean; mine auto; mine auto 23.4; }
  [ "$WHICH" = mine ] || { peer hf; peer liger; unsloth; }
else
  [ "$WHICH" = peers ] || { mine true; mine offload; }
  [ "$WHICH" = mine ] || { peer hf4; peer liger4; unsloth --load-in-4bit; }
fi
