"""AMD tuning spaces for the portable kernels, derived per family from each kernel's own configs.

A portable kernel ships configs tuned nowhere in particular (``num_warps``, block sizes, maybe
``num_stages``). On an AMD device each of them becomes one or more AMD configs:

* every warp count (``num_warps``, ``bwd_num_warps``, ``gemm_warps``: any ``*warps`` key) is kept
  within the workgroup limit: ``warps * wave <= 1024``, i.e. at most 16 on CDNA (wave64) and 32 on
  RDNA (wave32). (On CDNA a config's warps hold twice the threads they
  hold on NVIDIA; the portable configs already span several ``num_warps``, so no halved variants
  are added: that would double the space to time and to compile for little.)
* ``waves_per_eu`` (an occupancy hint to the AMDGPU backend; 0 = the compiler's choice) is always
  present, so every AMD config is recognisably one.
* configs that launch a ``tl.dot`` kernel (read from ``aot(config)``'s jit functions and what they
  call) get the family's MFMA/WMMA options: ``matrix_instr_nonkdim`` (16 or
  32 on CDNA, 16 on RDNA3/4) and ``kpack`` (2 on CDNA2/3 for fp16/bf16 operands; 1 elsewhere).
* stage counts (any ``*stages`` key) are capped at 2 where LDS is 64 KiB, 3 on CDNA4 (160 KiB).
* ``tl.dot`` configs whose tiles (``BLOCK_M/N/K``) would not fit the family's LDS get fewer
  pipeline stages (not below 2), or are dropped (a conservative estimate, see
  :func:`lds_estimate`; ``ci/compile_matrix.py`` checks the compiled kernels' real LDS use).

These extra keys reach the GPU only if the kernel's launcher forwards them to the Triton launch
(``kernel[grid](..., waves_per_eu=..., matrix_instr_nonkdim=..., kpack=...)``); a launcher that
ignores them runs the AMD config exactly like its base config. ``SPACES`` holds hand-written
per-kernel tables that replace the derived space on a family once someone tunes on hardware.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Sequence

from slipstream.device import DeviceInfo
from slipstream.kernels import PortableKernel
from slipstream_rocm.families import AmdFamily, family_of

# kernel name -> family -> configs (replace the derived space there); "*" matches every family.
SPACES: dict[str, dict[str, Sequence[dict]]] = {}

AMD_KEYS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")
"""Config keys that are AMD compile options (Triton ``HIPOptions`` fields), besides num_warps/num_stages."""

DOT_TAGS = {"dot", "matmul", "gemm", "mma", "tensor-core"}
DOT_OPS = {"lora_linear", "linear_cross_entropy", "attention"}

_TILE_KEYS = {
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
    inner = getattr(fn, "fn", fn)
    try:
        return inspect.getsource(inner)
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
    ``tl.dot``, so MFMA/WMMA options matter? Read from the jit functions its ``aot(config)`` lists
    (and what they call), else its tags, else its op (matmul-bearing ops)."""
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
        for axis, pattern in _TILE_KEYS.items():
            if pattern.match(str(key)) and isinstance(value, int):
                out[axis] = value
    return out


def warp_keys(config: dict) -> list[str]:
    return [k for k, v in config.items() if WARP_KEY.search(str(k)) and isinstance(v, int)]


def stage_keys(config: dict) -> list[str]:
    return [k for k, v in config.items() if STAGE_KEY.search(str(k)) and isinstance(v, int)]


def lds_estimate(config: dict, dot: bool, fam: AmdFamily | None = None, elem_bytes: int = 2) -> int:
    """Upper bound on the LDS a ``tl.dot`` kernel's operand tiles need under ``config``: an A
    (M x K) and a B (K x N) tile per buffer, ``num_stages - 1`` buffers on gfx9/gfx11/gfx12 (AMD's
    stream pipeliner) and ``num_stages`` on gfx950, as Triton 3.9 allocates them (measured with the
    compile matrix, which reports the real numbers). 0 when the config names no complete
    (M, N, K) tile or has no dot."""
    t = tiles(config)
    if not dot or len(t) < 3:
        return 0
    stages = max([int(config[k]) for k in stage_keys(config)] or [2])
    offset = fam.lds_stage_offset if fam is not None else 0
    return (t["m"] * t["k"] + t["k"] * t["n"]) * elem_bytes * max(1, stages + offset)


def fit_stages(config: dict, dot: bool, budget: int, fam: AmdFamily | None = None,
               min_stages: int = 2) -> dict | None:
    """``config`` with its stage counts lowered (not below ``min_stages``) until its tiles fit
    ``budget`` bytes of LDS; ``None`` if they never do."""
    if lds_estimate(config, dot, fam) <= budget:
        return config
    keys = stage_keys(config)
    top = max([int(config[k]) for k in keys] or [2])
    for stages in range(top - 1, min_stages - 1, -1):
        smaller = {**config, **{k: min(int(config[k]), stages) for k in keys}}
        if lds_estimate(smaller, dot, fam) <= budget:
            return smaller
    return None


def _variants(base: dict, fam: AmdFamily, dot: bool) -> Iterator[dict]:
    legalised = {**base, **{k: min(int(base[k]), fam.max_warps) for k in warp_keys(base)},
                 **{k: min(int(base[k]), fam.max_stages) for k in stage_keys(base)}}
    if dot:
        for nonk, kpack, wpe in fam.dot_variants:
            yield {**legalised, "waves_per_eu": wpe, "matrix_instr_nonkdim": nonk, "kpack": kpack}
    else:
        yield {**legalised, "waves_per_eu": 0}


def legal(config: dict, fam: AmdFamily) -> bool:
    """Within the workgroup limit, power-of-two warp counts, and options Triton's HIP backend takes."""
    for key in warp_keys(config) or ["num_warps"]:
        nw = int(config.get(key, 4))
        if nw < 1 or nw & (nw - 1) or nw * fam.wave > fam.max_threads:
            return False
    if config.get("matrix_instr_nonkdim", 0) not in (0, 16, 32):
        return False
    return not (fam.name == "cdna4" and config.get("kpack", 1) != 1)


def derive(kernel: PortableKernel, info: DeviceInfo) -> list[dict]:
    """This backend's space for ``kernel`` on ``info`` (see the module docstring)."""
    fam = family_of(info)
    table = SPACES.get(kernel.name)
    if table is not None and (fam.name in table or "*" in table):
        return [dict(c) for c in table.get(fam.name, table.get("*", ()))]
    out: list[dict] = []
    too_big: list[tuple[int, dict]] = []
    for base in list(kernel.configs) or [{}]:
        dot = uses_dot(kernel, dict(base))
        for cfg in _variants(dict(base), fam, dot):
            if not legal(cfg, fam):
                continue
            fitted = fit_stages(cfg, dot, fam.lds_bytes, fam)
            if fitted is None:
                too_big.append((lds_estimate(cfg, dot, fam), cfg))
            elif fitted not in out:
                out.append(fitted)
    if not out and too_big:  # nothing fits by the estimate: keep the smallest, the matrix will judge
        out = [min(too_big, key=lambda pair: pair[0])[1]]
    return out


def configs_for(kernel: PortableKernel) -> Callable[[DeviceInfo], list[dict]]:
    """A ``configs(info)`` function for registering ``kernel`` (one space per device family)."""
    cache: dict[tuple[str, str, int], list[dict]] = {}

    def configs(info: DeviceInfo) -> list[dict]:
        key = (info.family, info.arch, info.warp_size)
        if key not in cache:
            cache[key] = derive(kernel, info)
        return [dict(c) for c in cache[key]]

    return configs
