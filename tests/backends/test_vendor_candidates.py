"""On simulated AMD, Intel and NVIDIA devices, the real registry and dispatcher consider only that
vendor's candidates (plus device-agnostic portable/reference ones), with that vendor's configs.

Nothing is monkeypatched: the installed backends are loaded from their entry points, the test
kernels are added through ``slipstream.register_plugin`` with the backends' own registration
functions, and ``dispatcher().candidates`` is asked with CPU tensors and a simulated DeviceInfo.
"""

from __future__ import annotations

import pytest
import torch

import slipstream
from slipstream import hookimpl
from slipstream.device import DeviceInfo, cpu_info
from slipstream.dispatch import dispatcher
from slipstream.ops import spec
from slipstream.plugins import reload, system
from slipstream_rocm import plugin as rocm_plugin
from slipstream_rocm.families import REPRESENTATIVE as AMD_DEVICES
from slipstream_xpu import plugin as xpu_plugin
from slipstream_xpu.families import REPRESENTATIVE as INTEL_DEVICES
from tests.backends import toy_kernels

H100 = DeviceInfo(vendor="nvidia", type="cuda", name="NVIDIA H100 80GB HBM3", arch="sm_90", family="hopper",
                  warp_size=32, memory_bytes=80 * 2**30, compute_units=132)
MI300X, MI250, RX7900 = AMD_DEVICES["gfx942"], AMD_DEVICES["gfx90a"], AMD_DEVICES["gfx1100"]
PVC, B580 = INTEL_DEVICES["pvc"], INTEL_DEVICES["bmg"]
ALL = [MI300X, MI250, RX7900, PVC, B580, H100]

VENDOR_PREFIXES = {"amd": {"rocm", "rocmtoy"}, "intel": {"xpu", "xputoy"}, "nvidia": {"nvidia"}}
VENDOR_SPECIFIC = set().union(*VENDOR_PREFIXES.values())


class ToyVendors:
    """Registers the test kernels the way the ROCm and XPU backends register the catalogue."""

    @hookimpl
    def slipstream_register_kernels(self, registry):
        rocm_plugin.register_kernels(registry, toy_kernels.KERNELS, prefix="rocmtoy")
        xpu_plugin.register_kernels(registry, toy_kernels.KERNELS, prefix="xputoy")


@pytest.fixture(scope="module", autouse=True)
def toy_plugin():
    reload()
    record = slipstream.register_plugin(ToyVendors(), "toy-vendors")
    assert record.status == "loaded", record.error
    yield
    reload()


def bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


ARGS = {
    "swiglu": lambda: (bf16(4, 64), bf16(4, 64)),
    "lora_linear": lambda: (bf16(4, 64), bf16(32, 64), bf16(8, 64), bf16(32, 8), 2.0, None),
    "lora_linear_group": lambda: (bf16(4, 64), bf16(32, 64), bf16(8, 64), bf16(32, 8), 2.0, None,
                                  bf16(16, 64), bf16(8, 64), bf16(16, 8), 2.0, None, None, None, None, None, None),
    "attention": lambda: (bf16(1, 4, 16, 64), bf16(1, 2, 16, 64), bf16(1, 2, 16, 64), True, None, None, None,
                          None),
}


def candidates(op: str, info: DeviceInfo):
    reports = []
    found = dispatcher().candidates(spec(op), info, ARGS[op](), reports)
    return found, reports


def prefix(name: str) -> str:
    return name.split(".")[0]


def test_backends_loaded_from_entry_points():
    for name in ("rocm", "xpu"):
        record = system().records[name]
        assert record.status == "loaded", record.error
    assert any(n.startswith("rocm.sdpa_") for n in system().records["rocm"].implementations)
    assert "xpu.sdpa" in system().records["xpu"].implementations


@pytest.mark.parametrize("info", ALL, ids=lambda i: i.arch)
@pytest.mark.parametrize("op", sorted(ARGS))
def test_only_the_vendors_candidates(op, info):
    found, reports = candidates(op, info)
    mine = VENDOR_PREFIXES[info.vendor]
    names = {c.impl.name for c in found}
    assert any(prefix(n) in mine for n in names), f"no {info.vendor} candidate for {op}: {sorted(names)}"
    others = [info2 for info2 in ALL + [cpu_info()] if info2.vendor != info.vendor]
    for cand in found:
        p = prefix(cand.impl.name)
        assert p not in VENDOR_SPECIFIC - mine, f"{cand.impl.name} offered on {info.describe()}"
        if p not in mine:  # anything else must be device-agnostic: portable or the reference
            assert cand.impl.kind in ("portable", "reference") or all(cand.impl.devices(o) for o in others), \
                cand.impl.name
    skipped = {r.label for r in reports if r.status == "skipped"}
    for foreign in VENDOR_SPECIFIC - mine:
        registered = [i.name for i in system().registry.implementations(op) if prefix(i.name) == foreign]
        assert set(registered) <= skipped, f"{foreign} implementations not skipped on {info.arch}"
    assert any(c.impl.kind == "reference" for c in found)


def vendor_configs(op: str, info: DeviceInfo, name: str) -> list[dict]:
    found, _ = candidates(op, info)
    configs = [c.config for c in found if c.impl.name == name]
    assert configs, f"{name} not a candidate on {info.arch}"
    return configs


