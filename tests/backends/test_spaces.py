"""Every AMD and Intel family's tuning space is legal for every kernel (the catalogue and the test
kernels): workgroup limits, power-of-two warps, options Triton takes, tiles within LDS/SLM."""

from __future__ import annotations

import pytest

from slipstream.device import DeviceInfo, amd_wavefront
from slipstream.kernels import _space as space
from slipstream.kernels import catalog
from slipstream_rocm import spaces as amd
from slipstream_rocm.families import FAMILIES as AMD_FAMILIES
from slipstream_xpu import spaces as intel
from slipstream_xpu.families import FAMILIES as INTEL_FAMILIES
from tests.backends import toy_kernels

KERNELS = catalog() + toy_kernels.KERNELS
ARCH_OF = {"cdna1": "gfx908", "cdna2": "gfx90a", "cdna3": "gfx942", "cdna4": "gfx950", "gcn5": "gfx906",
           "rdna1": "gfx1010", "rdna2": "gfx1030", "rdna3": "gfx1100", "rdna4": "gfx1201"}


def amd_device(family: str) -> DeviceInfo:
    arch = ARCH_OF[family]
    return DeviceInfo(vendor="amd", type="cuda", name=f"sim {arch}", arch=arch, family=family,
                      warp_size=amd_wavefront(arch))


def intel_device(family: str) -> DeviceInfo:
    return DeviceInfo(vendor="intel", type="xpu", name=f"sim {family}", arch=family, family=family,
                      warp_size=32)


def test_every_amd_family_has_a_device():
    assert set(ARCH_OF) == set(AMD_FAMILIES)
    for family, arch in ARCH_OF.items():
        assert AMD_FAMILIES[family].wave == amd_wavefront(arch)


@pytest.mark.parametrize("family", sorted(AMD_FAMILIES))
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_amd_space_is_legal(kernel, family):
    fam = AMD_FAMILIES[family]
    configs = amd.configs_for(kernel)(amd_device(family))
    assert configs, f"{kernel.name}: empty space on {family}"
    for cfg in configs:
        dot = "matrix_instr_nonkdim" in cfg
        for key in space.warp_keys(cfg):
            assert cfg[key] & (cfg[key] - 1) == 0 and cfg[key] * fam.wave <= 1024, cfg
        assert "waves_per_eu" in cfg
        assert all(cfg[k] <= fam.max_stages for k in space.stage_keys(cfg))
        assert amd.lds_estimate(cfg, dot, fam) <= fam.lds_bytes or len(configs) == 1, cfg
        if dot:
            assert cfg["matrix_instr_nonkdim"] in (0, 16, 32)
            if family.startswith("rdna"):
                assert cfg["matrix_instr_nonkdim"] in (0, 16) and cfg["kpack"] == 1
            if family == "cdna4":
                assert cfg["kpack"] == 1
        # a base config's keys (block sizes etc.) all survive: the launcher still finds them
        assert any(set(base) <= set(cfg) for base in kernel.configs)


@pytest.mark.parametrize("family", sorted(INTEL_FAMILIES))
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_intel_space_is_legal(kernel, family):
    fam = INTEL_FAMILIES[family]
    configs = intel.configs_for(kernel)(intel_device(family))
    assert configs, f"{kernel.name}: empty space on {family}"
    for cfg in configs:
        ws = cfg["warp_size"]
        dot = space.uses_dot(kernel, {k: v for k, v in cfg.items() if k not in ("warp_size", "grf_mode")})
        assert ws in fam.sub_groups and cfg["grf_mode"] in ("default", "large"), cfg
        for key in space.warp_keys(cfg):
            nw = cfg[key]
            assert nw & (nw - 1) == 0 and nw * ws <= 1024 and nw <= fam.max_warps(cfg["grf_mode"]), cfg
        if cfg["grf_mode"] == "large":
            assert fam.large_grf
        if dot:
            assert ws == 16
        assert intel.slm_estimate(cfg, dot) <= fam.slm_bytes or len(configs) == 1, cfg


def test_uses_dot_reads_the_kernel_source():
    swiglu, gemm = toy_kernels.KERNELS
    assert not space.uses_dot(swiglu) and space.uses_dot(gemm)
    assert not space.uses_dot(swiglu) and space.uses_dot(gemm)


def test_lds_estimate():
    from slipstream_rocm.families import FAMILIES

    cdna3, cdna4 = FAMILIES["cdna3"], FAMILIES["cdna4"]
    cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_stages": 3}
    tile = (128 * 64 * 2) * 2  # A and B tiles, bf16
    assert amd.lds_estimate(cfg, True, cdna3) == tile * 2  # stages - 1 buffers (stream pipeliner)
    assert amd.lds_estimate(cfg, True, cdna4) == tile * 3  # one buffer per stage on gfx950
    assert amd.lds_estimate(cfg, dot=False) == 0
    assert amd.lds_estimate({"block": 4096}, dot=True) == 0
    assert amd.lds_estimate({"block_m": 128, "block_n": 256, "block_k": 64, "stages": 3}, True, cdna3) == \
        (128 * 64 + 64 * 256) * 2 * 2
    big = {"BLOCK_M": 512, "BLOCK_N": 128, "BLOCK_K": 64, "num_stages": 3}
    fits_cdna4 = space.fit_stages(big, lambda c: amd.lds_estimate(c, True, cdna4), cdna4.lds_bytes)
    assert fits_cdna4 == {**big, "num_stages": 2}
    assert space.fit_stages(big, lambda c: amd.lds_estimate(c, True, cdna3), cdna3.lds_bytes) is None


def test_hand_written_table_replaces_the_derived_space(monkeypatch):
    swiglu = toy_kernels.KERNELS[0]
    tuned = {"num_warps": 4, "BLOCK": 512, "waves_per_eu": 3}
    monkeypatch.setitem(amd.SPACES, swiglu.name, {"cdna3": [tuned]})
    assert amd.derive(swiglu, amd_device("cdna3")) == [tuned]
    assert amd.derive(swiglu, amd_device("rdna3")) != [tuned]
