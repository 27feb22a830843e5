#!/usr/bin/env bash
# Build what the GPU machine needs into .whl/ (git-ignored; name it in the device run's `carry`):
# slipstream, its three backends and the template as wheels (so their entry points register),
# plus the pure-Python dependencies that machine may lack.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl . backends/nvidia backends/rocm backends/xpu plugins/template
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
  pluggy==1.6.0 filelock==3.20.0 pytest==8.4.2 iniconfig==2.1.0 packaging==25.0
ls -la .whl
