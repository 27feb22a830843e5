"""NVIDIA tuning spaces for the portable kernels, per architecture family.

A kernel's own ``configs`` are the default; an entry here replaces them on NVIDIA devices.
Hopper (sm_90) has 228 KiB of shared memory per SM and wgmma; Ampere (sm_80) 164 KiB.
"""

from __future__ import annotations

from collections.abc import Sequence

from slipstream.device import DeviceInfo

# kernel name -> family -> configs; "*" is the fallback family.
SPACES: dict[str, dict[str, Sequence[dict]]] = {}

COMPILE_TARGETS = (("cuda", 80, 32), ("cuda", 90, 32))


def configs_for(kernel: str, default: Sequence[dict]):
    """A ``configs(info)`` function: this backend's space for ``kernel`` on ``info``, else ``default``."""
    table = SPACES.get(kernel)

    def configs(info: DeviceInfo) -> list[dict]:
        if table is None:
            return [dict(c) for c in default]
        return [dict(c) for c in table.get(info.family, table.get("*", default))]

    return configs
