"""``doctor_status()`` says plainly that no AMD / Intel GPU is visible, and why, on this CPU machine."""

from __future__ import annotations

import torch

from slipstream.plugins import system
from slipstream_rocm import plugin as rocm
from slipstream_xpu import libraries
from slipstream_xpu import plugin as xpu


def test_rocm_status_without_a_rocm_build():
    if getattr(torch.version, "hip", None):
        return  # a ROCm machine: covered by the hardware run
    status = rocm.doctor_status()
    assert status.startswith("installed; no AMD GPU visible")
    assert "torch.version.hip is None" in status and "not a ROCm build" in status


def test_rocm_status_with_rocm_pytorch_but_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.4.43482", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = rocm.doctor_status()
    assert "no AMD GPU visible" in status and "HIP 6.4.43482" in status and "/dev/kfd" in status


def test_xpu_status_without_an_xpu_build():
    xpu_mod = getattr(torch, "xpu", None)
    if xpu_mod is not None and xpu_mod.is_available():
        return
    status = xpu.doctor_status()
    assert status.startswith("installed; no Intel GPU visible")
    assert "torch.version.xpu is None" in status or "torch.xpu" in status


def test_status_hook_and_devices_hook():
    assert rocm.slipstream_devices() == [] and xpu.slipstream_devices() == []
    for name, module in (("rocm", rocm), ("xpu", xpu)):
        assert system().records[name].status == "loaded"
        status = getattr(system(), "status", None)
        if status is not None:  # core's doctor reads plugins through the slipstream_status hook
            assert status(name) == module.doctor_status()


def test_ipex_guard():
    assert libraries._major_minor("2.8.10+xpu") == (2, 8)
    major, minor = torch.__version__.split(".")[:2]
    assert libraries._major_minor(torch.__version__) == (int(major), int(minor))
    status = libraries.ipex_status()
    assert status == "absent" or status.startswith(("ok", "mismatch", "disabled"))
    if status != "absent" and not status.startswith("ok"):
        assert libraries.ipex_functional() is None  # never imported when it can't match
