"""AMD GPU families: the hardware facts a tuning space and the compile matrix key on.

Numbers are per workgroup as Triton sees them: ``lds_bytes`` is the most LDS (shared memory) one
workgroup may allocate, ``max_threads`` the workgroup size limit (1024 on every ROCm GPU), ``wave``
the wavefront width (64 on CDNA, 32 on RDNA). ``dot_variants`` are the MFMA/WMMA compile options
worth timing for kernels that use ``tl.dot``: ``(matrix_instr_nonkdim, kpack, waves_per_eu)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from slipstream.device import DeviceInfo, amd_family, amd_wavefront

KIB = 1024


@dataclass(frozen=True)
class AmdFamily:
    """One AMD architecture family as a tuning space needs it."""

    name: str
    wave: int
    lds_bytes: int
    max_threads: int = 1024
    max_stages: int = 2
    dot_variants: tuple[tuple[int, int, int], ...] = ((0, 1, 0),)
    """``(matrix_instr_nonkdim, kpack, waves_per_eu)`` per variant; nonkdim 0 = Triton's choice."""
    matrix_cores: str = ""
    lds_stage_offset: int = -1
    """LDS operand buffers = ``num_stages + lds_stage_offset`` (Triton 3.9: stages - 1 through the
    stream pipeliner on gfx9/gfx11/gfx12, one per stage on gfx950)."""

    @property
    def max_warps(self) -> int:
        """Largest legal ``num_warps``: ``max_threads / wave`` (16 on CDNA, 32 on RDNA)."""
        return self.max_threads // self.wave


# MFMA on CDNA: 16x16 and 32x32 instructions (nonkdim 16/32); kpack=2 packs two k-steps of fp16/bf16
# per LDS read (a win on MI200/MI300 for GEMM-like tiles); gfx950 deprecates kpack (Triton forces 1).
_CDNA_DOT = ((16, 2, 0), (16, 2, 2), (32, 1, 0))
_CDNA4_DOT = ((16, 1, 0), (16, 1, 2), (32, 1, 0))
# WMMA on RDNA3/4 is 16x16 only; kpack does not apply.
_RDNA_DOT = ((16, 1, 0), (16, 1, 2))

FAMILIES: dict[str, AmdFamily] = {
    "cdna1": AmdFamily("cdna1", 64, 64 * KIB, dot_variants=_CDNA_DOT, matrix_cores="MFMA"),
    "cdna2": AmdFamily("cdna2", 64, 64 * KIB, dot_variants=_CDNA_DOT, matrix_cores="MFMA"),
    "cdna3": AmdFamily("cdna3", 64, 64 * KIB, dot_variants=_CDNA_DOT, matrix_cores="MFMA"),
    "cdna4": AmdFamily("cdna4", 64, 160 * KIB, max_stages=3, dot_variants=_CDNA4_DOT, matrix_cores="MFMA",
                       lds_stage_offset=0),
    "gcn5": AmdFamily("gcn5", 64, 64 * KIB),
    "rdna1": AmdFamily("rdna1", 32, 64 * KIB),
    "rdna2": AmdFamily("rdna2", 32, 64 * KIB),
    "rdna3": AmdFamily("rdna3", 32, 64 * KIB, dot_variants=_RDNA_DOT, matrix_cores="WMMA"),
    "rdna4": AmdFamily("rdna4", 32, 64 * KIB, dot_variants=_RDNA_DOT, matrix_cores="WMMA"),
}


def family_of(info: DeviceInfo) -> AmdFamily:
    """The family record for ``info``; unknown gfx targets get a conservative one for their wave size."""
    name = info.family or amd_family(info.arch)
    if name in FAMILIES:
        return FAMILIES[name]
    wave = info.warp_size if info.warp_size in (32, 64) else amd_wavefront(info.arch)
    return AmdFamily(name or "amd-other", wave, 64 * KIB)


@dataclass(frozen=True)
class CompileTarget:
    """A target the compile matrix builds for: Triton's ``GPUTarget("hip", arch, wave)`` plus the
    device a tuning space is asked about and the limits every compiled kernel must respect."""

    arch: str
    wave: int
    device: DeviceInfo
    shared_limit: int
    max_threads: int = 1024

    def gpu_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("hip", self.arch, self.wave)


def _device(name: str, arch: str, cus: int, gib: int) -> DeviceInfo:
    family = amd_family(arch)
    return DeviceInfo(vendor="amd", type="cuda", index=0, name=name, arch=arch, family=family,
                      warp_size=amd_wavefront(arch), memory_bytes=gib * 2**30, compute_units=cus,
                      versions={"rocm": "simulated"})


REPRESENTATIVE: dict[str, DeviceInfo] = {
    "gfx90a": _device("AMD Instinct MI250X", "gfx90a", 110, 64),
    "gfx942": _device("AMD Instinct MI300X", "gfx942", 304, 192),
    "gfx950": _device("AMD Instinct MI355X", "gfx950", 256, 288),
    "gfx1100": _device("AMD Radeon RX 7900 XTX", "gfx1100", 96, 24),
    "gfx1101": _device("AMD Radeon RX 7800 XT", "gfx1101", 60, 16),
    "gfx1200": _device("AMD Radeon RX 9060 XT", "gfx1200", 32, 16),
    "gfx1201": _device("AMD Radeon RX 9070 XT", "gfx1201", 64, 16),
}
"""One device per gfx target, as :func:`slipstream.device.device_info` would describe it."""


def _target(arch: str) -> CompileTarget:
    info = REPRESENTATIVE[arch]
    fam = family_of(info)
    return CompileTarget(arch, fam.wave, info, fam.lds_bytes, fam.max_threads)


COMPILE_TARGETS: tuple[CompileTarget, ...] = (_target("gfx90a"), _target("gfx942"), _target("gfx1100"))
"""What this backend claims and CI compiles every kernel x config for (MI200, MI300, RX 7900)."""

EXTRA_TARGETS: tuple[CompileTarget, ...] = (_target("gfx950"), _target("gfx1201"))
"""Compiled only when named (``ci/compile_matrix.py --target gfx950``): not yet claimed."""
