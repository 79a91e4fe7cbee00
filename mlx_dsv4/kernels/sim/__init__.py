"""CPU harness for the Metal kernels: run the exact source MLX would compile, with real SIMD lockstep.

See mlx_dsv4/kernels/README.md ("Verifying kernels without a Mac").
"""

from .harness import (
    CpuKernel,
    MetalSimError,
    SimCompileError,
    SimRaceError,
    compiler,
    generated_source,
    run_metal_kernel_on_cpu,
)
from .dispatch import kernels_on_cpu
from .source import mlx_source, translation_unit

__all__ = ["CpuKernel", "MetalSimError", "SimCompileError", "SimRaceError", "compiler", "generated_source", "kernels_on_cpu",
           "mlx_source", "run_metal_kernel_on_cpu", "translation_unit"]
