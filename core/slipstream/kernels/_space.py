"""What a vendor's tuning space reads off a portable kernel and its configs, shared by all backends.

A portable kernel ships configs tuned nowhere in particular. A vendor backend turns each into its
own configs (warp limits, compile options, pipeline depth that fits its shared memory); the
vendor-neutral parts live here: which launches use ``tl.dot`` (read from the jit source of what
``aot(config)`` lists, transitively), which keys hold warp counts / stage counts / tile sizes, the
operand-tile estimate of shared memory, lowering stages until a budget fits, and the derivation
loop with its per-family cache. The vendor supplies variants, legality and its memory model.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from slipstream.device import DeviceInfo
from slipstream.kernels._catalog import PortableKernel

DOT_TAGS = {"dot", "matmul", "gemm", "mma", "tensor-core"}
DOT_OPS = {"lora_linear", "lora_linear_group", "linear_cross_entropy", "attention"}
"""Fallbacks when a kernel's jit source can't be read: its tags, else its op."""

TILE_KEYS = {
    "m": re.compile(r"^(block_?(size_?)?m|bm|tile_m)$", re.IGNORECASE),
    "n": re.compile(r"^(block_?(size_?)?n|bn|tile_n)$", re.IGNORECASE),
    "k": re.compile(r"^(block_?(size_?)?k|bk|tile_k)$", re.IGNORECASE),
}
WARP_KEY = re.compile(r"(^|_)warps$")
"""Config keys holding a launch's warp count: ``num_warps``, ``bwd_num_warps``, ``gemm_warps``..."""
STAGE_KEY = re.compile(r"(^|_)stages$")
"""Config keys holding a launch's pipeline depth: ``num_stages``, ``bwd_num_stages``, ``stages``..."""
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


def _is_jit(obj: object) -> bool:
    return type(obj).__module__.startswith("triton") and hasattr(obj, "fn")


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
        if callee is not None and id(callee) not in seen and _is_jit(callee) and jit_has_dot(callee, seen):
            return True
    return False


def uses_dot(kernel: PortableKernel, config: dict | None = None) -> bool:
    """Does ``kernel`` under ``config`` (any of its configs if ``None``) launch a Triton kernel with
    ``tl.dot`` (so matrix-unit options matter)? Read from the jit functions its ``aot(config)`` lists
    and what they call, else its tags, else its op."""
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
        except Exception:  # a broken aot is the compile matrix's business, not the tuning space's
            found = None
    if found is None:
        found = bool(DOT_TAGS & {t.lower() for t in kernel.tags}) or kernel.op in DOT_OPS
    _dot_cache[key] = found
    return found


def tiles(config: dict) -> dict[str, int]:
    """The dot tile sizes named in ``config`` (``{"m": 128, "n": 64, "k": 32}``), where recognisable."""
    out = {}
    for key, value in config.items():
        for axis, pattern in TILE_KEYS.items():
            if pattern.match(str(key)) and isinstance(value, int):
                out[axis] = value
    return out


def warp_keys(config: dict) -> list[str]:
    return [k for k, v in config.items() if WARP_KEY.search(str(k)) and isinstance(v, int)]


def stage_keys(config: dict) -> list[str]:
    return [k for k, v in config.items() if STAGE_KEY.search(str(k)) and isinstance(v, int)]


def operand_tile_bytes(config: dict, dot: bool, stage_offset: int = 0, elem_bytes: int = 2) -> int:
    """Bytes of an A (M x K) and a B (K x N) operand tile per pipeline buffer, ``stages + stage_offset``
    buffers (at least one). 0 when the config names no complete (M, N, K) tile or has no dot."""
    t = tiles(config)
    if not dot or len(t) < 3:
        return 0
    stages = max([int(config[k]) for k in stage_keys(config)] or [2])
    return (t["m"] * t["k"] + t["k"] * t["n"]) * elem_bytes * max(1, stages + stage_offset)


def fit_stages(config: dict, estimate: Callable[[dict], int], budget: int, min_stages: int = 2) -> dict | None:
    """``config`` with its stage counts lowered (not below ``min_stages``) until ``estimate(config)``
    fits ``budget`` bytes; ``None`` if it never does."""
    if estimate(config) <= budget:
        return config
    keys = stage_keys(config)
    top = max([int(config[k]) for k in keys] or [2])
    for stages in range(top - 1, min_stages - 1, -1):
        smaller = {**config, **{k: min(int(config[k]), stages) for k in keys}}
        if estimate(smaller) <= budget:
            return smaller
    return None


def derive_space(kernel: PortableKernel, family: str, overrides: Mapping[str, Sequence[dict]] | None,
                 variants: Callable[[dict, bool], Iterable[dict]], legalise: Callable[[dict], dict | None],
                 estimate: Callable[[dict, bool], int], budget: int) -> list[dict]:
    """A family's configs for ``kernel``: the hand-written ``overrides`` table for ``family`` (or its
    ``"*"`` entry) if there is one; else every variant of every base config that ``legalise`` keeps
    (it returns the legal form or ``None``), with stages lowered to fit ``budget`` bytes by
    ``estimate(config, dot)``. When nothing fits, the smallest estimate is kept for the compile
    matrix to judge."""
    if overrides is not None and (family in overrides or "*" in overrides):
        return [dict(c) for c in overrides.get(family, overrides.get("*", ()))]
    out: list[dict] = []
    too_big: list[tuple[int, dict]] = []
    for base in list(kernel.configs) or [{}]:
        dot = uses_dot(kernel, dict(base))
        for variant in variants(dict(base), dot):
            cfg = legalise(variant)
            if cfg is None:
                continue
            fitted = fit_stages(cfg, lambda c, dot=dot: estimate(c, dot), budget)
            if fitted is None:
                too_big.append((estimate(cfg, dot), cfg))
            elif fitted not in out:
                out.append(fitted)
    if not out and too_big:
        out = [min(too_big, key=lambda pair: pair[0])[1]]
    return out


def cached_space(derive: Callable[[PortableKernel, DeviceInfo], list[dict]], kernel: PortableKernel,
                 key: Callable[[DeviceInfo], tuple]) -> Callable[[DeviceInfo], list[dict]]:
    """A ``configs(info)`` function for registering ``kernel``: ``derive(kernel, info)`` once per ``key(info)``."""
    cache: dict[tuple, list[dict]] = {}

    def configs(info: DeviceInfo) -> list[dict]:
        k = key(info)
        if k not in cache:
            cache[k] = derive(kernel, info)
        return [dict(c) for c in cache[k]]

    return configs
