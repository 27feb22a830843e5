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
WARP_KEY = re.compile(r"(^|_)warps$")
STAGE_KEY = re.compile(r"(^|_)stages$")
_DOT = re.compile(r"\btl\.dot(_scaled)?\s*\(")
_CALL = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
_dot_cache: dict[tuple, bool] = {}


def _source(fn: object) -> str:
    src = getattr(fn, "src", None)
    if isinstance(src, str):
        return src
    try:
        return inspect.getsource(getattr(fn, "fn", fn))
    except (OSError, TypeError):
        return ""


def jit_has_dot(fn: object, seen: set[int] | None = None) -> bool:
    """Does the jit function ``fn``, or a jit function it calls (transitively), use ``tl.dot``?"""
    seen = set() if seen is None else seen
    seen.add(id(fn))
    src = _source(fn)
    if _DOT.search(src):
        return True
    scope = getattr(getattr(fn, "fn", fn), "__globals__", {})
    for name in set(_CALL.findall(src)):
        callee = scope.get(name)
        if (callee is not None and id(callee) not in seen and type(callee).__module__.startswith("triton")
                and hasattr(callee, "fn") and jit_has_dot(callee, seen)):
            return True
    return False


def uses_dot(kernel: PortableKernel, config: dict | None = None) -> bool:
    """Does ``kernel`` under ``config`` (any config if ``None``) launch a ``tl.dot`` kernel? Read
    from its ``aot(config)`` jit functions and their callees, else its tags, else its op."""
    if config is None:
        return any(uses_dot(kernel, dict(c)) for c in kernel.configs) if kernel.configs else \
            kernel.op in DOT_OPS
    key = (id(kernel.fn), repr(sorted(config.items(), key=lambda kv: str(kv[0]))))
    if key in _dot_cache:
        return _dot_cache[key]
    found: bool | None = None
    if kernel.aot is not None:
        try:
            found = any(jit_has_dot(u.fn) for u in kernel.aot(dict(config)))
        except Exception:
            found = None
    if found is None:
        found = bool(DOT_TAGS & {t.lower() for t in kernel.tags}) or kernel.op in DOT_OPS
    _dot_cache[key] = found
    return found


def warp_keys(config: dict) -> list[str]:
    return [k for k, v in config.items() if WARP_KEY.search(str(k)) and isinstance(v, int)]


def stage_keys(config: dict) -> list[str]:
    return [k for k, v in config.items() if STAGE_KEY.search(str(k)) and isinstance(v, int)]


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
    stages = max([int(config[k]) for k in stage_keys(config)] or [2])
    return (t["m"] * t["k"] + t["k"] * t["n"]) * elem_bytes * max(1, stages)


def fit_stages(config: dict, dot: bool, budget: int, min_stages: int = 2) -> dict | None:
    """``config`` with its stage counts lowered (not below ``min_stages``) until it fits ``budget``."""
    if slm_estimate(config, dot) <= budget:
        return config
    keys = stage_keys(config)
    top = max([int(config[k]) for k in keys] or [2])
    for stages in range(top - 1, min_stages - 1, -1):
        smaller = {**config, **{k: min(int(config[k]), stages) for k in keys}}
        if slm_estimate(smaller, dot) <= budget:
            return smaller
    return None


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
    fam = family_of(info)
    table = SPACES.get(kernel.name)
    if table is not None and (fam.name in table or "*" in table):
        return [dict(c) for c in table.get(fam.name, table.get("*", ()))]
    out: list[dict] = []
    too_big: list[tuple[int, dict]] = []
    for base in list(kernel.configs) or [{}]:
        dot = uses_dot(kernel, dict(base))
        for cfg in _variants(dict(base), fam, dot):
            cfg = _clamp(cfg, fam)
            if not legal(cfg, fam):
                continue
            fitted = fit_stages(cfg, dot, fam.slm_bytes)
            if fitted is None:
                too_big.append((slm_estimate(cfg, dot), cfg))
            elif fitted not in out:
                out.append(fitted)
    if not out and too_big:
        out = [min(too_big, key=lambda pair: pair[0])[1]]
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
