"""slipstream: fast, memory-lean LoRA/QLoRA fine-tuning on any GPU vendor.

Ops (``slipstream.ops``) have a plain-PyTorch reference that defines them; backends installed as
plugins add faster implementations; the dispatcher verifies and times them on your device and
runs the fastest correct one.
"""

from __future__ import annotations

__version__ = "0.1.0"

from slipstream import ops
from slipstream.device import DeviceInfo, available_devices, device_info
from slipstream.dispatch import explain, force, forced, set_tuning
from slipstream.plugins import hookimpl, hookspec, register_plugin
from slipstream.quant import QuantizedWeight
from slipstream.registry import Registry

_LAZY = {"FastModel": "slipstream.train.fast_model", "Trainer": "slipstream.train.trainer",
         "TrainConfig": "slipstream.train.config"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slipstream' has no attribute {name!r}")


__all__ = ["DeviceInfo", "FastModel", "QuantizedWeight", "Registry", "TrainConfig", "Trainer", "__version__",
           "available_devices", "device_info", "explain", "force", "forced", "hookimpl", "hookspec", "ops",
           "register_plugin", "set_tuning"]
