"""Custom Metal kernels (mx.fast.metal_kernel) beside pure-MLX references with the same semantics.

The model calls the wrappers here; they run the kernel when `use_kernels()` (Metal present and
MLX_DSV4_REFERENCE != "1") and the reference otherwise. See README.md in this folder.
"""

from .registry import REFERENCE_ENV, KernelSpec, KernelSpecError, available_kernels, load_spec, use_kernels

__all__ = ["REFERENCE_ENV", "KernelSpec", "KernelSpecError", "available_kernels", "load_spec", "use_kernels"]
