"""Training: ``FastModel`` (load + LoRA + acceleration), ``Trainer``, ``TrainConfig``, data, checkpoints.

Submodules are imported lazily so ``import slipstream.train`` stays cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "FastModel": "slipstream.train.fast_model",
    "Trainer": "slipstream.train.trainer",
    "TrainResult": "slipstream.train.trainer",
    "TrainConfig": "slipstream.train.config",
    "RunConfig": "slipstream.train.config",
    "ConfigError": "slipstream.train.config",
    "load_config": "slipstream.train.config",
    "CheckpointError": "slipstream.train.checkpoint",
    "MemoryPlan": "slipstream.train.memory",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slipstream.train' has no attribute {name!r}")


__all__ = sorted(_LAZY)
