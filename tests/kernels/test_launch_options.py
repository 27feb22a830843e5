"""Vendor launch options: which config keys reach a Triton launch, under which name."""

from __future__ import annotations

from slipstream.kernels import _catalog
from slipstream.kernels._catalog import intel_warp_option, launch_options


def test_amd_and_intel_compile_options_are_forwarded_nvidia_configs_carry_none():
    amd = {"num_warps": 4, "waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2}
    assert launch_options(amd) == {"waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2}
    assert launch_options({"num_warps": 8, "block": 4096}) == {}
    assert launch_options(None) == {}


def test_intel_sub_group_size_takes_the_installed_backends_name():
    assert intel_warp_option(["num_warps", "grf_mode", "warp_size"]) == "warp_size"
    assert intel_warp_option(("num_warps", "threads_per_warp")) == "threads_per_warp"
    assert intel_warp_option(("num_warps",)) is None
    assert intel_warp_option(None) is None


def test_warp_size_is_dropped_without_an_intel_triton_backend():
    # this machine's Triton has no Intel backend: forwarding warp_size would be an unknown launch option
    assert _catalog._installed_intel_option_fields() is None
    assert launch_options({"num_warps": 8, "warp_size": 16, "grf_mode": "large"}) == {"grf_mode": "large"}
