"""AMD tuning spaces for the portable kernels, derived per family from each kernel's own configs.

A portable kernel ships configs tuned nowhere in particular (``num_warps``, block sizes, maybe
``num_stages``). On an AMD device each of them becomes one or more AMD configs:

* ``num_warps`` is kept within the workgroup limit: ``num_warps * wave <= 1024``, i.e. at most 16
  on CDNA (wave64) and 32 on RDNA (wave32). On CDNA, kernels without ``tl.dot`` also get the
  variant with half the warps, which keeps the thread count the config was written for.
* ``waves_per_eu`` (an occupancy hint to the AMDGPU backend; 0 = the compiler's choice) is always
  present, so every AMD config is recognisably one.
* kernels that use ``tl.dot`` get the family's MFMA/WMMA options: ``matrix_instr_nonkdim`` (16 or
  32 on CDNA, 16 on RDNA3/4) and ``kpack`` (2 on CDNA2/3 for fp16/bf16 operands; 1 elsewhere).
* ``num_stages`` (if the kernel sets it) is capped at 2 where LDS is 64 KiB, 3 on CDNA4 (160 KiB).
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

_dot_cache: dict[int, bool] = {}


def _source(fn: object) -> str:
    src = getattr(fn, "src", None)
    if isinstance(src, str):
        return src
    inner = getattr(fn, "fn", fn)
    try:
        return inspect.getsource(inner)
    except (OSError, TypeError):
        return ""


def uses_dot(kernel: PortableKernel) -> bool:
    """Does ``kernel`` launch a Triton kernel with ``tl.dot`` (so MFMA/WMMA options matter)?

    Read from its tags, else from the source of the jit functions its ``aot`` lists, else from
    the op (matmul-bearing ops)."""
    key = id(kernel.fn)
    if key in _dot_cache:
        return _dot_cache[key]
    found: bool | None = True if DOT_TAGS & {t.lower() for t in kernel.tags} else None
    if found is None and kernel.aot is not None and kernel.configs:
        try:
            units = kernel.aot(dict(kernel.configs[0]))
            found = any(re.search(r"\btl\.dot(_scaled)?\s*\(", _source(u.fn)) for u in units)
        except Exception:  # a broken aot is the compile matrix's business, not the tuning space's
            found = None
    if found is None:
        found = kernel.op in DOT_OPS
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


def lds_estimate(config: dict, dot: bool, elem_bytes: int = 2, default_stages: int = 2) -> int:
    """Upper bound on the LDS a ``tl.dot`` kernel's operand tiles need under ``config``: an A (M x K)
    and a B (K x N) tile per pipeline stage. It matches what Triton allocates on gfx950 and
    over-estimates gfx90a/gfx942 (whose stream pipeliner stages fewer buffers); the compile matrix
    reports the real numbers. 0 when the config names no complete (M, N, K) tile or has no dot."""
    t = tiles(config)
    if not dot or len(t) < 3:
        return 0
    stages = max(1, int(config.get("num_stages", default_stages)))
    return (t["m"] * t["k"] + t["k"] * t["n"]) * elem_bytes * stages


def fit_stages(config: dict, dot: bool, budget: int, min_stages: int = 2) -> dict | None:
    """``config`` with ``num_stages`` lowered (not below ``min_stages``) until its tiles fit
    ``budget`` bytes of LDS; ``None`` if they never do."""
    if lds_estimate(config, dot) <= budget:
        return config
    stages = int(config.get("num_stages", 2))
    while stages > min_stages:
        stages -= 1
        smaller = {**config, "num_stages": stages}
        if lds_estimate(smaller, dot) <= budget:
            return smaller
    return None


def _variants(base: dict, fam: AmdFamily, dot: bool) -> Iterator[dict]:
    nw = int(base.get("num_warps", 4))
    warps = [min(nw, fam.max_warps)]
    if fam.wave == 64 and not dot and nw > 1:
        warps.append(max(1, min(nw // 2, fam.max_warps)))
    stages = {"num_stages": min(int(base["num_stages"]), fam.max_stages)} if "num_stages" in base else {}
    for w in dict.fromkeys(warps):
        if dot:
            for nonk, kpack, wpe in fam.dot_variants:
                yield {**base, "num_warps": w, **stages, "waves_per_eu": wpe, "matrix_instr_nonkdim": nonk,
                       "kpack": kpack}
        else:
            yield {**base, "num_warps": w, **stages, "waves_per_eu": 0}


def legal(config: dict, fam: AmdFamily) -> bool:
    """Within the workgroup limit, a power-of-two warp count, and options Triton's HIP backend takes."""
    nw = int(config.get("num_warps", 4))
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
    dot = uses_dot(kernel)
    out: list[dict] = []
    too_big: list[dict] = []
    for base in list(kernel.configs) or [{}]:
        for cfg in _variants(dict(base), fam, dot):
            if not legal(cfg, fam):
                continue
            fitted = fit_stages(cfg, dot, fam.lds_bytes)
            if fitted is None:
                too_big.append(cfg)
            elif fitted not in out:
                out.append(fitted)
    if not out and too_big:  # nothing fits by the estimate: keep the smallest, the matrix will judge
        out = [min(too_big, key=lambda c: lds_estimate(c, dot))]
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
