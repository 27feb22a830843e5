"""Every portable kernel still computes its op correctly (forward and backward, against the
reference) under the AMD and Intel configs these backends register, run through Triton's CPU
interpreter. This proves the launchers accept the vendor keys and that any vendor-specific
launch plan they derive from them (e.g. attention's AMD tile caps) is numerically right; it
proves nothing about speed or about the GPU compilers (the compile matrix covers compiling)."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels import catalog, interpreter_on
from slipstream.ops import spec
from slipstream_rocm import spaces as amd
from slipstream_rocm.families import REPRESENTATIVE as AMD
from slipstream_xpu import spaces as intel
from slipstream_xpu.families import REPRESENTATIVE as INTEL
from tests.helpers import judge

pytestmark = pytest.mark.skipif(not interpreter_on(), reason="needs TRITON_INTERPRET=1 (CPU)")

CPU = torch.device("cpu")
DEVICES = {"cdna3": AMD["gfx942"], "rdna3": AMD["gfx1100"], "pvc": INTEL["pvc"]}


def picks(kernel, info) -> list[dict]:
    """A few of the vendor configs: the first, and the first of each distinct vendor-key pattern."""
    space = (amd if info.vendor == "amd" else intel).configs_for(kernel)(info)
    chosen, seen = [], set()
    for cfg in space:
        shape = tuple(sorted((k, cfg[k]) for k in ("matrix_instr_nonkdim", "kpack", "grf_mode", "warp_size")
                             if k in cfg))
        if shape not in seen:
            seen.add(shape)
            chosen.append(cfg)
    return chosen[:3]


CASES = [(k, fam) for k in catalog() for fam in DEVICES]


@pytest.mark.slow
@pytest.mark.parametrize(("kernel", "family"), CASES, ids=[f"{k.name}-{f}" for k, f in CASES])
def test_kernel_correct_under_vendor_configs(kernel, family):
    info = DEVICES[family]
    op = spec(kernel.op)
    sample = op.samples(CPU, torch.float32, "small")[0]
    if not kernel.accepts(*sample.args):
        pytest.skip(f"{kernel.name} does not accept the sample {sample.label}")
    for cfg in picks(kernel, info):
        verdict = judge(op, lambda *a, cfg=cfg: kernel.fn(*a, config=cfg), sample.args)
        assert verdict.ok, f"{kernel.name} on {family} with {cfg}: {verdict.reason} {verdict.errors}"
