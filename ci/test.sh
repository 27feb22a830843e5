#!/usr/bin/env bash
# The README's test command: a fresh virtual environment with the CPU build of torch, core + the
# three backends + the template plugin installed, then ruff, the test suite (kernels under Triton's
# interpreter) and the ahead-of-time compile matrix for every GPU target the backends claim.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SLIPSTREAM_VENV:-.venv}"
PY="${PYTHON:-python3}"

echo "== venv: $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[dev]" -e backends/nvidia -e backends/rocm -e backends/xpu -e plugins/template

echo "== ruff"
"$VENV/bin/ruff" check .

echo "== slipstream doctor"
"$VENV/bin/slipstream" doctor

echo "== pytest"
set +e
"$VENV/bin/python" -m pytest -n "${SLIPSTREAM_TEST_JOBS:-2}" -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; exit 1; fi
[ "$rc" -eq 0 ] || exit "$rc"

echo "== compile matrix (AOT: sm_80, sm_90, gfx90a, gfx942, gfx1100)"
"$VENV/bin/python" ci/compile_matrix.py --jobs "${SLIPSTREAM_TEST_JOBS:-2}"
