"""Intel tuning spaces for the portable kernels, derived per family from each kernel's own configs.

Every Intel config carries ``grf_mode`` (``"default"`` or ``"large"``) and ``warp_size`` (the
sub-group size, 16 or 32), both Triton XPU compile options:

* configs that launch a ``tl.dot`` kernel run on DPAS (XMX) with 16-wide sub-groups:
  ``warp_size=16`` and twice the base config's warp counts (the same work-items), with
  ``grf_mode`` ``"default"`` and, where the hardware has it (Max, Xe2), ``"large"``.
* other configs: ``warp_size=32`` with the base warp counts (default GRF, plus large GRF where
  available, for register-heavy row tiles), and ``warp_size=16`` with twice the warps.
* every warp count (any ``*warps`` key: ``num_warps``, ``bwd_num_warps``, ``gemm_warps``) obeys
  ``warps * warp_size <= 1024`` and the Xe-core's hardware threads (64, or 32 in large-GRF mode),
  halved until it does; ``tl.dot`` configs whose tiles would overflow SLM get fewer pipeline
  stages (any ``*stages`` key, not below 2) or are dropped.

``SPACES`` holds hand-written per-kernel tables that replace the derived space on a family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from slipstream.device import DeviceInfo
from slipstream.kernels import PortableKernel
from slipstream.kernels._space import cached_space, derive_space, operand_tile_bytes, warp_keys
from slipstream_xpu.families import IntelFamily, family_of

SPACES: dict[str, dict[str, Sequence[dict]]] = {}

INTEL_KEYS = ("grf_mode", "warp_size")
"""Config keys that are Intel compile options (Triton ``XPUOptions`` fields) besides num_warps/num_stages.
Older intel-xpu-backend-for-triton releases call ``warp_size`` ``threads_per_warp``."""


def slm_estimate(config: dict, dot: bool, elem_bytes: int = 2) -> int:
    """Upper bound on the SLM a ``tl.dot`` kernel's operand tiles may need: an A and a B tile per
    pipeline stage (Intel's 2D block loads often bypass SLM entirely, so this only drops clearly
    oversized tiles). 0 when the config names no complete (M, N, K) tile or has no dot."""
    return operand_tile_bytes(config, dot, 0, elem_bytes)


def legal(config: dict, fam: IntelFamily) -> bool:
    ws = int(config.get("warp_size", 32))
    grf = config.get("grf_mode", "default")
    if ws not in fam.sub_groups or (grf == "large" and not fam.large_grf):
        return False
    for key in warp_keys(config) or ["num_warps"]:
        nw = int(config.get(key, 4))
        if nw < 1 or nw & (nw - 1) or nw * ws > fam.max_work_items or nw > fam.max_warps(grf):
            return False
    return True


def _scaled(base: dict, factor: int) -> dict:
    return {**base, **{k: int(base[k]) * factor for k in warp_keys(base)}}


def _variants(base: dict, fam: IntelFamily, dot: bool) -> Iterator[dict]:
    grfs = ("default", "large") if fam.large_grf else ("default",)
    if dot:  # DPAS: 16-wide sub-groups, twice the warps for the same work-items
        for grf in grfs:
            yield {**_scaled(base, 2), "warp_size": 16, "grf_mode": grf}
        return
    for grf in grfs:
        yield {**base, "warp_size": 32, "grf_mode": grf}
    yield {**_scaled(base, 2), "warp_size": 16, "grf_mode": "default"}


def _clamp(config: dict, fam: IntelFamily) -> dict:
    """Halve warp counts (keeping powers of two) until the config fits the work-group limits."""
    out = dict(config)
    keys = warp_keys(out)
    while not legal(out, fam) and any(out[k] > 1 for k in keys):
        out.update({k: max(1, out[k] // 2) for k in keys})
    return out


def derive(kernel: PortableKernel, info: DeviceInfo) -> list[dict]:
    """This backend's space for ``kernel`` on ``info`` (see the module docstring)."""
    fam = family_of(info)

    def legalise(cfg: dict) -> dict | None:
        cfg = _clamp(cfg, fam)
        return cfg if legal(cfg, fam) else None

    return derive_space(kernel, fam.name, SPACES.get(kernel.name),
                        variants=lambda base, dot: _variants(base, fam, dot), legalise=legalise,
                        estimate=slm_estimate, budget=fam.slm_bytes)


def configs_for(kernel: PortableKernel) -> Callable[[DeviceInfo], list[dict]]:
    """A ``configs(info)`` function for registering ``kernel`` (one space per Intel family)."""
    return cached_space(derive, kernel, lambda info: (info.family, info.arch))
