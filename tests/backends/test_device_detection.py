"""Device detection for AMD (ROCm reports "cuda") and Intel GPUs, from property objects shaped like
``torch.cuda.get_device_properties`` / ``torch.xpu.get_device_properties`` on those machines."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from slipstream.device import amd_device_info, amd_family, amd_wavefront, intel_arch, intel_device_info

AMD = [
    # gcnArchName as ROCm PyTorch reports it, family, wavefront
    ("gfx90a:sramecc+:xnack-", "cdna2", 64),
    ("gfx942:sramecc+:xnack-", "cdna3", 64),
    ("gfx950", "cdna4", 64),
    ("gfx908", "cdna1", 64),
    ("gfx1100", "rdna3", 32),
    ("gfx1101", "rdna3", 32),
    ("gfx1102", "rdna3", 32),
    ("gfx1151", "rdna3", 32),
    ("gfx1200", "rdna4", 32),
    ("gfx1201", "rdna4", 32),
    ("gfx1030", "rdna2", 32),
]


@pytest.mark.parametrize(("arch", "family", "wave"), AMD)
def test_amd_family_and_wavefront(arch, family, wave):
    assert amd_family(arch) == family
    assert amd_wavefront(arch) == wave


def test_unknown_gfx_targets_get_the_right_wave_width():
    assert amd_wavefront("gfx1250") == 32 and amd_family("gfx1250").startswith("rdna")
    assert amd_wavefront("gfx9999x") in (32, 64)  # unparsable junk doesn't raise
    assert amd_wavefront("gfx906") == 64


@pytest.mark.parametrize(("name", "arch", "wave", "family"), [
    ("AMD Instinct MI300X", "gfx942:sramecc+:xnack-", 64, "cdna3"),
    ("AMD Instinct MI250X/MI250", "gfx90a:sramecc+:xnack-", 64, "cdna2"),
    ("AMD Radeon RX 7900 XTX", "gfx1100", 32, "rdna3"),
    ("AMD Radeon RX 9070 XT", "gfx1201", 32, "rdna4"),
    ("AMD Instinct MI355X", "gfx950:sramecc+:xnack-", 64, "cdna4"),
])
def test_amd_device_info_from_rocm_properties(name, arch, wave, family):
    props = SimpleNamespace(name=name, gcnArchName=arch, total_memory=64 * 2**30, multi_processor_count=304)
    info = amd_device_info(props, index=1, hip="6.4.1")
    assert (info.vendor, info.type, info.index) == ("amd", "cuda", 1)
    assert info.arch == arch.split(":")[0] and info.family == family
    assert info.warp_size == wave  # from the arch when PyTorch doesn't report warp_size
    assert info.versions["rocm"] == "6.4.1"
    assert info.key == f"amd:{info.arch}:{name}"


def test_amd_reported_warp_size_wins():
    props = SimpleNamespace(name="AMD Radeon Pro W7900", gcnArchName="gfx1100", warp_size=32, total_memory=1,
                            multi_processor_count=96)
    assert amd_device_info(props).warp_size == 32
    nameless = SimpleNamespace(name="", gcnArchName="gfx942", total_memory=1, multi_processor_count=1)
    assert amd_device_info(nameless).name == "AMD GPU gfx942"


@pytest.mark.parametrize(("name", "device_id", "arch"), [
    ("Intel(R) Data Center GPU Max 1550", 0x0BD5, "pvc"),
    ("Intel(R) Data Center GPU Max 1100", None, "pvc"),
    ("Intel(R) Arc(TM) B580 Graphics", 0xE20B, "bmg"),
    ("Intel(R) Arc(TM) B580 Graphics", None, "bmg"),
    ("Intel(R) Arc(TM) Pro B60 Graphics", None, "bmg"),
    ("Intel(R) Graphics [0xe20b]", None, "bmg"),
    ("Intel(R) Arc(TM) A770 Graphics", 0x56A0, "acm"),
    ("Intel(R) Arc(TM) A770 Graphics", None, "acm"),
    ("Intel(R) Data Center GPU Flex 170", None, "acm"),  # Alchemist silicon, not Max
    ("Intel(R) Arc(TM) 140V GPU (16GB)", 0x64A0, "lnl"),
    ("Intel(R) Arc(TM) Graphics", 0x7D55, "mtl"),
    ("Intel(R) UHD Graphics 770", None, "intel-gpu"),
])
def test_intel_arch(name, device_id, arch):
    assert intel_arch(name, device_id) == arch


def test_device_id_beats_the_name():
    assert intel_arch("Intel(R) Graphics", 0x0BD5) == "pvc"


def test_intel_device_info_from_xpu_properties():
    props = SimpleNamespace(name="Intel(R) Data Center GPU Max 1550", device_id=0x0BD5,
                            sub_group_sizes=[16, 32],
                            total_memory=128 * 2**30, gpu_subslice_count=128)
    info = intel_device_info(props, index=0)
    assert (info.vendor, info.type, info.arch, info.family) == ("intel", "xpu", "pvc", "pvc")
    assert info.warp_size == 32 and info.compute_units == 128
    bmg = intel_device_info(SimpleNamespace(name="Intel(R) Arc(TM) B580 Graphics", sub_group_sizes=[16, 32],
                                            total_memory=12 * 2**30, max_compute_units=160))
    assert bmg.arch == "bmg" and bmg.compute_units == 160
