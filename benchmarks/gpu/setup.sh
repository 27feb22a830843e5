#!/usr/bin/env bash
# On the GPU machine (source it): install the carried wheels (.whl, and .peers if carried) into
# /tmp/site and put it first on PYTHONPATH. The machine has torch, triton, transformers, peft.
set -e
pkgs=(.whl/*.whl)
if [ -d .peers ]; then pkgs+=(.peers/liger_kernel-*.whl .peers/bitsandbytes-*.whl); fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${pkgs[@]}"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export SLIPSTREAM_CACHE_DIR=/tmp/slipstream-cache TRITON_CACHE_DIR=/tmp/triton-cache
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"
