"""slipstream-rocm: slipstream backend for AMD ROCm GPUs (Instinct CDNA, Radeon RDNA)."""

__version__ = "0.1.0"
