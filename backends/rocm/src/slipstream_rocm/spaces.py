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

from collections.abc import Callable, Iterator, Sequence

from slipstream.device import DeviceInfo
from slipstream.kernels import PortableKernel
from slipstream.kernels._space import cached_space, derive_space, operand_tile_bytes, stage_keys, warp_keys
from slipstream_rocm.families import AmdFamily, family_of

# kernel name -> family -> configs (replace the derived space there); "*" matches every family.
SPACES: dict[str, dict[str, Sequence[dict]]] = {}

AMD_KEYS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")
"""Config keys that are AMD compile options (Triton ``HIPOptions`` fields), besides num_warps/num_stages."""


def lds_estimate(config: dict, dot: bool, fam: AmdFamily | None = None, elem_bytes: int = 2) -> int:
    """Upper bound on the LDS a ``tl.dot`` kernel's operand tiles need under ``config``: an A
    (M x K) and a B (K x N) tile per buffer, ``num_stages - 1`` buffers on gfx9/gfx11/gfx12 (AMD's
    stream pipeliner) and ``num_stages`` on gfx950, as Triton 3.9 allocates them (measured with the
    compile matrix, which reports the real numbers). 0 when the config names no complete
    (M, N, K) tile or has no dot."""
    return operand_tile_bytes(config, dot, fam.lds_stage_offset if fam is not None else 0, elem_bytes)


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
    return derive_space(kernel, fam.name, SPACES.get(kernel.name),
                        variants=lambda base, dot: _variants(base, fam, dot),
                        legalise=lambda cfg: cfg if legal(cfg, fam) else None,
                        estimate=lambda cfg, dot: lds_estimate(cfg, dot, fam), budget=fam.lds_bytes)


def configs_for(kernel: PortableKernel) -> Callable[[DeviceInfo], list[dict]]:
    """A ``configs(info)`` function for registering ``kernel`` (one space per device family)."""
    return cached_space(derive, kernel, lambda info: (info.family, info.arch, info.warp_size))
