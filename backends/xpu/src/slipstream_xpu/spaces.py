"""Intel tuning spaces for the portable kernels, derived per family from each kernel's own configs.

Every Intel config carries ``grf_mode`` (``"default"`` or ``"large"``) and ``warp_size`` (the
sub-group size, 16 or 32), both Triton XPU compile options:

* kernels with ``tl.dot`` run on DPAS (XMX) with 16-wide sub-groups: ``warp_size=16`` and twice
  the base config's ``num_warps`` (the same work-items), with ``grf_mode`` ``"default"`` and, where
  the hardware has it (Max, Xe2), ``"large"`` (needs ``num_warps <= 32``).
* other kernels: ``warp_size=32`` with the base ``num_warps`` (default GRF, plus large GRF where
  available, for register-heavy row tiles), and ``warp_size=16`` with twice the warps.
* ``num_warps * warp_size <= 1024`` and ``num_warps`` within the Xe-core's hardware threads
  (64, or 32 in large-GRF mode); ``tl.dot`` configs whose tiles would overflow SLM get fewer
  pipeline stages (not below 2) or are dropped.

``SPACES`` holds hand-written per-kernel tables that replace the derived space on a family.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Sequence

from slipstream.device import DeviceInfo
from slipstream.kernels import PortableKernel

from slipstream_xpu.families import IntelFamily, family_of

SPACES: dict[str, dict[str, Sequence[dict]]] = {}

INTEL_KEYS = ("grf_mode", "warp_size")
"""Config keys that are Intel compile options (Triton ``XPUOptions`` fields) besides num_warps/num_stages.
Older intel-xpu-backend-for-triton releases call ``warp_size`` ``threads_per_warp``."""

DOT_TAGS = {"dot", "matmul", "gemm", "mma", "tensor-core"}
DOT_OPS = {"lora_linear", "linear_cross_entropy", "attention"}
_TILE_KEYS = {
    "m": re.compile(r"^(block_?(size_?)?m|bm|tile_m)$", re.IGNORECASE),
    "n": re.compile(r"^(block_?(size_?)?n|bn|tile_n)$", re.IGNORECASE),
    "k": re.compile(r"^(block_?(size_?)?k|bk|tile_k)$", re.IGNORECASE),
}
_dot_cache: dict[int, bool] = {}


def _source(fn: object) -> str:
    src = getattr(fn, "src", None)
    if isinstance(src, str):
        return src
    try:
        return inspect.getsource(getattr(fn, "fn", fn))
    except (OSError, TypeError):
        return ""


def uses_dot(kernel: PortableKernel) -> bool:
    """Does ``kernel`` launch a Triton kernel with ``tl.dot``? (tags, else its ``aot`` sources, else op)"""
    key = id(kernel.fn)
    if key in _dot_cache:
        return _dot_cache[key]
    found: bool | None = True if DOT_TAGS & {t.lower() for t in kernel.tags} else None
    if found is None and kernel.aot is not None and kernel.configs:
        try:
            found = any(re.search(r"\btl\.dot(_scaled)?\s*\(", _source(u.fn))
                        for u in kernel.aot(dict(kernel.configs[0])))
        except Exception:
            found = None
    if found is None:
        found = kernel.op in DOT_OPS
    _dot_cache[key] = found
    return found


def slm_estimate(config: dict, dot: bool, elem_bytes: int = 2) -> int:
    """Upper bound on the SLM a ``tl.dot`` kernel's operand tiles may need: an A and a B tile per
    pipeline stage (Intel's 2D block loads often bypass SLM entirely, so this only drops clearly
    oversized tiles). 0 when the config names no complete (M, N, K) tile or has no dot."""
    t = {}
    for key, value in config.items():
        for axis, pattern in _TILE_KEYS.items():
            if pattern.match(str(key)) and isinstance(value, int):
                t[axis] = value
    if not dot or len(t) < 3:
        return 0
    return (t["m"] * t["k"] + t["k"] * t["n"]) * elem_bytes * max(1, int(config.get("num_stages", 2)))


def fit_stages(config: dict, dot: bool, budget: int, min_stages: int = 2) -> dict | None:
    """``config`` with ``num_stages`` lowered (not below ``min_stages``) until it fits ``budget``."""
    if slm_estimate(config, dot) <= budget:
        return config
    stages = int(config.get("num_stages", 2))
    while stages > min_stages:
        stages -= 1
        if slm_estimate({**config, "num_stages": stages}, dot) <= budget:
            return {**config, "num_stages": stages}
    return None


def legal(config: dict, fam: IntelFamily) -> bool:
    nw, ws = int(config.get("num_warps", 4)), int(config.get("warp_size", 32))
    grf = config.get("grf_mode", "default")
    if nw < 1 or nw & (nw - 1) or ws not in fam.sub_groups:
        return False
    if grf == "large" and not fam.large_grf:
        return False
    return nw * ws <= fam.max_work_items and nw <= fam.max_warps(grf)


def _variants(base: dict, fam: IntelFamily, dot: bool) -> Iterator[dict]:
    nw = int(base.get("num_warps", 4))
    grfs = ("default", "large") if fam.large_grf else ("default",)
    if dot:
        for grf in grfs:
            yield {**base, "num_warps": nw * 2, "warp_size": 16, "grf_mode": grf}
        return
    for grf in grfs:
        yield {**base, "num_warps": nw, "warp_size": 32, "grf_mode": grf}
    yield {**base, "num_warps": nw * 2, "warp_size": 16, "grf_mode": "default"}


def _clamp(config: dict, fam: IntelFamily) -> dict:
    """Shrink ``num_warps`` (keeping a power of two) until the config fits the work-group limits."""
    out = dict(config)
    while out["num_warps"] > 1 and not legal(out, fam):
        out["num_warps"] //= 2
    return out


def derive(kernel: PortableKernel, info: DeviceInfo) -> list[dict]:
    fam = family_of(info)
    table = SPACES.get(kernel.name)
    if table is not None and (fam.name in table or "*" in table):
        return [dict(c) for c in table.get(fam.name, table.get("*", ()))]
    dot = uses_dot(kernel)
    out: list[dict] = []
    too_big: list[dict] = []
    for base in list(kernel.configs) or [{}]:
        for cfg in _variants(dict(base), fam, dot):
            cfg = _clamp(cfg, fam)
            if not legal(cfg, fam):
                continue
            fitted = fit_stages(cfg, dot, fam.slm_bytes)
            if fitted is None:
                too_big.append(cfg)
            elif fitted not in out:
                out.append(fitted)
    if not out and too_big:
        out = [min(too_big, key=lambda c: slm_estimate(c, dot))]
    return out


def configs_for(kernel: PortableKernel) -> Callable[[DeviceInfo], list[dict]]:
    """A ``configs(info)`` function for registering ``kernel`` (one space per Intel family)."""
    cache: dict[tuple[str, str], list[dict]] = {}

    def configs(info: DeviceInfo) -> list[dict]:
        key = (info.family, info.arch)
        if key not in cache:
            cache[key] = derive(kernel, info)
        return [dict(c) for c in cache[key]]

    return configs