@pytest.mark.parametrize("info", [MI300X, MI250], ids=lambda i: i.arch)
def test_cdna_configs(info):
    for cfg in vendor_configs("swiglu", info, "rocmtoy.toy_swiglu"):
        assert "waves_per_eu" in cfg and "grf_mode" not in cfg
        assert cfg["num_warps"] * 64 <= 1024  # the toy's num_warps=32 config is cut to 16 on wave64
        assert "matrix_instr_nonkdim" not in cfg  # no tl.dot in this kernel
    gemm = vendor_configs("lora_linear", info, "rocmtoy.toy_gemm")
    assert {c["matrix_instr_nonkdim"] for c in gemm} == {16, 32}
    assert {c["kpack"] for c in gemm} == {1, 2}
    assert all(c["num_stages"] <= 2 and c["num_warps"] <= 16 for c in gemm)
    assert not any(c["BLOCK_M"] == 512 for c in gemm), "an 80 KiB tile offered on a 64 KiB-LDS GPU"


def test_rdna_configs():
    for cfg in vendor_configs("swiglu", RX7900, "rocmtoy.toy_swiglu"):
        assert "waves_per_eu" in cfg and cfg["num_warps"] * 32 <= 1024
    gemm = vendor_configs("lora_linear", RX7900, "rocmtoy.toy_gemm")
    assert {c["matrix_instr_nonkdim"] for c in gemm} == {16} and {c["kpack"] for c in gemm} == {1}


def test_cdna4_uses_its_larger_lds():
    from slipstream_rocm.families import REPRESENTATIVE

    gemm = vendor_configs("lora_linear", REPRESENTATIVE["gfx950"], "rocmtoy.toy_gemm")
    # 512x128x64 at 3 stages needs 240 KiB there (one buffer per stage): offered with 2 (160 KiB)
    big = [c for c in gemm if c["BLOCK_M"] == 512]
    assert big and all(c["num_stages"] == 2 for c in big)
    assert any(c["num_stages"] == 3 for c in gemm)
    assert {c["kpack"] for c in gemm} == {1}  # deprecated on gfx950


def test_intel_pvc_configs():
    swiglu = vendor_configs("swiglu", PVC, "xputoy.toy_swiglu")
    assert all("grf_mode" in c and "waves_per_eu" not in c for c in swiglu)
    assert {c["grf_mode"] for c in swiglu} == {"default", "large"}
    assert {c["warp_size"] for c in swiglu} == {16, 32}
    for c in swiglu:
        assert c["num_warps"] * c["warp_size"] <= 1024
        assert c["num_warps"] <= (32 if c["grf_mode"] == "large" else 64)
    gemm = vendor_configs("lora_linear", PVC, "xputoy.toy_gemm")
    assert {c["warp_size"] for c in gemm} == {16}  # DPAS runs 16-wide sub-groups


def test_intel_arc_configs():
    configs = vendor_configs("swiglu", B580, "xputoy.toy_swiglu")
    assert all(c["grf_mode"] in ("default", "large") for c in configs)
    from slipstream_xpu.families import REPRESENTATIVE

    acm = vendor_configs("swiglu", REPRESENTATIVE["acm"], "xputoy.toy_swiglu")
    assert {c["grf_mode"] for c in acm} == {"default"}  # Alchemist has no 256-GRF mode


def test_h100_gets_nvidia_configs_only():
    found, _ = candidates("swiglu", H100)
    for cand in found:
        assert not cand.config or not {"waves_per_eu", "grf_mode", "kpack"} & set(cand.config)
    assert not any(prefix(c.impl.name) in {"rocm", "rocmtoy", "xpu", "xputoy"} for c in found)


def test_library_candidates_are_vendor_bound():
    amd = {c.impl.name for c in candidates("attention", MI300X)[0]}
    assert {"rocm.sdpa_flash", "rocm.sdpa_efficient"} <= amd
    nvidia = {c.impl.name for c in candidates("attention", H100)[0]}
    assert {"nvidia.sdpa_auto", "nvidia.sdpa_cudnn", "nvidia.sdpa_flash"} <= nvidia
    assert not any(n.startswith(("rocm.", "xpu.")) for n in nvidia)
    intel = {c.impl.name for c in candidates("attention", PVC)[0]}
    assert "xpu.sdpa" in intel and not any(n.startswith("rocm.") for n in intel)
    # packed sequences / softcap are outside SDPA's contract: rejected by accepts, not offered
    reports = []
    args = (*ARGS["attention"]()[:6], 30.0, None)
    dispatcher().candidates(spec("attention"), MI300X, args, reports)
    assert any(r.label == "rocm.sdpa_flash" and r.status == "skipped" for r in reports)


@pytest.mark.parametrize("info", ALL, ids=lambda i: i.arch)
def test_lora_group_is_offered_like_lora_linear(info):
    """Every backend registering the portable lora_linear registers the group entry too, with the same
    tuning space on each device."""
    single = {(c.impl.name, repr(sorted(c.config.items()))) for c in candidates("lora_linear", info)[0]
              if c.impl.name.endswith(".lora_linear") and c.impl.kind == "vendor"}
    group = {(c.impl.name.removesuffix("_group"), repr(sorted(c.config.items())))
             for c in candidates("lora_linear_group", info)[0]
             if c.impl.name.endswith(".lora_linear_group") and c.impl.kind == "vendor"}
    assert single and group == single
